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
from .profiles import PROFILES, Profile, pin_cpu
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


@dataclass
class Resumed:
    """What a sweep finds on disk: the record of every finished run (by config hash), the runs
    still to do (one task per distinct config) and, per config, the tasks of every study that
    shares it (each keeps a copy of the record in its own folder)."""

    records: dict[str, dict]
    todo: list[_Task]
    shared: dict[str, list[_Task]]
    skipped: int


def resume(
    tasks: list[_Task], layout: Layout, retry_failed: bool, log: Callable[[str], None]
) -> Resumed:
    """The finished runs among ``tasks`` and those left to do; a config that several studies
    share (a generalization model that is a transfer study's pretraining) runs once, and a
    study that lacks its record gets a copy. A failed pretraining retried loses its checkpoint."""
    shared: dict[str, list[_Task]] = {}
    for task in tasks:
        shared.setdefault(task.hash, []).append(task)
    records: dict[str, dict] = {}
    todo: list[_Task] = []
    for h, group in shared.items():
        recs = [read_record(t.path, log=log) for t in group]
        kept = [r for r in recs if r is not None and (r["status"] == "ok" or not retry_failed)]
        if kept:
            for t, r in zip(group, recs, strict=True):
                if r is None:
                    write_record(t.path, kept[0])  # the same run, recorded by another study
            records[h] = kept[0]
        else:
            if any(r is not None for r in recs) and group[0].cfg.makes_checkpoint:
                drop_failed_checkpoint(layout, group[0].cfg)
            todo.append(group[0])
    return Resumed(records, todo, shared, skipped=len(records))


