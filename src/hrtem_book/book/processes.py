"""Processes the book build starts: a Jupyter server for ``myst --execute``, and how every
server it starts (Jupyter, Voilà) is waited for and stopped — by PID, kernels included."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """PIDs of a process's descendants (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM (lets Jupyter/Voilà shut their kernels down), then SIGKILL it and survivors."""
    if proc.poll() is not None:
        return
    family = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in family:  # kernels run in their own sessions and can outlive their parent
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what} not ready at {url} after {timeout:.0f} s")


@contextmanager
def jupyter_server(root_dir: Path, log_path: Path, timeout: float = 60.0) -> Iterator[dict]:
    """A Jupyter server for ``myst --execute``; yields the environment that points myst at it."""
    port, token = free_port(), secrets.token_hex(16)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(log_path.parent / "jupyter-runtime")}
    cmd = [
        sys.executable,
        "-m",
        "jupyter_server",
        "--no-browser",
        "--allow-root",  # CI containers run as root; the server only listens on localhost
        f"--port={port}",
        "--port-retries=0",
        "--ServerApp.ip=127.0.0.1",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root_dir}",
    ]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/api/status?token={token}", proc, timeout, "jupyter server")
        yield {"JUPYTER_BASE_URL": base, "JUPYTER_TOKEN": token}
    finally:
        stop_process(proc)


# the rules' error rates depend on the rules and the profile only (hrtem_book.power), not on any
# result: a child process simulates them into their cache while the sweep runs
_ERROR_RATES = (
    "import sys; from pathlib import Path; from hrtem_book import power; "
    "power.cached_table(sys.argv[1], Path(sys.argv[2]), log=lambda msg: None)"
)
IDLE_NICE = 19  # the lowest CPU priority: the child runs where the sweep leaves a core idle


class Background:
    """A child process started at the lowest CPU priority (``nice`` 19): it takes the moments a
    core is idle and yields the cores to the work around it."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=lambda: os.nice(IDLE_NICE),
        )

    def hurry(self) -> None:
        """Give the child its normal priority now that it is awaited (where the system allows
        lowering a nice value: root); else stop it — whoever needs its output makes it."""
        if self.proc.poll() is not None:
            return
        try:
            os.setpriority(os.PRIO_PROCESS, self.proc.pid, 0)
        except OSError:
            stop_process(self.proc)

    def wait(self) -> None:
        self.proc.wait()


@contextmanager
def error_rates_beside(profile: str, cache: Path) -> Iterator[Background]:
    """The rules' error rates for ``profile`` simulated into ``cache`` by a :class:`Background`
    child for the duration of the block (the block calls :meth:`Background.hurry` and
    :meth:`Background.wait` before reading the cache). An error in the block stops the child."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    child = Background([sys.executable, "-c", _ERROR_RATES, profile, str(cache)])
    try:
        yield child
    except BaseException:
        stop_process(child.proc)
        raise
    child.hurry()
    child.wait()
