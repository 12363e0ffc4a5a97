"""Executors: where the runs of a sweep execute — in this process or on a Dask cluster.

An executor takes run configs (``submit``) and hands back finished records (``wait_any``); the
scheduling (what runs when, what is recorded) is :mod:`hrtem_book.sweep`'s.
:class:`InProcessExecutor` runs each config at once; :class:`DaskExecutor` submits to a Dask
``LocalCluster`` of single-threaded worker processes, an existing scheduler
(``scheduler_address``) or a cluster described by a YAML file (:func:`load_cluster_config`)::

    kind: slurm            # or: local
    jobs: 4                # SLURM jobs to start (local: ignored; use n_workers)
    cluster:               # keyword arguments of dask_jobqueue.SLURMCluster (or LocalCluster)
      cores: 8
      processes: 8         # one single-threaded worker per core
      memory: 32GB
      walltime: "04:00:00"
      queue: gpu
      job_extra_directives: ["--gres=gpu:1"]
    device: cuda           # optional: torch device of the runs
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import CPU_ISA_VARS, RunConfig, config_hash
from .layout import Layout, storage_failure
from .records import RECORD_STATUSES

RunFn = Callable[..., dict]


# --- running one config (on a worker or in process) -------------------------------------------
def train_run(cfg: RunConfig, *, layout: Layout, device: str = "cpu") -> dict:
    """The real run function: :func:`hrtem_book.runs.run`."""
    from . import runs  # lazily: this module stays light for the command line (commands.py)

    return runs.run(cfg, layout, device=device)


INFRASTRUCTURE = "_infrastructure"  # key of the result of a run that did not produce a record


def infrastructure_failure(message: str) -> dict:
    """The result of a run that failed for a reason outside the model (an exception, a lost
    worker): not a record, never written; the sweep retries the run when it next starts."""
    return {INFRASTRUCTURE: message}


def execute(
    cfg: RunConfig, layout: Layout, device: str = "cpu", run_fn: RunFn | None = None
) -> dict:
    """Run one config and return its record, or :func:`infrastructure_failure` when the run
    raised instead of returning one; nothing escapes.

    A model that fails (diverges) is a result: the run returns a record with status "failed".
    An exception (an unreadable dataset or checkpoint, a missing device, a bug) says nothing
    about the model, so it is not recorded. Workers use one torch thread each: several
    training processes share the cores.
    """
    import torch  # lazily, as above

    torch.set_num_threads(1)
    h = config_hash(cfg)
    try:
        record = (run_fn or train_run)(cfg, layout=layout, device=device)
    except Exception as exc:  # a crash of one run must not stop the sweep
        storage = storage_failure(exc)
        if storage is not None:  # say what happened, not what the writer library said
            return infrastructure_failure(f"cannot write: {storage}")
        first = str(exc).splitlines()[0] if str(exc) else ""
        return infrastructure_failure(f"{type(exc).__name__}: {first}")
    if not isinstance(record, dict) or record.get("status") not in RECORD_STATUSES:
        return infrastructure_failure(f"run returned a malformed record: {str(record)[:200]}")
    if record.get("config_hash") != h:
        return infrastructure_failure(f"record hash {record.get('config_hash')!r} is not {h!r}")
    return record


# --- executors ------------------------------------------------------------------------------
class _Done:
    """Handle of a run that already finished (hashable by identity)."""

    def __init__(self, record: dict):
        self.record = record


class InProcessExecutor:
    """Runs each submitted config immediately, in this process."""

    capacity = 1

    def __init__(self, layout: Layout, device: str, run_fn: RunFn | None):
        self.layout, self.device, self.run_fn = layout, device, run_fn

    def submit(self, cfg: RunConfig, priority: int = 0) -> Any:
        return _Done(execute(cfg, self.layout, self.device, self.run_fn))

    def wait_any(self, handles: list) -> list[tuple[Any, dict]]:
        return [(h, h.record) for h in handles]

    def close(self, interrupted: bool = False) -> None:
        pass


class StackedExecutor:
    """Runs submitted configs in this process, stacked: every wait trains each group of
    configs that share a :func:`hrtem_book.runs.stack_key` as one model stack (at most
    ``max_stack`` models) — the engine of one accelerator. A group that raises returns an
    infrastructure failure for each of its configs."""

    capacity = 10**9  # take everything that is ready: the more to stack, the better

    def __init__(self, layout: Layout, device: str, max_stack: int = 64):
        if max_stack < 1:
            raise ValueError(f"max_stack={max_stack}; allowed: >= 1")
        self.layout, self.device, self.max_stack = layout, device, max_stack
        self.pending: list[tuple[_Done, RunConfig]] = []
        self.groups_run = 0

    def submit(self, cfg: RunConfig, priority: int = 0) -> Any:
        handle = _Done({})
        self.pending.append((handle, cfg))
        return handle

    def wait_any(self, handles: list) -> list[tuple[Any, dict]]:
        from . import runs  # lazily, as train_run

        groups: dict[str, list[tuple[_Done, RunConfig]]] = {}
        for handle, cfg in self.pending:
            groups.setdefault(runs.stack_key(cfg), []).append((handle, cfg))
        self.pending = []
        out = []
        for members in groups.values():
            for start in range(0, len(members), self.max_stack):
                chunk = members[start : start + self.max_stack]
                cfgs = [cfg for _, cfg in chunk]
                try:
                    records = runs.run_group(cfgs, self.layout, device=self.device)
                except Exception as exc:  # the whole group: nothing recorded, retried next time
                    first = str(exc).splitlines()[0] if str(exc) else ""
                    records = [infrastructure_failure(f"{type(exc).__name__}: {first}")] * len(cfgs)
                self.groups_run += 1
                out += [(h, rec) for (h, _), rec in zip(chunk, records, strict=True)]
        return out

    def close(self, interrupted: bool = False) -> None:
        pass


class DaskExecutor:
    """Runs configs on a Dask distributed cluster (local processes, SLURM jobs, or a scheduler)."""

    capacity = 10**9  # submit everything that is ready; the scheduler queues it

    def __init__(
        self,
        layout: Layout,
        device: str,
        run_fn: RunFn | None,
        *,
        workers: int = 2,
        cluster_config: dict | None = None,
        scheduler_address: str | None = None,
    ):
        from distributed import Client

        resolved = replace(layout, root=layout.root.resolve())  # workers may start elsewhere
        self.layout, self.device, self.run_fn = resolved, device, run_fn
        self.cluster = None
        if scheduler_address:
            self.client = connect(scheduler_address)
        else:
            self.cluster = make_cluster(cluster_config or {"kind": "local"}, workers)
            self.client = Client(self.cluster)

    def submit(self, cfg: RunConfig, priority: int = 0) -> Any:
        return self.client.submit(
            execute,
            cfg,
            self.layout,
            self.device,
            self.run_fn,
            key=f"run-{config_hash(cfg)}",
            priority=priority,
            pure=False,
        )

    def wait_any(self, handles: list) -> list[tuple[Any, dict]]:
        from distributed import wait

        done, _ = wait(handles, return_when="FIRST_COMPLETED")
        out = []
        for fut in done:
            try:
                out.append((fut, fut.result()))
            except Exception as exc:  # a lost worker (killed, out of memory)
                out.append((fut, infrastructure_failure(f"{type(exc).__name__}: {exc}")))
        return out

    def close(self, interrupted: bool = False) -> None:
        """Disconnect and stop the cluster this executor started. After an interruption
        (Ctrl-C) every wait is bounded by ``INTERRUPTED_CLOSE_S`` and a failing shutdown is
        ignored: the finished records are on disk, and a cluster that lost its workers (a
        cancelled SLURM job) must not keep the interrupted sweep from exiting."""
        if not interrupted:
            self.client.close()
            if self.cluster is not None:
                self.cluster.close()
            return
        with contextlib.suppress(Exception):
            self.client.close(timeout=INTERRUPTED_CLOSE_S)
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close(timeout=INTERRUPTED_CLOSE_S)


INTERRUPTED_CLOSE_S = 10  # longest wait of each shutdown step of an interrupted sweep [s]


# where a sweep runs: this process, a Dask cluster, or stacks of models on one device
EXECUTORS = ("inprocess", "dask", "stacked")
SCHEDULER_TIMEOUT_S = 10  # a scheduler that does not answer within this is not there


def connect(address: str, timeout_s: float = SCHEDULER_TIMEOUT_S):
    """A Dask client of the scheduler at ``address``; a one-line ValueError if none answers.

    Dask's own timeout covers an address where nothing listens; a process that accepts the
    connection and never speaks Dask's protocol (a plain TCP or HTTP server, a dashboard
    address pasted by mistake) would keep the handshake waiting for ever, so the attempt runs in
    a daemon thread that is given up after ``timeout_s`` + 5 s."""
    from distributed import Client

    box: dict = {}

    def attempt() -> None:
        try:
            box["client"] = Client(address, timeout=f"{timeout_s}s")
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=attempt, name="dask-connect", daemon=True)
    thread.start()
    thread.join(timeout_s + 5.0)
    allowed = "allowed: the address of a running `dask scheduler`"
    if thread.is_alive():
        raise ValueError(
            f"--scheduler {address}: something answers there but not as a Dask scheduler "
            f"(no handshake within {timeout_s + 5:g} s); {allowed}"
        )
    exc = box.get("error")
    if isinstance(exc, OSError | TimeoutError | ValueError):
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"--scheduler {address}: no Dask scheduler answered within {timeout_s:g} s "
            f"({reason[:120]}); {allowed}"
        ) from None
    if exc is not None:
        raise exc
    return box["client"]


_CLUSTER_KEYS = ("kind", "jobs", "cluster", "device")


def load_cluster_config(path: str | Path) -> dict:
    """Read and check a cluster YAML file (see the module docstring)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cluster config {path} not found")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a mapping with keys {', '.join(_CLUSTER_KEYS)}")
    unknown = sorted(set(cfg) - set(_CLUSTER_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; allowed: {', '.join(_CLUSTER_KEYS)}")
    if cfg.get("kind", "local") not in ("local", "slurm"):
        raise ValueError(f"{path}: kind={cfg['kind']!r}; allowed: local, slurm")
    if not isinstance(cfg.get("cluster", {}), dict):
        raise ValueError(f"{path}: 'cluster' must be a mapping of cluster keyword arguments")
    for key in ("n_workers", "threads_per_worker", "cores", "processes", "jobs"):
        value = cfg.get("cluster", {}).get(key, cfg.get(key) if key == "jobs" else None)
        if key == "processes" and isinstance(value, bool):
            continue
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):  # fmt: skip
            raise ValueError(f"{path}: {key}={value!r}; allowed: an integer >= 1")
    return cfg


# glibc malloc in the worker processes: Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 so that
# workers hand freed memory back at once; training then maps and faults its step buffers anew
# every step. Measured on the laptop sweep of one study (9 pretrainings, 2 workers): 24.6 M page
# faults and 46 s of system time (31 % of the CPU) with Dask's setting, 0.37 M and 2 s with
# these, 79 s → 56 s wall. Peak memory of a worker stays under 1 GB.
WORKER_MALLOC_ENV = {
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "MALLOC_MMAP_THRESHOLD_": str(1 << 28),
    "MALLOC_TOP_PAD_": str(1 << 28),
}


def make_cluster(cfg: dict, workers: int = 2, *, scale: bool = True):
    """A LocalCluster (``kind: local``) or dask-jobqueue SLURMCluster (``kind: slurm``).

    ``scale=False`` builds a SLURM cluster without submitting jobs (to inspect its job script).
    """
    kind = cfg.get("kind", "local")
    kwargs = dict(cfg.get("cluster", {}))
    # worker processes inherit this: one BLAS/OpenMP thread per single-threaded worker
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if kind == "local":
        import dask
        from distributed import LocalCluster

        environ = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
        dask.config.set({"distributed.nanny.pre-spawn-environ": {**environ, **WORKER_MALLOC_ENV}})

        if workers < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        kwargs.setdefault("n_workers", workers)
        kwargs.setdefault("threads_per_worker", 1)
        kwargs.setdefault("processes", True)
        kwargs.setdefault("dashboard_address", None)
        return LocalCluster(**kwargs)
    if kind == "slurm":
        sigint = signal.getsignal(signal.SIGINT)
        import dask
        from dask_jobqueue import SLURMCluster

        # importing dask_jobqueue replaces the SIGINT handler with ``sys.exit()``: Ctrl-C would end
        # a sweep with status 0, as if it had finished. Put back KeyboardInterrupt (status 130).
        if sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
        malloc = [f"export {k}={v}" for k, v in WORKER_MALLOC_ENV.items()]
        # the CPU kernels this process is pinned to (profiles.pin_cpu): local workers inherit
        # them, a SLURM job starts from its own environment
        pins = [f"export {k}={os.environ[k]}" for k in CPU_ISA_VARS if k in os.environ]
        kwargs.setdefault("job_script_prologue", ["export OMP_NUM_THREADS=1", *malloc, *pins])
        environ = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
        dask.config.set({"distributed.nanny.pre-spawn-environ": {**environ, **WORKER_MALLOC_ENV}})
        cluster = SLURMCluster(**kwargs)
        if scale:
            cluster.scale(jobs=int(cfg.get("jobs", 1)))
        return cluster
    raise ValueError(f"cluster kind={kind!r}; allowed: local, slurm")
