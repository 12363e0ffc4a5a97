"""Where things live and how they are written: the project layout, atomic writes, provenance.

One project folder (``root``) holds, for every profile::

    data/<profile>/<series>-<hash>.nc             simulated dataset series
    data/<profile>/.chunks/<series>-<hash>/       chunks of a series being simulated
    results/<profile>/records/<study>/<hash>.json  one record per finished run
    results/<profile>/checkpoints/<hash>.pt        one checkpoint per pretraining
    results/<profile>/<study>.nc                   the results database of a study
    _build/book/<profile>/, _build/live/<profile>/ the staged book and the live apps

:class:`Layout` is the only place these paths are joined. Every file is written atomically
(:func:`atomic_write`): into a temporary file in the same folder (``.<name>.<pid>.tmp``), flushed
to disk, then renamed over the target, so a reader sees the old file or the complete new one;
a temporary file left by a killed process is removed by :func:`remove_stale_tmp`.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__

TMP_SUFFIX = ".tmp"
# the project's generated top-level folders (a staged copy of the book links them)
GENERATED_FOLDERS = ("results", "data")


@dataclass(frozen=True)
class Layout:
    """The folders of one profile inside a project folder ``root``; ``data_name`` names the
    data folder where it is not the profile's own (a variant reading its base's series)."""

    root: Path
    profile: str
    data_name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of(cls, root: str | Path, profile) -> Layout:
        """The layout of a :class:`~hrtem_book.profiles.Profile` (its name and data folder)."""
        return cls(Path(root), profile.name, profile.data_name)

    # --- inputs ---------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        """Simulated dataset series of the profile."""
        return self.root / "data" / (self.data_name or self.profile)

    # --- results --------------------------------------------------------------------------------
    @property
    def results_dir(self) -> Path:
        """Records, checkpoints and databases of the profile."""
        return self.root / "results" / self.profile

    def records_dir(self, study: str) -> Path:
        return self.results_dir / "records" / study

    def record_path(self, study: str, run_id: str) -> Path:
        return self.records_dir(study) / f"{run_id}.json"

    @property
    def records_root(self) -> Path:
        return self.results_dir / "records"

    def run_claim(self, run_id: str) -> Path:
        """The lock file a sweep holds while it runs ``run_id`` (from submission until its
        record is written): a second sweep on the same folder waits for it instead of training
        the same run again."""
        return self.records_root / f".{run_id}.lock"

    @property
    def checkpoints_dir(self) -> Path:
        return self.results_dir / "checkpoints"

    def checkpoint_path(self, run_id: str) -> Path:
        return self.checkpoints_dir / f"{run_id}.pt"

    def database_path(self, study: str) -> Path:
        return database_file(self.results_dir, study)

    # --- the book -------------------------------------------------------------------------------
    @property
    def build_dir(self) -> Path:
        return self.root / "_build"

    @property
    def book_stage(self) -> Path:
        """The staged copy of the book that MyST builds."""
        return self.build_dir / "book" / self.profile

    @property
    def live_stage(self) -> Path:
        """The notebooks with the profile's parameters, served by Voilà."""
        return self.build_dir / "live" / self.profile

    @property
    def live_connections(self) -> Path:
        """Voilà's kernel connection files (kept out of the system's temporary folder)."""
        return self.build_dir / "live" / "voila-connections"


def myst_build_dir(book: Path) -> Path:
    """MyST's output folder inside a (staged) book: ``site/``, ``html/``, ``logs/``,
    ``papermill/`` (the executed notebooks)."""
    return Path(book) / "_build"


def myst_execution_cache(book: Path) -> Path:
    """Where ``myst build --execute`` keeps each page's outputs, keyed by the page's source
    (not by the databases and code its cells read)."""
    return myst_build_dir(book) / "execute"


def theme_dir(book: Path) -> Path:
    """Where `myst build --html` finds the book-theme of a (staged) book without downloading it."""
    return myst_build_dir(book) / "templates" / "site" / "myst" / "book-theme"


def database_file(folder: Path, study: str) -> Path:
    """The results database of ``study`` inside a folder of databases."""
    return Path(folder) / f"{study}.nc"


def analysis_cache(folder: Path, name: str) -> Path:
    """A cache of numbers derived from the databases in ``folder`` (``results/<profile>/``):
    ``.cache-<name>.json``, remade whenever its key no longer matches."""
    return folder / f".cache-{name}.json"


def cached_json(
    path: Path,
    key: str,
    make: Callable[[], Any],
    decode: Callable[[Any], Any] = lambda value: value,
    log: Callable[[str], None] = print,
    who: str = "cache",
) -> Any:
    """``decode(make())``, with ``make()``'s JSON value kept in ``path`` under ``key``: read back
    while the key matches, made again when it does not. An unreadable cache is named (one line
    through ``log``), moved aside and made again; a folder that cannot be written leaves the
    value uncached."""
    try:
        data = json.loads(path.read_text())
        if data["key"] == key:
            return decode(data["value"])
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        aside = move_aside(path)
        log(f"{who}: cache {path} is unreadable; moved aside to {aside.name}, made again")
    value = make()
    with contextlib.suppress(OSError):
        atomic_write_text(path, json.dumps({"key": key, "value": value}))
    return decode(value)


