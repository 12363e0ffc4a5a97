"""Build the executable book: results database → figure notebooks → MyST site → AST check.

    hrtem-book book                        # laptop profile (or the shipped gpu database)
    hrtem-book book --profile smoke        # any profile; `make book PROFILE=smoke`
    hrtem-book book --check-only           # re-check the last built site
    hrtem-book live --profile laptop       # the notebooks' apps in Voilà on localhost

Steps of :func:`build_book`:

1. the results database ``results/<profile>/<study>.nc`` of every study exists, else the sweep
   runs (resumably) and its records are collected;
2. every figure notebook runs under papermill with the profile's parameters, which (re)writes the
   static placeholders in ``figures/``;
3. the book is staged in ``_build/book/<profile>/`` with those parameters injected into its
   notebooks (so ``myst --execute`` computes every figure and number from the chosen profile),
   and built with ``myst build --html``; where the book-theme cannot be fetched (offline) with
   ``myst --config book/myst.offline.yml build --site`` instead;
4. the built AST is checked (:func:`check_site`), because MyST silently drops an embed whose
   ``#app:``/``#txt:`` label does not exist.

The Jupyter server used by ``--execute`` is started here and stopped by its PID: left to itself,
mystmd starts one per build, refuses to run it as root, and leaves it running.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .results import REDUCTIONS
from .studies import STUDY_NAMES

DEFAULT_PROFILE = "laptop"  # runs end to end on a laptop CPU
SHIPPED_PROFILE = "gpu"  # preferred when its databases are committed under results/gpu/
OFFLINE_CONFIG = "book/myst.offline.yml"
VOILA_TEMPLATE = "hrtem-offline"  # book/jupyter/voila/templates/hrtem-offline
# what the book is made of, relative to the project root (copied into the staging folder)
BOOK_SOURCES = ("myst.yml", "refs.bib", "book", "chapters", "figures", "notebooks")
# generated folders the notebooks read through relative paths: linked, never copied
SHARED_FOLDERS = ("results", "data")

_LABEL = re.compile(r"^\s*#\s*\|\s*label:\s*(\S+)", re.MULTILINE)
_EMBED_REF = re.compile(r"#((?:app|txt):[\w.:-]+)")
# a figure directive embedding an app: label: its options, then its caption up to the closing fence
_FIGURE_BLOCK = re.compile(
    r"^(:{3,})\{figure\}[ \t]+#(app:[\w.:-]+)[ \t]*\n((?:[ \t]*:[\w-]+:[^\n]*\n)*)(.*?)^\1[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_PLACEHOLDER = re.compile(r"^[ \t]*:placeholder:\s*(\S+)", re.MULTILINE)
# mystmd prints these when it cannot download a site template (no network, no theme server)
_THEME_FETCH_FAILED = re.compile(
    r"(api\.mystmd\.org/templates\S*\s+failed|Could not find template|ENOTFOUND|EAI_AGAIN"
    r"|ECONNREFUSED|ETIMEDOUT|getaddrinfo)"
)
_ERROR_MARK = "\u26d4"  # ⛔: mystmd's mark for an error (some never reach the exit status)

Log = Callable[[str], None]


class BookCheckError(Exception):
    """The built book is incomplete: an embed, a reference or a notebook cell failed."""

    def __init__(self, problems: list[str], where: str = "book"):
        self.problems = problems
        super().__init__(
            f"{where}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems)
        )


@dataclass
class BuildResult:
    kind: str  # "html" (myst build --html, book-theme) or "site" (offline AST-only site)
    path: Path  # the folder to open or publish
    stage: Path  # the staged book that was built
    notebooks: list[Path] = field(default_factory=list)  # papermill outputs

    def describe(self) -> str:
        if self.kind == "html":
            return f"built the HTML book (myst build --html) in {self.path}"
        return (
            f"built the OFFLINE site (myst build --site: checked AST, no HTML; the book-theme "
            f"could not be fetched) in {self.path}"
        )


# --- profiles and databases ------------------------------------------------------------------
def default_profile(root: str | Path = ".") -> str:
    """``gpu`` when its databases ship with the repository, else the laptop profile."""
    shipped = Path(root) / "results" / SHIPPED_PROFILE
    if all((shipped / f"{study}.nc").is_file() for study in STUDY_NAMES):
        return SHIPPED_PROFILE
    return DEFAULT_PROFILE


def missing_studies(results_dir: str | Path) -> list[str]:
    return [s for s in STUDY_NAMES if not (Path(results_dir) / f"{s}.nc").is_file()]


def ensure_database(profile: str, root: str | Path = ".", log: Log = print) -> Path:
    """``results/<profile>/``, running the sweep (resumably) and collecting it where incomplete."""
    from . import results, sweep

    root = Path(root)
    results_dir = sweep.profile_dir(root, profile)
    missing = missing_studies(results_dir)
    if missing:
        log(f"book: results database incomplete in {results_dir} (missing {', '.join(missing)});")
        log(f"book: running the sweep for profile {profile!r} (resumes from finished records)")
        # one single-threaded Dask worker per core (a 2-core laptop: 2); one core: in-process
        cores = os.cpu_count() or 1
        executor = "dask" if cores > 1 else "inprocess"
        sweep.run_sweep(
            missing, profile, root, executor=executor, workers=cores, sim_workers=cores, log=log
        )
        results.collect(profile, root)
        missing = missing_studies(results_dir)
        if missing:
            raise FileNotFoundError(
                f"the sweep left no database for {', '.join(missing)} in {results_dir}"
            )
    return results_dir


# --- notebooks ---------------------------------------------------------------------------------
def figure_notebooks(root: str | Path = ".") -> list[Path]:
    return sorted((Path(root) / "notebooks").glob("*.ipynb"))


def notebook_labels(path: str | Path) -> list[str]:
    """The ``# | label:`` of every code cell of a notebook."""
    nb = json.loads(Path(path).read_text())
    labels = []
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            src = cell.get("source", "")
            labels += _LABEL.findall(src if isinstance(src, str) else "".join(src))
    return labels


