"""Run the study grids: resumable, atomic, on one process or a Dask cluster.

    hrtem-book sweep --study all --profile laptop
    hrtem-book sweep --study defocus --profile paper --executor dask --workers 2
    hrtem-book sweep --study defocus --profile paper --executor dask --cluster slurm.yaml

Every run is identified by its config hash and, once finished, recorded as
``<root>/results/<profile>/records/<study>/<hash>.json`` (written to a temporary file in the same
folder, flushed, then ``os.replace``d, so a record is either complete or absent). A rerun skips
every recorded run; ``retry_failed`` reruns the failed ones. After a ``kill -9`` only the runs in
flight are redone; their stale temporary files are removed on the next start.

Pretrainings are scheduled first; each transfer run is released when the pretraining whose
checkpoint it loads has finished (one pretraining serves every transfer run sharing its domain,
learning rate and seed). A transfer run whose pretraining failed is recorded as failed without
running. Records are written by this (client) process only, never by workers.

Executors: ``inprocess`` (default, one run after another) and ``dask``: a ``LocalCluster`` of
``workers`` single-threaded processes, an existing scheduler (``scheduler_address``), or a
cluster described by a YAML file (``--cluster``)::

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

import argparse
import json
import os
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .config import PretrainConfig, RunConfig, TransferConfig, config_hash, to_jsonable
from .profiles import Profile, get_profile
from .studies import STUDIES, STUDY_NAMES, build_grid

RunFn = Callable[..., dict]
RECORD_STATUSES = ("ok", "failed")
_TMP_SUFFIX = ".tmp"


# --- records ------------------------------------------------------------------------------------
def profile_dir(root: str | Path, profile: str) -> Path:
    """``<root>/results/<profile>``: checkpoints, records and databases of a profile."""
    return Path(root) / "results" / profile


def records_dir(root: str | Path, profile: str, study: str) -> Path:
    return profile_dir(root, profile) / "records" / study


def _kind(cfg: RunConfig) -> str:
    return {"PretrainConfig": "pretrain", "TransferConfig": "transfer"}.get(
        type(cfg).__name__, "mixture"
    )


def failure_record(cfg: RunConfig, error: str) -> dict:
    """A record of a run that did not finish (same keys as a training record)."""
    return {
        "config_hash": config_hash(cfg),
        "kind": _kind(cfg),
        "config": to_jsonable(cfg),
        "status": "failed",
        "error": error,
        "stages": {},
        "trainable_params": None,
        "total_params": None,
        "package_version": __version__,
        "git_commit": None,
    }


def write_record(path: Path, record: dict) -> None:
    """Write ``record`` as JSON atomically: temporary file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
    with open(tmp, "w") as fh:
        json.dump(record, fh, indent=1, sort_keys=True, allow_nan=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_record(path: Path) -> dict | None:
    """A finished record, or None if absent or unusable (then the run is redone and rewritten)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("config_hash") != path.stem:
        return None
    if record.get("status") not in RECORD_STATUSES:
        return None
    return record


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(folder: Path) -> int:
    """Delete temporary record files left by processes that no longer run (after ``kill -9``)."""
    removed = 0
    for tmp in folder.glob(f".*{_TMP_SUFFIX}"):
        try:
            pid = int(tmp.name[: -len(_TMP_SUFFIX)].rsplit(".", 1)[1])
        except (IndexError, ValueError):
            pid = -1
        if pid == os.getpid() or (pid > 0 and _pid_alive(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def drop_failed_checkpoint(cfg: PretrainConfig, run_root: Path) -> bool:
    """Delete the checkpoint of a diverged pretraining before it is retried; True if deleted.

    ``train.run`` stores a diverged pretraining as a checkpoint without weights, so that its
    transfer runs fail at once instead of each retraining it; left in place, a retry would only
    reload that recorded failure. A checkpoint that holds weights (or cannot be read) is kept.
    """
    from . import train  # lazily: only when a failed pretraining is retried

    path = train.checkpoint_path(run_root, cfg)
    if not path.is_file():
        return False
    try:
        ckpt = train.load_checkpoint(path, cfg)
    except ValueError:  # unreadable or another config: train.run reports it when the run starts
        return False
    if ckpt.get("state_dict") is not None:
        return False
    path.unlink(missing_ok=True)
    return True


# --- running one config (on a worker or in process) -------------------------------------------
def train_run(cfg: RunConfig, *, root: Path, device: str = "cpu") -> dict:
    """The real run function: :func:`hrtem_book.train.run` (``root`` = ``results/<profile>``)."""
    from . import train  # imported lazily: workers import torch only when they run

    return train.run(cfg, root=root, device=device)


def execute(cfg: RunConfig, root: str, device: str = "cpu", run_fn: RunFn | None = None) -> dict:
    """Run one config and return its record; exceptions become a failed record, never escape.

    Workers use one torch thread each: several training processes share the cores.
    """
    import torch

    torch.set_num_threads(1)
    h = config_hash(cfg)
    try:
        record = (run_fn or train_run)(cfg, root=Path(root), device=device)
    except Exception as exc:  # a crash of one run must not stop the sweep
        tail = traceback.format_exc(limit=-3)
        return failure_record(cfg, f"{type(exc).__name__}: {exc}\n{tail}")
    if not isinstance(record, dict) or record.get("status") not in RECORD_STATUSES:
        return failure_record(cfg, f"run returned a malformed record: {str(record)[:200]}")
    if record.get("config_hash") != h:
        return failure_record(cfg, f"record hash {record.get('config_hash')!r} is not {h!r}")
    return record


# --- executors ------------------------------------------------------------------------------
class _Done:
    """Handle of a run that already finished (hashable by identity)."""

    def __init__(self, record: dict):
        self.record = record


class InProcessExecutor:
    """Runs each submitted config immediately, in this process."""

    capacity = 1

    def __init__(self, root: Path, device: str, run_fn: RunFn | None):
        self.root, self.device, self.run_fn = str(root), device, run_fn

    def submit(self, cfg: RunConfig, priority: int = 0) -> Any:
        return _Done(execute(cfg, self.root, self.device, self.run_fn))

    def wait_any(self, handles: list) -> list[tuple[Any, dict]]:
        return [(h, h.record) for h in handles]

    def close(self) -> None:
        pass


class DaskExecutor:
    """Runs configs on a Dask distributed cluster (local processes, SLURM jobs, or a scheduler)."""

    capacity = 10**9  # submit everything that is ready; the scheduler queues it

    def __init__(
        self,
        root: Path,
        device: str,
        run_fn: RunFn | None,
        *,
        workers: int = 2,
        cluster_config: dict | None = None,
        scheduler_address: str | None = None,
    ):
        from distributed import Client

        self.root, self.device, self.run_fn = str(Path(root).resolve()), device, run_fn
        self.cluster = None
        if scheduler_address:
            self.client = Client(scheduler_address)
        else:
            self.cluster = make_cluster(cluster_config or {"kind": "local"}, workers)
            self.client = Client(self.cluster)

    def submit(self, cfg: RunConfig, priority: int = 0) -> Any:
        return self.client.submit(
            execute,
            cfg,
            self.root,
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
                out.append((fut, {"_error": f"{type(exc).__name__}: {exc}"}))
        return out

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


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
    return cfg


def make_cluster(cfg: dict, workers: int = 2, *, scale: bool = True):
    """A LocalCluster (``kind: local``) or dask-jobqueue SLURMCluster (``kind: slurm``).

    ``scale=False`` builds a SLURM cluster without submitting jobs (to inspect its job script).
    """
    kind = cfg.get("kind", "local")
    kwargs = dict(cfg.get("cluster", {}))
    # worker processes inherit this: one BLAS/OpenMP thread per single-threaded worker
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if kind == "local":
        from distributed import LocalCluster

        if workers < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        kwargs.setdefault("n_workers", workers)
        kwargs.setdefault("threads_per_worker", 1)
        kwargs.setdefault("processes", True)
        kwargs.setdefault("dashboard_address", None)
        return LocalCluster(**kwargs)
    if kind == "slurm":
        from dask_jobqueue import SLURMCluster

        kwargs.setdefault("job_script_prologue", ["export OMP_NUM_THREADS=1"])
        cluster = SLURMCluster(**kwargs)
        if scale:
            cluster.scale(jobs=int(cfg.get("jobs", 1)))
        return cluster
    raise ValueError(f"cluster kind={kind!r}; allowed: local, slurm")


# --- the sweep ----------------------------------------------------------------------------------
@dataclass
class SweepSummary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    wall_s: float = 0.0
    failures: list[str] = field(default_factory=list)

    def line(self, label: str) -> str:
        return (
            f"{label}: {self.done} done, {self.skipped} skipped, {self.failed} failed "
            f"in {self.wall_s:.1f} s"
        )


@dataclass
class _Task:
    study: str
    hash: str
    cfg: RunConfig
    path: Path


def prepare_data(
    studies: Iterable[str], profile: Profile, root: Path, *, workers: int = 1, progress: bool = True
) -> None:
    """Simulate every dataset series the studies train on, before any run starts.

    Done here, once, so that concurrent workers never generate the same series side by side.
    """
    from . import datasets

    data_root = Path(root) / "data" / profile.name
    for series in dict.fromkeys(STUDIES[s].series for s in studies):
        if not datasets.series_path(series, profile.data, data_root).exists():
            datasets.generate(series, profile.data, data_root, workers=workers, progress=progress)


def plan(studies: Iterable[str], profile: Profile, root: Path) -> list[_Task]:
    """Every distinct run of the studies, pretrainings first, with its record path."""
    pre, rest = [], []
    for study in studies:
        grid = build_grid(study, profile)
        folder = records_dir(root, profile.name, study)
        for h, cfg in grid.pretrains.items():
            pre.append(_Task(study, h, cfg, folder / f"{h}.json"))
        for h, cfg in grid.runs.items():
            rest.append(_Task(study, h, cfg, folder / f"{h}.json"))
    return pre + rest


def run_sweep(
    studies: str | Sequence[str],
    profile: Profile | str,
    root: str | Path = ".",
    *,
    executor: str = "inprocess",
    workers: int = 2,
    cluster_config: dict | None = None,
    scheduler_address: str | None = None,
    retry_failed: bool = False,
    device: str = "cpu",
    sim_workers: int = 1,
    run_fn: RunFn | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> SweepSummary:
    """Run every missing run of ``studies`` for ``profile``; return the counts.

    ``root`` is the project folder holding ``data/`` and ``results/``. ``run_fn(cfg, *, root,
    device) -> record`` (``root`` = ``results/<profile>``) replaces :func:`train_run`; tests
    inject cheap functions (on Dask it must be importable by the workers). Missing dataset
    series are simulated first, in ``sim_workers`` processes.
    """
    t0 = time.perf_counter()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    profile = get_profile(profile) if isinstance(profile, str) else profile
    studies = expand_studies(studies)
    if executor not in ("inprocess", "dask"):
        raise ValueError(f"executor={executor!r}; allowed: inprocess, dask")
    root = Path(root)
    tasks = plan(studies, profile, root)
    for folder in {t.path.parent for t in tasks}:
        if folder.is_dir():
            remove_stale_tmp(folder)

    summary = SweepSummary()
    records: dict[str, dict] = {}
    todo: list[_Task] = []
    if run_fn is None:
        prepare_data(studies, profile, root, workers=sim_workers, progress=progress)
    # runs see results/<profile> (checkpoints there; data/<profile> beside results/)
    run_root = profile_dir(root, profile.name).resolve()
    for task in tasks:
        rec = read_record(task.path)
        if rec is not None and (rec["status"] == "ok" or not retry_failed):
            records[task.hash] = rec
            summary.skipped += 1
        else:
            if rec is not None and isinstance(task.cfg, PretrainConfig):
                drop_failed_checkpoint(task.cfg, run_root)
            todo.append(task)

    # transfer runs wait for the pretraining whose checkpoint they load
    pending_pre = {t.hash for t in todo if _kind(t.cfg) == "pretrain"}
    waiting: dict[str, list[_Task]] = {}
    ready: deque[_Task] = deque()
    for task in todo:
        dep = config_hash(task.cfg.pretrain) if isinstance(task.cfg, TransferConfig) else None
        if dep in pending_pre:
            waiting.setdefault(dep, []).append(task)
        else:
            ready.append(task)

    if executor == "inprocess" or not todo:
        ex: Any = InProcessExecutor(run_root, device, run_fn)
    else:
        ex = DaskExecutor(
            run_root,
            device,
            run_fn,
            workers=workers,
            cluster_config=cluster_config,
            scheduler_address=scheduler_address,
        )
    bar = _progress(len(todo), progress and bool(todo))

    def finish(task: _Task, record: dict) -> None:
        record = dict(record)
        record.setdefault("finished_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        record.setdefault("host", socket.gethostname())
        write_record(task.path, record)
        records[task.hash] = record
        if record["status"] == "ok":
            summary.done += 1
        else:
            summary.failed += 1
            first = (record.get("error") or "").splitlines()[:1]
            summary.failures.append(f"{task.study}/{task.hash}: {' '.join(first)}")
        bar.update(1)
        for dep in waiting.pop(task.hash, []):
            if record["status"] == "ok":
                ready.append(dep)
            else:
                finish(dep, failure_record(dep.cfg, f"pretraining {task.hash} failed"))

    in_flight: dict[Any, _Task] = {}
    try:
        while ready or in_flight:
            while ready and len(in_flight) < ex.capacity:
                task = ready.popleft()
                priority = 1 if _kind(task.cfg) == "pretrain" else 0
                in_flight[ex.submit(task.cfg, priority=priority)] = task
            for handle, record in ex.wait_any(list(in_flight)):
                task = in_flight.pop(handle)
                if "_error" in record:
                    record = failure_record(task.cfg, record["_error"])
                finish(task, record)
    finally:
        ex.close()
        bar.close()
    summary.wall_s = time.perf_counter() - t0
    log(summary.line(f"sweep {','.join(studies)} (profile {profile.name})"))
    for line in summary.failures[:10]:
        log(f"  failed {line}")
    return summary


def expand_studies(studies: str | Sequence[str]) -> list[str]:
    names = [studies] if isinstance(studies, str) else list(studies)
    out: list[str] = []
    for name in names:
        if name == "all":
            out.extend(STUDY_NAMES)
        elif name in STUDY_NAMES:
            out.append(name)
        else:
            raise ValueError(f"unknown study {name!r}; allowed: {', '.join(STUDY_NAMES)}, all")
    return list(dict.fromkeys(out))


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="runs", unit="run", disable=not enabled, dynamic_ncols=True)


# --- command line ---------------------------------------------------------------------------------
def _cli(args: argparse.Namespace) -> int:
    cluster_config = load_cluster_config(args.cluster) if args.cluster else None
    executor = "dask" if (cluster_config or args.scheduler) else args.executor
    device = args.device or (cluster_config or {}).get("device", "cpu")
    summary = run_sweep(
        args.study,
        args.profile,
        args.root,
        executor=executor,
        workers=args.workers,
        cluster_config=cluster_config,
        scheduler_address=args.scheduler,
        retry_failed=args.retry_failed,
        device=device,
        sim_workers=args.sim_workers,
    )
    return 1 if summary.failed else 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="run a study grid (resumable; records under results/<profile>/records)",
        description="\n\n".join(__doc__.split("\n\n")[:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--study", required=True, choices=(*STUDY_NAMES, "all"))
    p.add_argument("--profile", required=True, help="profile name, e.g. smoke, laptop, paper")
    p.add_argument("--root", default=".", help="project folder holding data/ and results/")
    p.add_argument("--executor", default="inprocess", choices=("inprocess", "dask"))
    p.add_argument("--workers", type=int, default=2, help="Dask LocalCluster worker processes")
    p.add_argument("--cluster", help="YAML file describing a Dask cluster (kind: local|slurm)")
    p.add_argument("--scheduler", help="address of a running Dask scheduler (tcp://host:port)")
    p.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed")
    p.add_argument("--sim-workers", type=int, default=1, help="processes simulating data")
    p.add_argument("--device", default=None, help="torch device of the runs (default cpu)")
    p.set_defaults(func=_cli)
