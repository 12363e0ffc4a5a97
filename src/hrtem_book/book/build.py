"""Build the executable book: results database → figure notebooks → MyST site → AST check.

Steps of :func:`build_book`:

1. the results database ``results/<profile>/<study>.nc`` of every study exists, else the sweep
   runs (resumably) and its records are collected;
2. every figure notebook runs under papermill with the profile's parameters, which (re)writes the
   static placeholders in ``figures/``;
3. the book is staged in ``_build/book/<profile>/`` with those parameters injected into its
   notebooks (so ``myst --execute`` computes every figure and number from the chosen profile),
   and built with ``myst build --html``; where the book-theme cannot be fetched (offline) with
   ``myst --config book/myst.offline.yml build --site`` instead;
4. the built AST is checked (:func:`hrtem_book.book.check.check_site`), because MyST silently
   drops an embed whose ``#app:``/``#txt:`` label does not exist.

The Jupyter server used by ``--execute`` is started here and stopped by its PID: left to itself,
mystmd starts one per build, refuses to run it as root, and leaves it running.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .. import findings, results
from ..database import check_reduction
from ..layout import (
    GENERATED_FOLDERS,
    Layout,
    analysis_cache,
    myst_build_dir,
    myst_execution_cache,
    theme_dir,
)
from ..profiles import Profile
from ..studies import STUDY_NAMES
from .check import BookCheckError, check_site
from .notebooks import (
    NOTEBOOK_TIMEOUT_S,
    Log,
    check_placeholders,
    execute_notebooks,
    figure_notebooks,
    inject_page_parameters,
)
from .pages import prepare as prepare_numbers
from .parameters import missing_studies
from .processes import Background, error_rates_beside, jupyter_server

OFFLINE_CONFIG = "book/myst.offline.yml"
# what the book is made of, relative to the project root (copied into the staging folder)
BOOK_SOURCES = ("myst.yml", "refs.bib", "book", "chapters", "figures", "notebooks")
# mystmd prints these when it cannot download a site template (no network, no theme server)
_THEME_FETCH_FAILED = re.compile(
    r"(api\.mystmd\.org/templates\S*\s+failed|Could not find template|ENOTFOUND|EAI_AGAIN"
    r"|ECONNREFUSED|ETIMEDOUT|getaddrinfo)"
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
def ensure_database(profile: Profile, root: str | Path = ".", log: Log = print) -> Path:
    """``results/<profile>/``, running the sweep (resumably) and collecting it where incomplete."""
    layout = Layout.of(root, profile)
    results_dir = layout.results_dir
    restamp = []
    for study in STUDY_NAMES:
        path = layout.database_path(study)
        if not path.is_file():
            continue
        # damaged, or written by another schema: derived, so rebuilt below
        ds = results.load_or_set_aside(path, study, log, "book", ", rebuilding it from the records")
        if ds is None:
            continue
        if findings.stale({study: ds}) and layout.records_root.is_dir():
            restamp.append(study)
    if restamp:  # the records decide the numbers; the stamp says which rules score them
        log(f"book: {', '.join(restamp)} carry another rule set than this code's "
            f"{findings.ruleset_sha()}; collecting them again from the records")  # fmt: skip
        findings.collect(profile, root, restamp, log=log)
    missing = missing_studies(results_dir)
    if missing:
        log(f"book: results database incomplete in {results_dir} (missing {', '.join(missing)});")
        log(f"book: running the sweep for profile {profile.name!r} (resumes from finished records)")
        # one single-threaded Dask worker per core (a 2-core laptop: 2); one core: in-process
        cores = os.cpu_count() or 1
        executor = "dask" if cores > 1 else "inprocess"
        from .. import sweep  # torch: only where a database is missing

        sweep.run_sweep(
            missing, profile, root, executor=executor, workers=cores, sim_workers=cores, log=log
        )
        findings.collect(profile, root, log=log)
        missing = missing_studies(results_dir)
        if missing:
            raise FileNotFoundError(
                f"the sweep left no database for {', '.join(missing)} in {results_dir}"
            )
    return results_dir


# --- staging -------------------------------------------------------------------------------
def relative_to_notebooks(path: Path, root: Path) -> str:
    """``path`` as the notebooks see it: relative to ``notebooks/`` inside the project, else
    absolute (papermill runs with cwd = notebooks/, as does a staged copy)."""
    path = path.resolve()
    try:
        path.relative_to(root.resolve())
    except ValueError:
        return str(path)
    return os.path.relpath(path, root.resolve() / "notebooks")


def stage_book(
    root: Path, stage: Path, notebooks: Iterable[Path], values: dict | None = None
) -> Path:
    """Copy the book's sources into ``stage`` with ``notebooks`` (parameters injected) in place
    of the committed ones and ``values`` injected into the chapters' parameters cells;
    ``stage/results`` and ``stage/data`` link to the project's."""
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
                mark_executed(nb, dst / nb.name)
        elif src.is_dir():
            shutil.copytree(src, dst)
        elif src.is_file():
            shutil.copy2(src, dst)
    if values:
        for page in sorted((stage / "chapters").glob("*.md")):
            page.write_text(inject_page_parameters(page.read_text(), values))
    link_shared(root, stage)
    return stage