def declared_parameters(path: str | Path) -> dict:
    """Names and defaults of a notebook's ``parameters`` cell; a clear error if it has none."""
    import papermill

    params = papermill.inspect_notebook(str(path))
    if not params:
        raise ValueError(f"{path}: no cell tagged 'parameters'; every figure notebook needs one")
    return params


def notebook_parameters(path: Path, values: dict) -> dict:
    """The subset of ``values`` that the notebook declares (papermill would add the others)."""
    declared = declared_parameters(path)
    return {k: v for k, v in values.items() if k in declared and v is not None}


def _first_error(executed: Path) -> str | None:
    """``cell N raised Name: value`` for the first failed cell of an executed notebook."""
    try:
        nb = json.loads(executed.read_text())
    except (OSError, ValueError):
        return None
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                n = cell.get("execution_count")
                return f"cell {n} raised {output.get('ename')}: {output.get('evalue')}"
    return None


def execute_notebooks(
    notebooks: Iterable[Path],
    out_dir: Path,
    values: dict,
    *,
    prepare_only: bool = False,
    jobs: int = 1,
    log: Log = print,
) -> list[Path]:
    """Run each notebook with papermill (cwd = its folder) into ``out_dir``; return the outputs.

    ``values`` are offered to every notebook; each gets those its parameters cell declares.
    ``prepare_only`` injects the parameters without running anything. Otherwise each notebook
    runs in its own ``papermill`` process, ``jobs`` at a time: papermill's client is not
    thread-safe (two executions in threads of one process hung here, a kernel idle and its
    client waiting for a reply forever).
    """
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = list(notebooks)
    if prepare_only:
        for nb in notebooks:
            papermill.execute_notebook(
                str(nb),
                str(out_dir / nb.name),
                parameters=notebook_parameters(nb, values),
                prepare_only=True,
                progress_bar=False,
            )
        return [out_dir / nb.name for nb in notebooks]

    def run(nb: Path) -> Path:
        out = out_dir / nb.name
        cmd = [sys.executable, "-m", "papermill", str(nb), str(out), "--cwd", str(nb.parent)]
        cmd += ["-k", "python3", "--no-progress-bar", "--log-level", "ERROR"]
        cmd += ["-y", json.dumps(notebook_parameters(nb, values))]  # JSON is YAML
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode:
            tail = proc.stdout.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            reason = _first_error(out) or f"papermill failed: {tail[0]}"
            raise BookCheckError([f"{reason} (output: {out})"], where=str(nb))
        log(f"book: executed {nb.name} in {time.perf_counter() - t0:.1f} s")
        return out

    # threads only wait on the papermill processes
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(run, notebooks))