def series_file(data_dir: Path, series: str, series_hash: str) -> Path:
    """A finished dataset series inside a data folder."""
    return Path(data_dir) / f"{series}-{series_hash}.nc"


def chunks_root(data_dir: Path) -> Path:
    return Path(data_dir) / ".chunks"


def simulation_lock(data_dir: Path) -> Path:
    """The lock file held while series are simulated into ``data_dir``: two sweeps started
    together on a fresh folder simulate its series once, the second waiting for the first."""
    return Path(data_dir) / ".simulate.lock"


def chunk_dir(data_dir: Path, series: str, series_hash: str) -> Path:
    """Chunks of a series being simulated (removed once the series is merged)."""
    return chunks_root(data_dir) / f"{series}-{series_hash}"


# --- atomic writes ----------------------------------------------------------------------------
def tmp_path(path: Path) -> Path:
    """The temporary file this process writes before renaming it to ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file in the same folder,
    which is flushed to disk and renamed over ``path``; on failure the temporary file goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # readers see the old file or the complete new one
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(folder: Path) -> int:
    """Delete temporary files left in ``folder`` by processes that no longer run (``kill -9``)."""
    removed = 0
    for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
        try:
            pid = int(tmp.name[: -len(TMP_SUFFIX)].rsplit(".", 1)[1])
        except (IndexError, ValueError):
            pid = -1
        if pid == os.getpid() or (pid > 0 and _pid_alive(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


# an environment failure while writing: the disk, not the input (one line, exit 1, rerun)
_STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit reached",
    errno.EROFS: "read-only file system",
}
# libraries that report a failed write in words of their own (netCDF/HDF5, torch's zip writer)
_STORAGE_WORDS = ("NetCDF: HDF error", "unexpected pos", "PytorchStreamWriter failed")


def storage_failure(exc: BaseException) -> str | None:
    """One line saying why a write failed when ``exc`` (or what caused it) is a full, limited
    or read-only disk; None for any other exception."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
            where = f" ({exc.filename})" if exc.filename else ""
            return f"{_STORAGE_ERRNOS[exc.errno]}{where}"
        if isinstance(exc, RuntimeError) and any(w in str(exc) for w in _STORAGE_WORDS):
            return "a file could not be written (disk full or read-only?)"
        exc = exc.__cause__ or exc.__context__
    return None


def check_writable(folder: Path, what: str = "--root") -> Path:
    """Create ``folder`` if needed and prove it writable (a temporary file), before any work is
    done; a one-line ValueError naming ``what`` otherwise (a file in the path, a read-only
    file system, missing permission)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tmp_path(folder / ".write-check")
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ValueError(
            f"{what}: cannot write {folder} ({reason}); allowed: a writable folder"
        ) from None
    return folder


def move_aside(path: Path) -> Path:
    """Rename a damaged file to ``<name>.invalid-<UTC time>`` beside it (never delete: a person
    may want to look at it) and return the new path."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = path.with_name(f"{path.name}.invalid-{stamp}")
    os.replace(path, target)
    return target


class FileClaim:
    """An exclusive advisory lock on the file ``path`` (``flock``: the OS releases it when the
    holder dies); the file is removed on :meth:`release`, so none is left behind.

    Removing it is safe because a waiter that wakes up holding a lock on a file that is no
    longer (or no longer the same file) at ``path`` lets it go and locks the current one."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._handle = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking=False`` return False at once if another holds it."""
        import fcntl  # POSIX only; the sweep's workers run on Linux

        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
        while True:
            handle = open(self.path, "a")  # noqa: SIM115 (closed in release, or below)
            try:
                fcntl.flock(handle, flags)
            except BlockingIOError:
                handle.close()
                return False
            try:
                same = os.path.samestat(os.fstat(handle.fileno()), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self._handle = handle
                return True
            handle.close()  # the holder before us removed it: lock the file there now

    def release(self) -> None:
        import fcntl

        if self._handle is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None


def remove_stale_locks(folder: Path) -> int:
    """Delete the lock files in ``folder`` that no process holds (their holder was killed
    before it could remove them); a held one is left to its holder."""
    removed = 0
    for path in Path(folder).glob("*.lock"):
        claim = FileClaim(path)
        if claim.acquire(blocking=False):
            claim.release()
            removed += 1
    return removed


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """:class:`FileClaim` on ``path`` for the ``with`` block, waiting for it if need be."""
    claim = FileClaim(path)
    claim.acquire()
    try:
        yield
    finally:
        claim.release()


# --- provenance -------------------------------------------------------------------------------
def git_commit(repo: Path | None = None) -> str:
    """Commit of the package's source tree ("" outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=repo or Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def provenance() -> dict[str, str | None]:
    """``package_version`` and ``git_commit`` (None outside a checkout) of this code."""
    return {"package_version": __version__, "git_commit": git_commit() or None}
