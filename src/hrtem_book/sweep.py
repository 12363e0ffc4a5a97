"""Run the study grids: resumable, atomic, on one process or a Dask cluster.

    hrtem-book sweep --study all --profile laptop
    hrtem-book sweep --study defocus --profile paper --executor dask --workers 2
    hrtem-book sweep --study defocus --profile paper --executor dask --cluster slurm.yaml

Every run is identified by its config hash and, once finished, recorded as
``<root>/results/<profile>/records/<study>/<hash>.json`` (:mod:`hrtem_book.records`; written
atomically, so a record is either complete or absent). A rerun skips every recorded run;
``retry_failed`` reruns the failed ones. After a ``kill -9`` only the runs in flight are redone;
their stale temporary files are removed on the next start.

Pretrainings are scheduled first; each transfer run is released when the pretraining whose
checkpoint it loads has finished (one pretraining serves every transfer run sharing its domain,
learning rate and seed). A transfer run whose pretraining failed is recorded as failed without
running. Records are written by this (client) process only, never by workers. Where the runs
execute — in this process, or on a Dask cluster — is :mod:`hrtem_book.executors`' job.
"""

from __future__ import annotations

import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import datasets
from .checkpoints import drop_failed_checkpoint
from .config import RunConfig, config_hash
from .executors import (
    EXECUTORS,
    INFRASTRUCTURE,
    DaskExecutor,
    InProcessExecutor,
    RunFn,
    StackedExecutor,
)
from .layout import FileClaim, Layout, remove_stale_locks, remove_stale_tmp
from .profiles import PROFILES, Profile
from .records import failure_record, read_record, write_record
from .simulate import check_device
from .studies import STUDIES, build_grid, expand_studies
from .train import check_precision

# --- the sweep ----------------------------------------------------------------------------------