def chapter_placeholders(chapters: Iterable[Path]) -> dict[str, tuple[Path, str]]:
    """``app:`` label → (placeholder image, caption) of each ``:::{figure} #app:`` in chapters."""
    found = {}
    for chapter in chapters:
        for _, label, options, caption in _FIGURE_BLOCK.findall(chapter.read_text()):
            m = _PLACEHOLDER.search(options)
            if m:
                found[label] = ((chapter.parent / m.group(1)).resolve(), caption)
    return found


def placeholder_reduction(path: Path) -> str | None:
    """The reduction recorded in a placeholder PNG's text chunk (widgets.save_placeholder)."""
    from PIL import Image

    with Image.open(path) as image:
        return getattr(image, "text", {}).get("reduction")


def check_placeholders(chapters: Iterable[Path], since: float) -> list[str]:
    """Problems with the placeholders: missing, not rewritten since ``since`` (epoch s), or
    drawn with a reduction that their caption does not name."""
    problems = []
    for label, (path, caption) in sorted(chapter_placeholders(chapters).items()):
        if not path.is_file():
            problems.append(f"placeholder of #{label} not written: {path}")
            continue
        if path.stat().st_mtime < since:
            problems.append(f"placeholder of #{label} not rewritten by its notebook: {path}")
        reduction = placeholder_reduction(path)
        if reduction in REDUCTIONS and not re.search(rf"\b{reduction}\b", caption, re.I):
            problems.append(
                f"placeholder of #{label} shows the {reduction} but its caption does not say so"
            )
    return problems


# --- staging -------------------------------------------------------------------------------
def _relative_to_notebooks(path: Path, root: Path) -> str:
    """``path`` as the notebooks see it: relative to ``notebooks/`` inside the project, else
    absolute (papermill runs with cwd = notebooks/, as does a staged copy)."""
    path = path.resolve()
    try:
        path.relative_to(root.resolve())
    except ValueError:
        return str(path)
    return os.path.relpath(path, root.resolve() / "notebooks")


def stage_book(root: Path, stage: Path, notebooks: Iterable[Path]) -> Path:
    """Copy the book's sources into ``stage`` with ``notebooks`` (parameters injected) in place
    of the committed ones; ``stage/results`` and ``stage/data`` link to the project's."""
    stage.mkdir(parents=True, exist_ok=True)
    for name in BOOK_SOURCES:
        src, dst = root / name, stage / name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        elif dst.exists() or dst.is_symlink():
            dst.unlink()
        if name == "notebooks":
            dst.mkdir()
            for nb in notebooks:
                shutil.copy2(nb, dst / nb.name)
        elif src.is_dir():
            shutil.copytree(src, dst)
        elif src.is_file():
            shutil.copy2(src, dst)
    _link_shared(root, stage)
    return stage


def _link_shared(root: Path, stage: Path) -> None:
    for name in SHARED_FOLDERS:
        link = stage / name
        if not link.exists():
            (root / name).mkdir(exist_ok=True)
            link.symlink_to((root / name).resolve(), target_is_directory=True)


# --- Jupyter server and myst -----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
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
    family = _descendants(proc.pid)
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


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
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
    port, token = _free_port(), secrets.token_hex(16)
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
        _wait_http(f"{base}/api/status?token={token}", proc, timeout, "jupyter server")
        yield {"JUPYTER_BASE_URL": base, "JUPYTER_TOKEN": token}
    finally:
        stop_process(proc)


def myst_executable() -> str:
    local = Path(sys.executable).parent / "myst"
    found = str(local) if local.exists() else shutil.which("myst")
    if not found:
        raise FileNotFoundError("the `myst` command is missing; install the book extra: make setup")
    return found