def mark_executed(src: Path, dst: Path) -> None:
    """Copy notebook ``src`` to ``dst``; a papermill output is marked for MyST as executed (page
    frontmatter ``execute: {skip: true}``, read from the notebook metadata), so that
    ``myst --execute`` keeps its outputs instead of running it a second time (about 20 s of the
    laptop build), as an unnumbered appendix page that shows papermill's injected parameters
    cell only. Any other notebook is copied as it is and executed by MyST, as the chapters
    are."""
    nb = json.loads(src.read_text())
    if "papermill" not in nb.get("metadata", {}):
        shutil.copy2(src, dst)
        return
    nb["metadata"]["execute"] = {"skip": True}
    # an appendix page: no chapter number, no section numbers
    nb["metadata"]["numbering"] = {"title": False, "headings": False}
    # the reader sees the parameters the figure was drawn with (papermill's injected cell), not
    # also the defaults they replaced
    injected = any("injected-parameters" in _tags(c) for c in nb.get("cells", []))
    for cell in nb.get("cells", []):
        if injected and "parameters" in _tags(cell):
            cell.setdefault("metadata", {}).setdefault("tags", []).append("remove-cell")
    dst.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    shutil.copystat(src, dst)


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def link_shared(root: Path, stage: Path) -> None:
    """Link the project's generated folders into ``stage`` (the notebooks read them there)."""
    for name in GENERATED_FOLDERS:
        link = stage / name
        if not link.exists():
            (root / name).mkdir(exist_ok=True)
            link.symlink_to((root / name).resolve(), target_is_directory=True)


# the command line tools that build the book: mystmd itself, or Jupyter Book 2, which drives the
# same MyST engine and reads the same myst.yml
ENGINES = ("myst", "jupyter-book")


def myst_executable(engine: str = "myst") -> str:
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}; allowed: {', '.join(ENGINES)}")
    local = Path(sys.executable).parent / engine
    found = str(local) if local.exists() else shutil.which(engine)
    if not found:
        raise FileNotFoundError(
            f"the `{engine}` command is missing; install the book extra: make setup"
        )
    return found