@dataclass
class SweepSummary:
    """Counts of a sweep: ``failed`` runs are recorded model failures (final, redone only with
    ``retry_failed``); ``errors`` are runs that raised (not recorded, redone next time)."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    errors: int = 0
    unstarted: int = 0
    wall_s: float = 0.0
    failures: list[str] = field(default_factory=list)

    def line(self, label: str) -> str:
        errors = f", {self.errors} errors (not recorded; retried next run)" if self.errors else ""
        late = f", {self.unstarted} not started (deadline)" if self.unstarted else ""
        return (
            f"{label}: {self.done} done, {self.skipped} skipped, {self.failed} failed{errors}"
            f"{late} in {self.wall_s:.1f} s"
        )


@dataclass
class _Task:
    study: str
    hash: str
    cfg: RunConfig
    path: Path


def prepare_data(
    studies: Iterable[str],
    profile: Profile,
    layout: Layout,
    *,
    workers: int = 1,
    progress: bool = True,
    device: str = "cpu",
) -> None:
    """Simulate every dataset series the studies train on, before any run starts (on ``device``
    when it is a GPU: batched multislice in this process).

    Done here, once, so that concurrent workers never generate the same series side by side.
    """
    data_root = layout.data_dir
    sim_device = device if device.startswith("cuda") else "cpu"
    missing = []
    for series in dict.fromkeys(STUDIES[s].series for s in studies):
        damaged = datasets.discard_damaged(series, profile.data, data_root)
        if damaged or not datasets.series_path(series, profile.data, data_root).exists():
            missing.append(series)
    if missing:  # in one pass: series that show the same scenes simulate them once
        datasets.generate(
            missing[0], profile.data, data_root, workers=workers, progress=progress,
            device=sim_device, with_series=tuple(missing[1:]),
        )  # fmt: skip


def plan(studies: Iterable[str], profile: Profile, layout: Layout) -> list[_Task]:
    """Every distinct run of the studies, pretrainings first, with its record path."""
    pre, rest = [], []
    for study in studies:
        grid = build_grid(study, profile)
        for h, cfg in grid.pretrains.items():
            pre.append(_Task(study, h, cfg, layout.record_path(study, h)))
        for h, cfg in grid.runs.items():
            rest.append(_Task(study, h, cfg, layout.record_path(study, h)))
    return pre + rest


def check_profile_compute(profile: Profile, device: str) -> None:
    """One-line ValueError before any work if ``device`` cannot train ``profile`` here (an
    unknown device, or bf16 on a CPU without native bf16)."""
    check_device(device)
    fp32 = [p.name for p in PROFILES.values() if p.precisions == ("fp32",)]
    allowed = f"the fp32 profiles ({', '.join(fp32)})"
    check_precision(profile.precisions, device, what=f"--profile {profile.name}", allowed=allowed)


def run_sweep(
    studies: str | Sequence[str],
    profile: Profile,
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
    max_stack: int = 64,
    deadline_s: float | None = None,
) -> SweepSummary:
    """Run every missing run of ``studies`` for ``profile``; return the counts (of distinct
    runs: a config that several studies share runs once and is recorded in each).

    ``root`` is the project folder holding ``data/`` and ``results/`` (see
    :class:`~hrtem_book.layout.Layout`). ``run_fn(cfg, *, layout, device) -> record`` replaces
    :func:`hrtem_book.executors.train_run`; tests inject cheap functions (on Dask it must be
    importable by the workers; the stacked engine trains groups, not single runs, and refuses
    one). Missing dataset series are simulated first, in ``sim_workers``
    processes (on ``device`` when it is a GPU). ``executor="stacked"`` trains the runs in this
    process as stacks of up to ``max_stack`` models (:mod:`hrtem_book.stacked`). With
    ``deadline_s``, no new run starts after that many seconds: a campaign with a fixed budget
    stops cleanly, its unstarted runs left missing (``SweepSummary.unstarted``).
    """
    t0 = time.perf_counter()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    studies = expand_studies(studies)
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r}; allowed: {', '.join(EXECUTORS)}")
    if run_fn is not None and executor == "stacked":
        raise ValueError(
            "run_fn with executor='stacked': the stacked engine trains groups of runs, not one "
            "run at a time; allowed: executor 'inprocess' or 'dask'"
        )
    check_profile_compute(profile, device)
    layout = Layout.of(root, profile)
    tasks = plan(studies, profile, layout)
    # temporary and lock files of killed processes: records, checkpoints, series being merged
    for folder in {t.path.parent for t in tasks} | {layout.checkpoints_dir, layout.data_dir}:
        if folder.is_dir():
            remove_stale_tmp(folder)
    for folder in (layout.records_root, layout.checkpoints_dir, layout.data_dir):
        if folder.is_dir():
            remove_stale_locks(folder)

    summary = SweepSummary()
    records: dict[str, dict] = {}
    todo: list[_Task] = []
    if run_fn is None:
        prepare_data(
            studies, profile, layout, workers=sim_workers, progress=progress, device=device
        )
    # one run per config: studies that share a config (a generalization model that is a transfer
    # study's pretraining) share its run, and each keeps a copy of the record in its own folder
    shared: dict[str, list[_Task]] = {}
    for task in tasks:
        shared.setdefault(task.hash, []).append(task)
    for h, group in shared.items():
        recs = [read_record(t.path, log=log) for t in group]
        kept = [r for r in recs if r is not None and (r["status"] == "ok" or not retry_failed)]
        if kept:
            for t, r in zip(group, recs, strict=True):
                if r is None:
                    write_record(t.path, kept[0])  # the same run, recorded by another study
            records[h] = kept[0]
            summary.skipped += 1
        else:
            if any(r is not None for r in recs) and group[0].cfg.kind == "pretrain":
                drop_failed_checkpoint(layout, group[0].cfg)
            todo.append(group[0])

    # transfer runs wait for the pretraining whose checkpoint they load
    pending_pre = {t.hash for t in todo if t.cfg.kind == "pretrain"}
    waiting: dict[str, list[_Task]] = {}
    ready: deque[_Task] = deque()
    for task in todo:
        dep = config_hash(task.cfg.loads) if task.cfg.loads is not None else None
        if dep in pending_pre:
            waiting.setdefault(dep, []).append(task)
        else:
            ready.append(task)

    if executor == "inprocess" or not todo:
        ex: Any = InProcessExecutor(layout, device, run_fn)
    elif executor == "stacked":
        ex = StackedExecutor(layout, device, max_stack=max_stack)
    else:
        ex = DaskExecutor(
            layout,
            device,
            run_fn,
            workers=workers,
            cluster_config=cluster_config,
            scheduler_address=scheduler_address,
        )
    bar = _progress(len(todo), progress and bool(todo))

    def give_up(task: _Task, message: str) -> None:
        """An infrastructure failure: nothing is recorded; dependents wait for the next run."""
        summary.errors += 1
        summary.failures.append(f"{task.study}/{task.hash}: error, not recorded: {message}")
        bar.update(1)
        release(task)  # free for the next sweep (or another one running now) to retry
        for dep in waiting.pop(task.hash, []):
            give_up(dep, f"its pretraining {task.hash} did not finish")

    def finish(task: _Task, record: dict) -> None:
        if INFRASTRUCTURE in record:
            give_up(task, record[INFRASTRUCTURE])
            return
        record = dict(record)
        record.setdefault("finished_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        record.setdefault("host", socket.gethostname())
        for t in shared[task.hash]:
            write_record(t.path, record)
        records[task.hash] = record
        if record["status"] == "ok":
            summary.done += 1
        else:
            summary.failed += 1
            first = (record.get("error") or "").splitlines()[:1]
            summary.failures.append(f"{task.study}/{task.hash}: failed: {' '.join(first)}")
        bar.update(1)
        release(task)
        release_dependents(task, record)

    def release_dependents(task: _Task, record: dict) -> None:
        """The transfers waiting for pretraining ``task``: ready, or failed with it."""
        for dep in waiting.pop(task.hash, []):
            if record["status"] == "ok":
                ready.append(dep)
            else:
                finish(dep, failure_record(dep.cfg, f"pretraining {task.hash} failed"))

    # a run is claimed (a lock file beside the records) from its submission until its record
    # is written: a second sweep on the same folder leaves it to the first and, once nothing
    # else is left to do, waits for it and takes its record (or runs it, if the first died)
    claims: dict[str, FileClaim] = {}
    deferred: list[_Task] = []

    def claim(task: _Task) -> bool:
        if task.hash not in claims:
            held = FileClaim(layout.run_claim(task.hash))
            if not held.acquire(blocking=False):
                return False
            claims[task.hash] = held
        return True

    def release(task: _Task) -> None:
        held = claims.pop(task.hash, None)
        if held is not None:
            held.release()

    def recorded(task: _Task) -> dict | None:
        """The record another sweep wrote for ``task`` since this one planned."""
        for t in shared[task.hash]:
            r = read_record(t.path, log=log)
            if r is not None and (r["status"] == "ok" or not retry_failed):
                return r
        return None

    def adopt(task: _Task, record: dict) -> None:
        for t in shared[task.hash]:
            if not t.path.exists():
                write_record(t.path, record)
        records[task.hash] = record
        summary.skipped += 1
        bar.update(1)
        release(task)
        release_dependents(task, record)

    def take_over() -> None:
        """The deferred runs another sweep has finished (or abandoned) since; a short pause
        when there is none."""
        progressed = False
        for task in list(deferred):
            if claim(task):
                deferred.remove(task)
                progressed = True
                record = recorded(task)
                if record is None:
                    ready.append(task)  # its claim is held: run it here
                else:
                    adopt(task, record)
        if not progressed:
            time.sleep(0.5)

    in_flight: dict[Any, _Task] = {}
    told = False
    interrupted = True  # until the loop ends normally or with an error of its own
    try:
        while ready or in_flight or deferred:
            if deadline_s is not None and time.perf_counter() - t0 > deadline_s:
                summary.unstarted = (
                    len(ready) + len(deferred) + sum(len(w) for w in waiting.values())
                )
                ready.clear()
                deferred.clear()
                if not in_flight:
                    break
            while ready and len(in_flight) < ex.capacity:
                task = ready.popleft()
                if not claim(task):
                    deferred.append(task)
                    continue
                record = recorded(task)  # finished by another sweep since the plan
                if record is not None:
                    adopt(task, record)
                    continue
                priority = 1 if task.cfg.kind == "pretrain" else 0
                in_flight[ex.submit(task.cfg, priority=priority)] = task
            if in_flight:
                for handle, record in ex.wait_any(list(in_flight)):
                    finish(in_flight.pop(handle), record)
            elif deferred and not ready:
                if not told:
                    log(f"sweep: {len(deferred)} run(s) are being run by another sweep on "
                        f"{layout.results_dir}; waiting for their records")  # fmt: skip
                    told = True
                take_over()
        interrupted = False
    except Exception:
        interrupted = False
        raise
    finally:
        ex.close(interrupted)  # Ctrl-C: a bounded shutdown
        bar.close()
        for held in claims.values():  # an interrupted sweep's runs are free for the next
            held.release()
    summary.wall_s = time.perf_counter() - t0
    log(summary.line(f"sweep {','.join(studies)} (profile {profile.name})"))
    for line in summary.failures[:10]:
        log(f"  {line}")
    return summary


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="runs", unit="run", disable=not enabled, dynamic_ncols=True)