def run_myst(args: list[str], cwd: Path, env: dict, log: Log = print) -> tuple[int, str]:
    """Run ``myst <args>`` in ``cwd``; return its exit status and output (also logged)."""
    proc = subprocess.run(
        [myst_executable(), *args],
        cwd=cwd,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # drop the framed "update available" notice (noise offline) and collapse repeated lines
    # (widget cells print "Exception opening new comm" per widget: MyST executes without comms)
    lines: list[str] = []
    repeats = 0
    for line in proc.stdout.splitlines():
        if re.match(r"^\s*[│╭╰]", line):
            continue
        if lines and line == lines[-1]:
            repeats += 1
            continue
        if repeats:
            log(f"  myst: (previous line repeated {repeats} more times)")
            repeats = 0
        lines.append(line)
        log(f"  myst: {line}")
    return proc.returncode, "\n".join(lines)


def theme_unavailable(returncode: int, output: str) -> bool:
    """Whether a failed ``myst build --html`` failed because the theme could not be fetched."""
    return returncode != 0 and bool(_THEME_FETCH_FAILED.search(output))


# --- AST check -------------------------------------------------------------------------------
def _walk(node) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for child in node.get("children", []) or []:
            yield from _walk(child)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _embed_label(node: dict) -> str | None:
    source = node.get("source")
    if isinstance(source, dict) and str(source.get("label", "")).startswith(("app:", "txt:")):
        return source["label"]
    return None


def check_page(page: dict) -> tuple[list[str], set[str]]:
    """Problems in one page of ``_build/site/content`` and the embed labels it resolved."""
    where = page.get("location", page.get("slug", "?"))
    problems, resolved = [], set()
    for node in _walk(page.get("mdast", {})):
        kind = node.get("type")
        label = _embed_label(node)
        if label is not None:
            source = node["source"]
            has_output = any(n.get("type") == "outputs" for n in _walk(node.get("children", [])))
            if not str(source.get("location", "")).endswith(".ipynb"):
                problems.append(f"{where}: #{label} does not resolve to a notebook cell")
            elif not has_output:
                problems.append(f"{where}: #{label} resolves to a cell without output")
            else:
                resolved.add(label)
        if kind == "crossReference" and node.get("resolved") is not True:
            problems.append(f"{where}: unresolved cross-reference {node.get('identifier')!r}")
        if kind == "link" and str(node.get("url", "")).startswith("#"):
            problems.append(f"{where}: unresolved reference {node['url']!r}")
        data = node.get("jupyter_data")
        if isinstance(data, dict) and data.get("output_type") == "error":
            problems.append(f"{where}: a cell raised {data.get('ename', 'an error')}")
    return problems, resolved


def check_site(site_dir: str | Path, chapters_dir: str | Path | None = None, log: str = "") -> None:
    """Raise :class:`BookCheckError` unless the built AST in ``site_dir/content`` is complete.

    Every ``#app:``/``#txt:`` embed must resolve to an executed notebook cell with output
    (MyST drops a missing one silently), every cross-reference must resolve, no cell may have
    raised, every embed named in the chapters' sources must appear resolved, and the build log
    must hold no error mark (mystmd reports some errors, e.g. an unreadable bibliography,
    without failing even under ``--strict``).
    """
    content = Path(site_dir) / "content"
    pages = sorted(content.glob("*.json"))
    if not pages:
        raise BookCheckError([f"no built pages in {content}"])
    problems, resolved = [], set()
    for path in pages:
        page_problems, page_resolved = check_page(json.loads(path.read_text()))
        problems += page_problems
        resolved |= page_resolved
    if chapters_dir is not None:
        for chapter in sorted(Path(chapters_dir).glob("*.md")):
            for label in sorted(set(_EMBED_REF.findall(chapter.read_text())) - resolved):
                problems.append(f"{chapter.name}: embed #{label} is missing from the built book")
    # the live error lines start with the mark; the closing summary repeats them as "- ⛔ …"
    problems += [f"myst: {ln.strip()}" for ln in log.splitlines() if ln.startswith(_ERROR_MARK)]
    if problems:
        raise BookCheckError(sorted(set(problems), key=problems.index), where=str(site_dir))


def build_site(
    stage: Path, *, offline: bool | None = None, jobs: int = 1, log: Log = print
) -> tuple[str, Path]:
    """Build the staged book: HTML with the book-theme, else (offline) the checked AST site."""
    runtime = stage / "_build" / "logs"
    with jupyter_server(stage, runtime / "jupyter-server.log") as env:
        if offline is not True:
            args = ["build", "--html", "--execute", f"--execute-parallel={jobs}", "--strict"]
            log("book: myst " + " ".join(args))
            rc, output = run_myst(args, stage, env, log)
            if rc == 0:
                check_site(stage / "_build" / "site", stage / "chapters", output)
                return "html", stage / "_build" / "html"
            if offline is False or not theme_unavailable(rc, output):
                raise BookCheckError([f"myst build --html failed with status {rc}"], str(stage))
            log("book: the book-theme cannot be fetched (offline?): building the offline site")
        args = ["--config", OFFLINE_CONFIG, "build", "--site", "--execute", "--strict"]
        args.append(f"--execute-parallel={jobs}")
        log("book: myst " + " ".join(args))
        rc, output = run_myst(args, stage, env, log)
        site = stage / "_build" / "site"
        try:
            check_site(site, stage / "chapters", output)
        except BookCheckError as exc:
            status = [f"myst build --site failed with status {rc}"] if rc else []
            raise BookCheckError(status + exc.problems, str(site)) from None
        if rc:
            raise BookCheckError([f"myst build --site failed with status {rc}"], str(stage))
        return "site", site


def build_book(
    profile: str | None = None,
    root: str | Path = ".",
    *,
    results_dir: str | Path | None = None,
    reduction: str = "median",
    offline: bool | None = None,
    jobs: int | None = None,
    parameters: dict | None = None,
    log: Log = print,
) -> BuildResult:
    """Database → papermill → staged MyST build → AST check (see the module docstring).

    ``results_dir`` given: use that database as is (tests); otherwise ``results/<profile>/``,
    completed by the sweep where a study is missing. ``offline``: None tries HTML first.
    ``jobs``: notebooks executed at once (default: the CPU count, at most 4). ``parameters``:
    more notebook parameters (e.g. ``data_root``), given to the notebooks that declare them.
    """
    jobs = jobs or min(4, os.cpu_count() or 1)
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; allowed: {', '.join(REDUCTIONS)}")
    root = Path(root).resolve()
    profile = profile or default_profile(root)
    from .profiles import get_profile

    get_profile(profile)  # a clear error for an unknown name before anything runs
    if results_dir is None:
        results_dir = ensure_database(profile, root, log)
    elif missing := missing_studies(results_dir):
        raise FileNotFoundError(f"no database for {', '.join(missing)} in {results_dir}")
    notebooks = figure_notebooks(root)
    if not notebooks:
        raise FileNotFoundError(f"no figure notebooks in {root / 'notebooks'}")
    values = {
        "profile": profile,
        "results_dir": _relative_to_notebooks(Path(results_dir), root),
        "reduction": reduction,
        **(parameters or {}),
    }
    stage = root / "_build" / "book" / profile
    started = time.time() - 1.0  # file systems with 1 s mtime resolution
    log(f"book: executing {len(notebooks)} notebooks with papermill ({values})")
    out = stage / "_build" / "papermill"
    executed = execute_notebooks(notebooks, out, values, jobs=jobs, log=log)
    chapters = sorted((root / "chapters").glob("*.md"))
    if problems := check_placeholders(chapters, started):
        raise BookCheckError(problems, where="placeholders")
    stage_book(root, stage, executed)
    kind, path = build_site(stage, offline=offline, jobs=jobs, log=log)
    return BuildResult(kind, path, stage, executed)


# --- live apps (Voilà) ----------------------------------------------------------------------
def voila_command(
    target: Path, port: int, root: str | Path = ".", connection_dir: Path | None = None
) -> tuple[list[str], dict]:
    """The Voilà command line serving ``target`` (a notebook or a folder) offline on localhost,
    and the environment that makes the book's template findable."""
    root = Path(root).resolve()
    cmd = [
        sys.executable,
        "-m",
        "voila",
        str(target),
        "--no-browser",
        f"--port={port}",
        "--Voila.ip=127.0.0.1",
        f"--template={VOILA_TEMPLATE}",
    ]
    if connection_dir is not None:
        connection_dir.mkdir(parents=True, exist_ok=True)
        cmd.append(f"--Voila.connection_dir_root={connection_dir}")
    jupyter_path = os.pathsep.join(
        p for p in (str(root / "book" / "jupyter"), os.environ.get("JUPYTER_PATH")) if p
    )
    return cmd, {**os.environ, "JUPYTER_PATH": jupyter_path}


def prepare_live(profile: str, root: str | Path = ".", reduction: str = "median") -> Path:
    """The notebooks with ``profile``'s parameters injected (not run), under ``_build/live``."""
    root = Path(root).resolve()
    results_dir = root / "results" / profile
    if missing := missing_studies(results_dir):
        raise FileNotFoundError(
            f"no database for {', '.join(missing)} in {results_dir}; run `make book "
            f"PROFILE={profile}` (or `hrtem-book sweep`/`collect`) first"
        )
    values = {
        "profile": profile,
        "results_dir": _relative_to_notebooks(results_dir, root),
        "reduction": reduction,
    }
    stage = root / "_build" / "live" / profile
    nbs = execute_notebooks(
        figure_notebooks(root), stage / "notebooks", values, prepare_only=True, log=lambda m: None
    )
    _link_shared(root, stage)
    # the apps write their placeholder on start: keep them off the committed figures/
    (stage / "figures").mkdir(exist_ok=True)
    return nbs[0].parent


def serve_live(profile: str, root: str | Path = ".", port: int = 8866) -> int:
    """Serve every figure notebook's app with Voilà until interrupted (Ctrl-C)."""
    root = Path(root).resolve()
    folder = prepare_live(profile, root)
    cmd, env = voila_command(folder, port, root, root / "_build" / "live" / "voila-connections")
    print(f"live: serving {folder} at http://127.0.0.1:{port}/ (Ctrl-C stops)", flush=True)
    proc = subprocess.Popen(cmd, cwd=folder, env=env)
    # SIGTERM (a CI job ending, `kill`) stops Voilà and its kernels like Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_process(proc)


# --- command line --------------------------------------------------------------------------
def _cli_book(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve()
    profile = args.profile or default_profile(root)
    if args.check_only:
        stage = root / "_build" / "book" / profile
        check_site(stage / "_build" / "site", stage / "chapters")
        print(f"book: the site in {stage / '_build' / 'site'} passes the AST check")
        return 0
    offline = {"auto": None, "yes": True, "no": False}[args.offline]
    try:
        result = build_book(
            profile,
            root,
            results_dir=args.results_dir,
            reduction=args.reduction,
            offline=offline,
        )
    except BookCheckError as exc:
        print(f"hrtem-book book: FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"book: profile {profile!r}: {result.describe()}")
    if result.kind == "site":
        print(
            "book: for the HTML book run `make book` on a machine with network access "
            "(it needs the book-theme from api.mystmd.org)"
        )
    return 0


def _cli_live(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve()
    return serve_live(args.profile or default_profile(root), root, args.port)


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "book",
        help="execute the figure notebooks and build the book (HTML, or the checked offline site)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--profile", help=f"results profile (default: {DEFAULT_PROFILE}, or gpu if shipped)"
    )
    p.add_argument("--root", default=".", help="project folder holding myst.yml")
    p.add_argument(
        "--results-dir", help="use this database folder as is (default results/<profile>)"
    )
    p.add_argument("--reduction", default="median", choices=REDUCTIONS)
    p.add_argument(
        "--offline",
        default="auto",
        choices=("auto", "yes", "no"),
        help="auto: HTML with the book-theme, the offline site if it cannot be fetched",
    )
    p.add_argument("--check-only", action="store_true", help="only check the last built site")
    p.set_defaults(func=_cli_book)

    p = subparsers.add_parser("live", help="serve the figure notebooks' apps with Voilà")
    p.add_argument("--profile", help="results profile (default as for `book`)")
    p.add_argument("--root", default=".", help="project folder holding notebooks/")
    p.add_argument("--port", type=int, default=8866)
    p.set_defaults(func=_cli_live)