def run_myst(
    args: list[str], cwd: Path, env: dict, log: Log = print, engine: str = "myst"
) -> tuple[int, str]:
    """Run ``<engine> <args>`` in ``cwd``; return its exit status and output (also logged)."""
    proc = subprocess.run(
        [myst_executable(engine), *args],
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
            log(f"  {engine}: (previous line repeated {repeats} more times)")
            repeats = 0
        lines.append(line)
        log(f"  {engine}: {line}")
    return proc.returncode, "\n".join(lines)


def install_theme(stage: Path, installer: str | Path | None, log: Log = print) -> bool:
    """Give the staged book its book-theme with ``installer`` (``installer BOOK_DIR``, e.g.
    ``../shared/tools/install-book-theme``) unless it has one; whether it has one afterwards."""
    if (theme_dir(stage) / "template.yml").is_file():
        return True
    if installer is None:
        return False
    installer = Path(installer)
    if not installer.is_file():
        raise FileNotFoundError(f"--theme-installer {installer}: no such file")
    proc = subprocess.run(
        [str(installer.resolve()), str(stage)], capture_output=True, text=True, check=False
    )
    if proc.returncode or not (theme_dir(stage) / "template.yml").is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no theme written"]
        raise BookCheckError([f"theme installer {installer} failed: {tail[0]}"], str(stage))
    log(f"book: book-theme installed by {installer}")
    return True


def theme_unavailable(returncode: int, output: str) -> bool:
    """Whether a failed ``myst build --html`` failed because the theme could not be fetched."""
    return returncode != 0 and bool(_THEME_FETCH_FAILED.search(output))


def build_site(
    stage: Path,
    *,
    offline: bool | None = None,
    jobs: int = 1,
    engine: str = "myst",
    log: Log = print,
) -> tuple[str, Path]:
    """Build the staged book: HTML with the book-theme (``engine``: ``myst`` or
    ``jupyter-book``), else (offline) the checked AST site."""
    runtime = myst_build_dir(stage) / "logs"
    # MyST reuses a page's outputs while its source is unchanged: a chapter reading a database
    # (or code) that changed since would show the old numbers. Every build executes them anew.
    shutil.rmtree(myst_execution_cache(stage), ignore_errors=True)
    with jupyter_server(stage, runtime / "jupyter-server.log") as env:
        if offline is not True:
            args = ["build", "--html", "--execute", f"--execute-parallel={jobs}", "--strict"]
            log(f"book: {engine} " + " ".join(args))
            rc, output = run_myst(args, stage, env, log, engine)
            if rc == 0:
                check_site(myst_build_dir(stage) / "site", stage / "chapters", output)
                return "html", myst_build_dir(stage) / "html"
            if offline is False or not theme_unavailable(rc, output):
                raise BookCheckError([f"{engine} build --html failed with status {rc}"], str(stage))
            log("book: the book-theme cannot be fetched (offline?): building the offline site")
        args = ["--config", OFFLINE_CONFIG, "build", "--site", "--execute", "--strict"]
        args.append(f"--execute-parallel={jobs}")
        log("book: myst " + " ".join(args))
        rc, output = run_myst(args, stage, env, log)
        site = myst_build_dir(stage) / "site"
        try:
            check_site(site, stage / "chapters", output)
        except BookCheckError as exc:
            status = [f"myst build --site failed with status {rc}"] if rc else []
            raise BookCheckError(status + exc.problems, str(site)) from None
        if rc:
            raise BookCheckError([f"myst build --site failed with status {rc}"], str(stage))
        return "site", site


def _prepare_numbers(results_dir: str | Path, rates: Background | None) -> None:
    """The chapters' shared numbers, once the error rates simulated beside the sweep (if any)
    are in their cache."""
    if rates is not None:
        rates.wait()
    prepare_numbers(results_dir)


def _timed(fn, *args) -> float:
    """Seconds ``fn(*args)`` took."""
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def build_book(
    profile: Profile,
    root: str | Path = ".",
    *,
    results_dir: str | Path | None = None,
    reduction: str = "median",
    offline: bool | None = None,
    jobs: int | None = None,
    parameters: dict | None = None,
    theme_installer: str | Path | None = None,
    engine: str = "myst",
    notebook_timeout_s: float = NOTEBOOK_TIMEOUT_S,
    log: Log = print,
) -> BuildResult:
    """Database → papermill → staged MyST build → AST check (see the module docstring).

    ``results_dir`` given: use that database as is (tests); otherwise ``results/<profile>/``,
    completed by the sweep where a study is missing. ``offline``: None tries HTML first.
    ``jobs``: notebooks executed at once (default: one more than the CPU count, at most 4).
    ``parameters``: more notebook parameters (e.g. ``project_root``), given to the notebooks that
    declare them. Where the sweep runs, the rules' error rates are simulated beside it
    (:func:`~hrtem_book.book.processes.error_rates_beside`).
    ``theme_installer``: a script that installs the book-theme into the staged book (the HTML
    build then needs no network). ``engine``: ``myst`` (mystmd) or ``jupyter-book`` (Jupyter
    Book 2, the same MyST engine) builds the HTML. A notebook still running after
    ``notebook_timeout_s`` is stopped and run once more (:func:`execute_notebooks`).
    """
    # one more than the cores: a kernel waits (start-up, messages, files) for part of its time.
    # Two AVX2 cores, the laptop book from its databases: 118-119 s with 3, 132-133 s with 2
    jobs = jobs or min(4, (os.cpu_count() or 1) + 1)
    check_reduction(reduction, name="reduction")
    myst_executable(engine)  # a bad engine or a missing tool: before any work
    root = Path(root).resolve()
    layout = Layout.of(root, profile)
    notebooks = figure_notebooks(root)
    if not notebooks:
        raise FileNotFoundError(f"no figure notebooks in {root / 'notebooks'}")
    with contextlib.ExitStack() as stack:
        rates = None
        if results_dir is None:
            # the rules' error rates need no result: simulated beside the sweep in its idle
            # moments (a child at the lowest priority), they are ready when the chapters'
            # numbers are computed beside the notebooks
            cache = analysis_cache(layout.results_dir, "power")
            rates = stack.enter_context(error_rates_beside(profile.name, cache))
            results_dir = ensure_database(profile, root, log)
            rates.hurry()
        elif missing := missing_studies(results_dir):
            raise FileNotFoundError(f"no database for {', '.join(missing)} in {results_dir}")
        values = {
            "profile": profile.name,
            "results_dir": relative_to_notebooks(Path(results_dir), root),
            "reduction": reduction,
            **(parameters or {}),
        }
        started = time.time() - 1.0  # file systems with 1 s mtime resolution
        log(f"book: executing {len(notebooks)} notebooks with papermill ({values})")
        out = myst_build_dir(layout.book_stage) / "papermill"
        # meanwhile, in this otherwise waiting process: the numbers several chapters read (the
        # findings' bootstrap over test images, the rules' error rates), computed once
        with ThreadPoolExecutor(max_workers=1) as pool:
            numbers = pool.submit(_timed, _prepare_numbers, results_dir, rates)
            executed = execute_notebooks(
                notebooks, out, values, jobs=jobs, log=log, timeout_s=notebook_timeout_s
            )
            log(f"book: the chapters' shared numbers (bootstrap, error rates) in "
                f"{numbers.result():.1f} s, beside the notebooks")  # fmt: skip
    stage = layout.book_stage
    chapters = sorted((root / "chapters").glob("*.md"))
    if problems := check_placeholders(chapters, started):
        raise BookCheckError(problems, where="placeholders")
    stage_book(root, stage, executed, values)
    if offline is not True:
        install_theme(stage, theme_installer, log)
    kind, path = build_site(stage, offline=offline, jobs=jobs, engine=engine, log=log)
    return BuildResult(kind, path, stage, executed)
