"""End-to-end cost of a profile: simulation + every study sweep + collection.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sweep.py --profile laptop \\
        --executor dask --workers 2 --sim-workers 2 --out results/bench_sweep_laptop.json

Starts from an empty project folder (``--root``, default a new temporary folder), so the
simulation is included. Reports wall time per phase, the peak resident memory of this process
plus all its children (Dask workers, simulation processes; sampled every 0.2 s), and the share
of pretraining compute that checkpoint reuse saves: the paper retrained the pretraining of every
transfer model, this sweep trains each pretraining once and loads it in every transfer run.
Goals (laptop, this 2-core machine): total ≤ 20 min, peak ≤ 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import psutil  # noqa: E402

from hrtem_book.layout import Layout  # noqa: E402
from hrtem_book.profiles import get_profile, pin_cpu  # noqa: E402
from hrtem_book.results import collect  # noqa: E402
from hrtem_book.studies import STUDY_NAMES  # noqa: E402
from hrtem_book.sweep import prepare_data, run_sweep  # noqa: E402

GOAL_WALL_S = 20 * 60
GOAL_RSS_MB = 4096


class PeakRSS:
    """Peak of the summed RSS of this process and its descendants, sampled in a thread."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.peak_mb = interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_mb = max(self.peak_mb, total / 2**20)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cpu_s() -> float:
    """CPU seconds (user + system) of this process and its finished, reaped children.

    Load-independent: on a busy shared machine the wall time stretches, the CPU time does not;
    on an idle machine with ``k`` cores the wall time is at least ``cpu_s / k``.
    """
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def reuse_savings(root: Path, profile: str) -> dict:
    """Pretraining compute of this sweep vs retraining it for every transfer run (paper)."""
    once = per_transfer = transfer = mixture = 0.0
    n_pre = n_transfer = 0
    for study in STUDY_NAMES:
        for path in Layout(root, profile).records_dir(study).glob("*.json"):
            rec = json.loads(path.read_text())
            if rec["status"] != "ok":
                continue
            stages = rec["stages"]
            if rec["kind"] == "pretrain":
                once += stages["pretrain"]["train_time_s"]
                n_pre += 1
            elif rec["kind"] == "transfer":
                per_transfer += stages["pretrain"]["train_time_s"]
                transfer += stages["transfer"]["train_time_s"]
                n_transfer += 1
            else:
                mixture += stages["mixture"]["train_time_s"]
    paper_total = per_transfer + transfer + mixture
    return {
        "pretrainings": n_pre,
        "transfer_runs": n_transfer,
        "pretrain_s_reused": round(once, 1),
        "pretrain_s_if_retrained_per_transfer": round(per_transfer, 1),
        "pretrain_share_saved": round(1 - once / per_transfer, 4) if per_transfer else None,
        "training_share_saved": round((per_transfer - once) / paper_total, 4)
        if paper_total
        else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="laptop")
    parser.add_argument("--root", help="empty project folder (default: a new temporary one)")
    parser.add_argument("--executor", default="dask", choices=("inprocess", "dask"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sim-workers", type=int, default=2)
    parser.add_argument("--out", help="also write the JSON result here")
    args = parser.parse_args(argv)
    profile = get_profile(args.profile)
    root = Path(args.root or tempfile.mkdtemp(prefix=f"bench-{profile.name}-"))
    if (root / "results" / profile.name).exists() or (root / "data" / profile.name).exists():
        parser.error(f"{root} already holds {profile.name} data or results; use an empty folder")

    pin_cpu(profile)  # the profile's CPU kernels for the workers (this process loaded torch)
    with PeakRSS() as rss:
        t0, c0 = time.perf_counter(), cpu_s()
        prepare_data(STUDY_NAMES, profile, Layout(root, profile.name), workers=args.sim_workers)
        t1, c1 = time.perf_counter(), cpu_s()
        summary = run_sweep(
            "all", profile, root, executor=args.executor, workers=args.workers, progress=True
        )
        t2, c2 = time.perf_counter(), cpu_s()
        collect(profile, root)
        t3, c3 = time.perf_counter(), cpu_s()
    times = {
        "simulate_s": t1 - t0,
        "sweep_s": t2 - t1,
        "collect_s": t3 - t2,
        "total_s": t3 - t0,
        "simulate_cpu_s": c1 - c0,
        "sweep_cpu_s": c2 - c1,
        "total_cpu_s": c3 - c0,
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    result = {
        "profile": profile.name,
        "executor": args.executor,
        "workers": args.workers,
        "sim_workers": args.sim_workers,
        "cpu_count": os.cpu_count(),
        "root": str(root),
        **{k: round(v, 1) for k, v in times.items()},
        "runs_done": summary.done,
        "runs_failed": summary.failed,
        "peak_rss_mb": round(rss.peak_mb),
        "goal_wall_met": times["total_s"] <= GOAL_WALL_S,
        "goal_rss_met": rss.peak_mb <= GOAL_RSS_MB,
        "checkpoint_reuse": reuse_savings(root, profile.name),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