def check_executor(executor: str, run_fn: RunFn | None = None) -> None:
    """One-line ValueError for an executor that is not one of
    :data:`~hrtem_book.executors.EXECUTORS`, or the stacked engine with a ``run_fn``."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r}; allowed: {', '.join(EXECUTORS)}")
    if executor == "stacked" and run_fn is not None:
        raise ValueError(
            "run_fn with executor='stacked': the stacked engine trains groups of runs, not "
            "one run at a time; allowed: executor 'inprocess' or 'dask'"
        )


def make_executor(
    executor: str,
    layout: Layout,
    device: str,
    run_fn: RunFn | None = None,
    *,
    workers: int = 2,
    cluster_config: dict | None = None,
    scheduler_address: str | None = None,
    max_stack: int = 64,
):
    """The executor named ``executor`` (:data:`~hrtem_book.executors.EXECUTORS`); ``run_fn``
    replaces :func:`~hrtem_book.executors.train_run` where runs execute one by one
    (:func:`check_executor`)."""
    check_executor(executor, run_fn)
    if executor == "stacked":
        return StackedExecutor(layout, device, max_stack=max_stack)
    if executor == "inprocess":
        return InProcessExecutor(layout, device, run_fn)
    return DaskExecutor(
        layout,
        device,
        run_fn,
        workers=workers,
        cluster_config=cluster_config,
        scheduler_address=scheduler_address,
    )


class _Scheduler:
    """Runs the tasks left to do on an executor: pretrainings first, each transfer released
    when the pretraining it loads has finished (failed with it, when that failed); records
    written by this process only; a run claimed (a lock file beside the records) from its
    submission until its record is written, so that a second sweep on the same folder leaves it
    to the first and, once nothing else is left, waits for it and takes its record (or runs it,
    if the first died)."""

    def __init__(
        self,
        resumed: Resumed,
        layout: Layout,
        summary: SweepSummary,
        *,
        retry_failed: bool,
        log: Callable[[str], None],
        progress: bool,
    ) -> None:
        self.shared, self.records = resumed.shared, resumed.records
        self.layout, self.summary, self.retry_failed, self.log = layout, summary, retry_failed, log
        todo = resumed.todo
        pending_pre = {t.hash for t in todo if t.cfg.makes_checkpoint}
        self.waiting: dict[str, list[_Task]] = {}
        self.ready: deque[_Task] = deque()
        for task in todo:
            dep = config_hash(task.cfg.loads) if task.cfg.loads is not None else None
            if dep in pending_pre:
                self.waiting.setdefault(dep, []).append(task)
            else:
                self.ready.append(task)
        self.claims: dict[str, FileClaim] = {}
        self.deferred: list[_Task] = []
        self.bar = _progress(len(todo), progress and bool(todo))

    # --- outcomes of a run ------------------------------------------------------------------
    def give_up(self, task: _Task, message: str) -> None:
        """An infrastructure failure: nothing is recorded; dependents wait for the next run."""
        self.summary.errors += 1
        self.summary.failures.append(f"{task.study}/{task.hash}: error, not recorded: {message}")
        self.bar.update(1)
        self.release(task)  # free for the next sweep (or another one running now) to retry
        for dep in self.waiting.pop(task.hash, []):
            self.give_up(dep, f"its pretraining {task.hash} did not finish")

    def finish(self, task: _Task, record: dict) -> None:
        if INFRASTRUCTURE in record:
            self.give_up(task, record[INFRASTRUCTURE])
            return
        record = dict(record)
        record.setdefault("finished_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        record.setdefault("host", socket.gethostname())
        for t in self.shared[task.hash]:
            write_record(t.path, record)
        self.records[task.hash] = record
        if record["status"] == "ok":
            self.summary.done += 1
        else:
            self.summary.failed += 1
            first = (record.get("error") or "").splitlines()[:1]
            self.summary.failures.append(f"{task.study}/{task.hash}: failed: {' '.join(first)}")
        self.bar.update(1)
        self.release(task)
        self.release_dependents(task, record)

    def release_dependents(self, task: _Task, record: dict) -> None:
        """The transfers waiting for pretraining ``task``: ready, or failed with it."""
        for dep in self.waiting.pop(task.hash, []):
            if record["status"] == "ok":
                self.ready.append(dep)
            else:
                self.finish(dep, failure_record(dep.cfg, f"pretraining {task.hash} failed"))

    # --- claims shared with other sweeps on the same folder ----------------------------------
    def claim(self, task: _Task) -> bool:
        if task.hash not in self.claims:
            held = FileClaim(self.layout.run_claim(task.hash))
            if not held.acquire(blocking=False):
                return False
            self.claims[task.hash] = held
        return True

    def release(self, task: _Task) -> None:
        held = self.claims.pop(task.hash, None)
        if held is not None:
            held.release()

    def recorded(self, task: _Task) -> dict | None:
        """The record another sweep wrote for ``task`` since this one planned."""
        for t in self.shared[task.hash]:
            r = read_record(t.path, log=self.log)
            if r is not None and (r["status"] == "ok" or not self.retry_failed):
                return r
        return None

    def adopt(self, task: _Task, record: dict) -> None:
        for t in self.shared[task.hash]:
            if not t.path.exists():
                write_record(t.path, record)
        self.records[task.hash] = record
        self.summary.skipped += 1
        self.bar.update(1)
        self.release(task)
        self.release_dependents(task, record)

    def take_over(self) -> None:
        """The deferred runs another sweep has finished (or abandoned) since; a short pause
        when there is none."""
        progressed = False
        for task in list(self.deferred):
            if self.claim(task):
                self.deferred.remove(task)
                progressed = True
                record = self.recorded(task)
                if record is None:
                    self.ready.append(task)  # its claim is held: run it here
                else:
                    self.adopt(task, record)
        if not progressed:
            time.sleep(0.5)

    # --- the loop ---------------------------------------------------------------------------
    def run(self, ex, t0: float, deadline_s: float | None) -> None:
        """Submit, wait and record until nothing is left (or the deadline passes: no new run
        starts, the unstarted are counted); the executor is closed in every case."""
        in_flight: dict[Any, _Task] = {}
        told = False
        interrupted = True  # until the loop ends normally or with an error of its own
        try:
            while self.ready or in_flight or self.deferred:
                if deadline_s is not None and time.perf_counter() - t0 > deadline_s:
                    self.summary.unstarted = (
                        len(self.ready) + len(self.deferred)
                        + sum(len(w) for w in self.waiting.values())
                    )  # fmt: skip
                    self.ready.clear()
                    self.deferred.clear()
                    if not in_flight:
                        break
                while self.ready and len(in_flight) < ex.capacity:
                    task = self.ready.popleft()
                    if not self.claim(task):
                        self.deferred.append(task)
                        continue
                    record = self.recorded(task)  # finished by another sweep since the plan
                    if record is not None:
                        self.adopt(task, record)
                        continue
                    priority = 1 if task.cfg.makes_checkpoint else 0
                    in_flight[ex.submit(task.cfg, priority=priority)] = task
                if in_flight:
                    for handle, record in ex.wait_any(list(in_flight)):
                        self.finish(in_flight.pop(handle), record)
                elif self.deferred and not self.ready:
                    if not told:
                        n, where = len(self.deferred), self.layout.results_dir
                        self.log(f"sweep: {n} run(s) are being run by another sweep on {where}; "
                                 "waiting for their records")  # fmt: skip
                        told = True
                    self.take_over()
            interrupted = False
        except Exception:
            interrupted = False
            raise
        finally:
            ex.close(interrupted)  # Ctrl-C: a bounded shutdown
            self.bar.close()
            for held in self.claims.values():  # an interrupted sweep's runs are free for the next
                held.release()


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
    :class:`~hrtem_book.layout.Layout`). Missing dataset series are simulated first, in
    ``sim_workers`` processes (on ``device`` when it is a GPU). The runs execute as
    :func:`make_executor` says (``run_fn`` replaces the training of one run; the stacked engine,
    which trains groups of up to ``max_stack`` models, refuses one). With ``deadline_s``, no new
    run starts after that many seconds: a campaign with a fixed budget stops cleanly, its
    unstarted runs left missing (``SweepSummary.unstarted``).
    """
    t0 = time.perf_counter()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    studies = expand_studies(studies)
    layout = Layout.of(root, profile)
    check_executor(executor, run_fn)
    check_profile_compute(profile, device)
    pin_cpu(profile)  # the CPU kernels of its stages, for the workers it starts (they inherit it)
    tasks = plan(studies, profile, layout)
    # temporary and lock files of killed processes: records, checkpoints, series being merged
    for folder in {t.path.parent for t in tasks} | {layout.checkpoints_dir, layout.data_dir}:
        if folder.is_dir():
            remove_stale_tmp(folder)
    for folder in (layout.records_root, layout.checkpoints_dir, layout.data_dir):
        if folder.is_dir():
            remove_stale_locks(folder)
    prepare_data(studies, profile, layout, workers=sim_workers, progress=progress, device=device)
    resumed = resume(tasks, layout, retry_failed, log)
    summary = SweepSummary(skipped=resumed.skipped)
    # nothing to do: no cluster started for it
    ex = make_executor(executor if resumed.todo else "inprocess", layout, device, run_fn,
                       workers=workers, cluster_config=cluster_config,
                       scheduler_address=scheduler_address, max_stack=max_stack)  # fmt: skip
    scheduler = _Scheduler(resumed, layout, summary, retry_failed=retry_failed, log=log,
                           progress=progress)  # fmt: skip
    scheduler.run(ex, t0, deadline_s)
    summary.wall_s = time.perf_counter() - t0
    log(summary.line(f"sweep {','.join(studies)} (profile {profile.name})"))
    for line in summary.failures[:10]:
        log(f"  {line}")
    return summary


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="runs", unit="run", disable=not enabled, dynamic_ncols=True)
