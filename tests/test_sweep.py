"""Sweeps: resumption after SIGKILL, idempotent reruns, failures, Dask = in-process, the CLI.

Scheduling mechanics use a cheap injected run function; resumption, idempotence and the Dask
comparison run the real training on the ``smoke`` profile (data simulated once per session).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from conftest import smoke_project

from hrtem_book import train
from hrtem_book.cli import main
from hrtem_book.config import PretrainConfig, TransferConfig, config_hash, to_jsonable
from hrtem_book.executors import load_cluster_config, make_cluster
from hrtem_book.layout import Layout
from hrtem_book.profiles import get_profile
from hrtem_book.records import RECORD_FORMAT, read_record, write_record
from hrtem_book.results import build_database, collect, load_database
from hrtem_book.series import get_series
from hrtem_book.studies import STUDIES, build_grid
from hrtem_book.sweep import run_sweep

SMOKE = get_profile("smoke")


def records_dir(root, profile: str, study: str):
    return Layout(root, profile).records_dir(study)


# distinct runs: the generalization models that equal a transfer study's pretraining run once
N_SMOKE_RUNS = len(
    {h for s in STUDIES for h in {**build_grid(s, SMOKE).runs, **build_grid(s, SMOKE).pretrains}}
)


# --- a cheap run function for the scheduling mechanics ----------------------------------------
CALLS: list[str] = []
FAIL: set[str] = set()  # runs whose model fails (a failed record, as a diverged run returns)
RAISE: set[str] = set()  # runs that raise (an infrastructure failure: nothing to record)


def fake_run(cfg, *, layout, device="cpu"):
    """A record in the format of train.run, with losses derived from the config hash."""
    h = config_hash(cfg)
    CALLS.append(h)
    base = cfg.pretrain if isinstance(cfg, TransferConfig) else cfg
    if h in RAISE:
        raise RuntimeError(f"boom {h}")
    rng = np.random.default_rng(int(h, 16) % 2**32)
    doms = base.data.domains(base.series)

    def stage():
        out = {"train_loss": [0.5, 0.4], "train_time_s": 0.01, "eval_time_s": 0.001}
        out.update(peak_memory_mb=1.0, epochs_run=2, best_epoch=2, stop_reason="max_epochs")
        for m in ("loss", "dice", "iou"):
            curves = {str(d): sorted(rng.random(2).tolist(), reverse=m == "loss") for d in doms}
            out[f"val_{m}"] = curves
            out[f"best_{m}"] = {d: (min if m == "loss" else max)(c) for d, c in curves.items()}
            out[f"final_{m}"] = {d: c[-1] for d, c in curves.items()}
            out[f"test_{m}"] = {str(d): float(rng.random()) for d in doms}
        out["test_image_loss"] = {str(d): rng.random(3).tolist() for d in doms}
        out["test_image_counts"] = {str(d): [[5, 1, 2]] * 3 for d in doms}
        return out

    kind = {PretrainConfig: "pretrain", TransferConfig: "transfer"}.get(type(cfg), "mixture")
    stages = {"mixture": stage()} if kind == "mixture" else {"pretrain": stage()}
    if kind == "transfer":
        stages["transfer"] = stage()
    failed = h in FAIL
    return {
        "record_format": RECORD_FORMAT,
        "config_hash": h,
        "kind": kind,
        "config": to_jsonable(cfg),
        "status": "failed" if failed else "ok",
        "error": f"diverged: boom {h}" if failed else None,
        "stages": stages,
        "trainable_params": 10,
        "total_params": 20,
        "package_version": "test",
        "git_commit": None,
    }


@pytest.fixture
def fake(tmp_path, smoke_data):
    """The cheap run function's state, cleared; ``tmp_path`` a project with the smoke series
    (a sweep prepares its data whatever executes the runs)."""
    smoke_project(tmp_path, smoke_data)
    for s in (CALLS, FAIL, RAISE):
        s.clear()
    yield
    for s in (CALLS, FAIL, RAISE):
        s.clear()


def _sweep(root, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("log", lambda msg: None)
    return run_sweep("all", SMOKE, root, **kw)


def test_the_stacked_engine_refuses_a_run_function_instead_of_ignoring_it(tmp_path, fake):
    with pytest.raises(ValueError, match="run_fn with executor='stacked'"):
        _sweep(tmp_path, run_fn=fake_run, executor="stacked")
    assert CALLS == [] and not (tmp_path / "results").exists()  # refused before any work


def test_sweep_records_every_run_once_pretrainings_first(tmp_path, fake):
    summary = _sweep(tmp_path, run_fn=fake_run)
    assert (summary.done, summary.skipped, summary.failed) == (N_SMOKE_RUNS, 0, 0)
    assert len(CALLS) == len(set(CALLS)) == N_SMOKE_RUNS
    for study in STUDIES:
        grid = build_grid(study, SMOKE)
        for h in grid.pretrains:  # a pretraining runs before every transfer run that loads it
            users = [CALLS.index(k) for k, c in grid.runs.items() if config_hash(c.pretrain) == h]
            assert CALLS.index(h) < min(users)
        for h in {**grid.pretrains, **grid.runs}:
            record = read_record(records_dir(tmp_path, "smoke", study) / f"{h}.json")
            assert record is not None and record["status"] == "ok"
    # rerun: nothing to do, nothing called
    CALLS.clear()
    again = _sweep(tmp_path, run_fn=fake_run)
    assert (again.done, again.skipped, again.failed, CALLS) == (0, N_SMOKE_RUNS, 0, [])


def test_failed_runs_are_recorded_and_retried_on_request(tmp_path, fake):
    grid = build_grid("defocus", SMOKE)
    pre = next(iter(grid.pretrains))
    transfer = next(iter(grid.runs))
    FAIL.update({pre})
    summary = _sweep(tmp_path, run_fn=fake_run)
    # the failed pretraining's transfer runs are recorded failed without running
    assert summary.failed == 1 + len(grid.runs)
    assert summary.done == N_SMOKE_RUNS - summary.failed
    assert not set(grid.runs) & set(CALLS)
    folder = records_dir(tmp_path, "smoke", "defocus")
    rec = read_record(folder / f"{pre}.json")
    assert rec["status"] == "failed" and rec["error"] == f"diverged: boom {pre}"
    assert read_record(folder / f"{transfer}.json")["error"] == f"pretraining {pre} failed"
    # a plain rerun skips failures; --retry-failed reruns exactly them
    CALLS.clear()
    assert _sweep(tmp_path, run_fn=fake_run).skipped == N_SMOKE_RUNS
    assert CALLS == []
    FAIL.clear()
    retry = _sweep(tmp_path, run_fn=fake_run, retry_failed=True)
    assert (retry.done, retry.failed) == (1 + len(grid.runs), 0)
    assert sorted(CALLS) == sorted([pre, *grid.runs])
    db = build_database("defocus", SMOKE, tmp_path)
    assert "ok" in db["status"].values and set(np.unique(db["status"].values)) <= {"ok", "excluded"}


def test_runs_that_raise_are_not_recorded_and_retried_by_a_plain_rerun(tmp_path, fake):
    """An exception (a bad device, an unreadable file) says nothing about the model: the run and
    the transfer runs waiting for it are left unrecorded, and the next sweep runs them."""
    grid = build_grid("defocus", SMOKE)
    pre = next(iter(grid.pretrains))
    RAISE.add(pre)
    lines: list[str] = []
    summary = _sweep(tmp_path, run_fn=fake_run, log=lines.append)
    assert (summary.failed, summary.errors) == (0, 1 + len(grid.runs))
    assert summary.done == N_SMOKE_RUNS - summary.errors
    folder = records_dir(tmp_path, "smoke", "defocus")
    assert not (folder / f"{pre}.json").exists()
    assert not any((folder / f"{h}.json").exists() for h in grid.runs)
    assert any(f"error, not recorded: RuntimeError: boom {pre}" in line for line in lines)
    assert "errors (not recorded; retried next run)" in lines[0]
    RAISE.clear()
    CALLS.clear()
    again = _sweep(tmp_path, run_fn=fake_run)  # no --retry-failed needed
    assert (again.done, again.failed, again.errors) == (1 + len(grid.runs), 0, 0)
    assert sorted(CALLS) == sorted([pre, *grid.runs])


def test_retry_failed_retrains_a_diverged_pretraining(tmp_path, fake):
    """A diverged pretraining leaves a weightless checkpoint (train.run); a retry must not reload
    that recorded failure but train again, while a plain rerun keeps it."""

    from hrtem_book import checkpoints

    grid = build_grid("defocus", SMOKE)
    pre_hash, pre = next(iter(grid.pretrains.items()))
    FAIL.add(pre_hash)
    _sweep(tmp_path, run_fn=fake_run)
    layout = Layout(tmp_path, "smoke")
    ckpt = checkpoints.checkpoint_path(layout, pre)
    failed = {"status": "failed", "record_format": RECORD_FORMAT}
    checkpoints.save_checkpoint(ckpt, pre, failed, None)
    _sweep(tmp_path, run_fn=fake_run)  # no retry: the failure and its checkpoint stay
    assert ckpt.exists()
    seen = []

    def run_fn(cfg, *, layout, device="cpu"):
        if isinstance(cfg, PretrainConfig):
            seen.append(checkpoints.checkpoint_path(layout, cfg).exists())
        return fake_run(cfg, layout=layout, device=device)

    FAIL.clear()
    retry = _sweep(tmp_path, run_fn=run_fn, retry_failed=True)
    assert (retry.done, retry.failed, seen) == (1 + len(grid.runs), 0, [False])
    # a checkpoint with weights is never deleted, even when its record failed
    checkpoints.save_checkpoint(ckpt, pre, failed, {})
    record_path = records_dir(tmp_path, "smoke", "defocus") / f"{pre_hash}.json"
    write_record(record_path, {**read_record(record_path), "status": "failed"})
    _sweep(tmp_path, run_fn=fake_run, retry_failed=True)
    assert ckpt.exists()


def test_corrupt_records_and_stale_temporary_files_are_redone(tmp_path, fake):
    _sweep(tmp_path, run_fn=fake_run)
    folder = records_dir(tmp_path, "smoke", "dose")
    victim = next(iter(build_grid("dose", SMOKE).runs))
    path = folder / f"{victim}.json"
    path.write_text(path.read_text()[:40])  # truncated, as if written without a rename
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    stale = folder / f".{victim}.json.{dead}.tmp"
    stale.write_text("{partial")
    CALLS.clear()
    summary = _sweep(tmp_path, run_fn=fake_run)
    assert (summary.done, CALLS) == (1, [victim])
    assert read_record(path)["config_hash"] == victim
    assert not stale.exists()
    # the damaged record is kept beside the new one, never deleted
    (aside,) = folder.glob(f"{victim}.json.invalid-*")
    assert aside.read_text() == path.read_text()[:40] or len(aside.read_text()) == 40


def test_a_record_of_the_wrong_shape_is_moved_aside_and_redone(tmp_path, fake):
    """Valid JSON, wrong shape ("stages": "oops") must not pass for a finished run."""
    _sweep(tmp_path, run_fn=fake_run)
    victim = next(iter(build_grid("structure", SMOKE).runs))
    path = records_dir(tmp_path, "smoke", "structure") / f"{victim}.json"
    write_record(path, {**read_record(path), "stages": "oops"})
    lines: list[str] = []
    CALLS.clear()
    summary = _sweep(tmp_path, run_fn=fake_run, log=lines.append)
    assert (summary.done, CALLS) == (1, [victim])
    assert any("stages is a str, not a mapping" in line and "moved aside" in line for line in lines)
    assert int((build_database("structure", SMOKE, tmp_path)["status"] == "ok").sum()) >= 1


def test_write_record_is_atomic_and_read_checks_identity(tmp_path, fake):
    folder = tmp_path / "records"
    folder.mkdir()
    cfg = next(iter(build_grid("dose", SMOKE).pretrains.values()))
    record = fake_run(cfg, layout=None)
    h = record["config_hash"]
    path = folder / f"{h}.json"
    write_record(path, record)
    assert read_record(path) == record
    assert [p.name for p in folder.iterdir()] == [f"{h}.json"]
    lines: list[str] = []
    write_record(folder / "other.json", record)  # a record filed under another id
    assert read_record(folder / "other.json", log=lines.append) is None
    write_record(path, {**record, "status": "running"})
    assert read_record(path, log=lines.append) is None
    # invalid files are moved aside, never deleted, and named in one line each
    assert len(lines) == 2 and all(len(line.splitlines()) == 1 for line in lines)
    assert "other.json is invalid (config_hash" in lines[0]
    assert "is invalid (status 'running'" in lines[1]
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 2 and all(".json.invalid-" in n for n in names)


# --- the real thing --------------------------------------------------------------------------
def _project(tmp_path: Path, smoke_data: Path, name: str) -> Path:
    return smoke_project(tmp_path / name, smoke_data)


def _records(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "results" / "smoke" / "records").rglob("*")
            if p.is_file()}  # fmt: skip


@pytest.mark.slow
def test_resume_after_sigkill_redoes_only_runs_in_flight(tmp_path, smoke_data):
    """kill -9 of a sweep (one study: what a kill leaves does not depend on the study) loses
    only its runs in flight; a rerun does exactly those, a second rerun nothing."""
    root = _project(tmp_path, smoke_data, "killed")
    grid = build_grid("defocus", SMOKE)
    n_runs = len(grid.pretrains) + len(grid.runs)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HRTEM_BOOK_THREADS": "1"}
    cmd = [sys.executable, "-m", "hrtem_book.cli", "sweep", "--study", "defocus", "--profile",
           "smoke", "--root", str(root)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    records = root / "results" / "smoke" / "records"
    deadline = time.monotonic() + 120
    while not list(records.rglob("*.json")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {k: v for k, v in _records(root).items() if k.endswith(".json")}
    assert 1 <= len(before) < n_runs

    lines: list[str] = []
    summary = run_sweep("defocus", SMOKE, root, progress=False, log=lines.append)
    assert (summary.done, summary.skipped, summary.failed) == (
        n_runs - len(before),
        len(before),
        0,
    )
    after = _records(root)
    assert set(after) == {k for k in after if k.endswith(".json")}  # no temporary files left
    assert len(after) == n_runs
    assert all(after[k] == v for k, v in before.items())  # finished records untouched
    for raw in after.values():
        assert json.loads(raw)["status"] == "ok"
    # idempotent: a second rerun changes nothing
    again = run_sweep("defocus", SMOKE, root, progress=False, log=lines.append)
    assert (again.done, again.skipped) == (0, n_runs)
    assert _records(root) == after
    assert lines[-1].endswith(f"0 done, {n_runs} skipped, 0 failed in {again.wall_s:.1f} s")


@pytest.mark.slow
def test_dask_local_cluster_and_in_process_give_the_same_database(
    tmp_path, smoke_data, smoke_sweep
):
    dask = _project(tmp_path, smoke_data, "dask")
    assert _sweep(dask, executor="dask", workers=2).done == N_SMOKE_RUNS
    paths = {"a": collect(SMOKE, smoke_sweep), "b": collect(SMOKE, dask)}
    assert set(paths["a"]) == set(paths["b"]) == set(STUDIES)
    for study in STUDIES:
        a, b = load_database(paths["a"][study]), load_database(paths["b"][study])
        assert set(np.unique(a["status"].values)) <= {"ok", "excluded"}
        assert bool((a["status"] == "ok").any())
        # identical numbers; only wall times and creation stamps differ
        times = ["train_time_s", "eval_time_s"]  # wall clocks differ between runs
        xr.testing.assert_identical(
            a.drop_vars(times).drop_attrs(), b.drop_vars(times).drop_attrs()
        )
        assert bool(np.isfinite(a["train_time_s"].where(a["status"] == "ok")).any())
        # the precision and the machine the models were trained with
        compute = train.compute_provenance("cpu")
        machine = f"cpu ({compute['cpu_capability']}), torch {compute['torch']}"
        assert a.attrs["trained_on"] == b.attrs["trained_on"] == machine
        assert {v for k, v in a.attrs.items() if k.endswith("_precision")} == {"fp32"}


# --- cluster configuration and command line -------------------------------------------------
def test_cluster_yaml_is_checked(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kind: slurm\njobs: 2\ncluster: {cores: 2, memory: 4GB}\n")
    assert load_cluster_config(cfg)["jobs"] == 2
    cfg.write_text("kind: pbs\n")
    with pytest.raises(ValueError, match="kind='pbs'; allowed: local, slurm"):
        load_cluster_config(cfg)
    cfg.write_text("kind: slurm\nworkers: 3\n")
    with pytest.raises(ValueError, match=r"unknown keys \['workers'\]; allowed: kind, jobs"):
        load_cluster_config(cfg)
    with pytest.raises(FileNotFoundError, match="nope.yaml not found"):
        load_cluster_config(tmp_path / "nope.yaml")


def test_slurm_cluster_job_script_runs_single_threaded_workers():
    cluster = make_cluster(
        {"kind": "slurm", "cluster": {"cores": 4, "processes": 4, "memory": "8GB",
                                       "walltime": "01:00:00", "queue": "gpu"}},
        scale=False,
    )  # fmt: skip
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p gpu" in script and "#SBATCH -t 01:00:00" in script
    assert "export OMP_NUM_THREADS=1" in script and "--nworkers 4" in script
    # the CPU kernels this process is pinned to (conftest, as the command line does)
    assert "export ATEN_CPU_CAPABILITY=avx2" in script
    assert "export ONEDNN_MAX_CPU_ISA=AVX2" in script


def test_cli_reports_bad_input_with_status_2(tmp_path, capsys):
    assert main(["sweep", "--study", "defocus", "--profile", "huge", "--root", str(tmp_path)]) == 2
    assert "unknown profile 'huge'; allowed: paper, laptop, gpu, smoke" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["sweep", "--study", "focus", "--profile", "smoke"])
    assert err.value.code == 2
    assert main(["collect", "--profile", "smoke", "--root", str(tmp_path)]) == 2
    assert "hrtem-book sweep --study all --profile smoke" in capsys.readouterr().err


def test_cli_collect_writes_databases(tmp_path, fake, capsys):
    _sweep(tmp_path, run_fn=fake_run)
    assert main(["collect", "--profile", "smoke", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for study in STUDIES:
        assert f"smoke/{study}.nc: " in out
        ds = load_database(tmp_path / "results" / "smoke", study)
        assert ds.attrs["profile"] == "smoke" and ds.attrs["n_records"] >= 1
        # every cell holds exactly its record's numbers
        grid = build_grid(study, SMOKE)
        for cell, h in grid.hashes.items():
            rec = read_record(records_dir(tmp_path, "smoke", study) / f"{h}.json")
            at = dict(zip(grid.spec.axes, cell, strict=True))
            assert ds["config_hash"].sel(at).item() == h and ds["status"].sel(at).item() == "ok"
            for stage, srec in rec["stages"].items():
                for dom, curve in srec["val_loss"].items():
                    key = get_series(grid.spec.series).normalize(dom)
                    where = {**at, "stage": stage, "eval_domain": key}
                    # stored to 1e-4 (results.storage_encoding)
                    near = functools.partial(pytest.approx, abs=1e-4)
                    assert ds["history_loss"].sel(where).values.tolist() == near(curve)
                    # the kept model's numbers are those on the test images
                    assert ds["final_dice"].sel(where).item() == near(srec["test_dice"][dom])
                    assert ds["final_loss"].sel(where).item() == near(srec["test_loss"][dom])
            expected = rec["total_params"] if "pretrain" in rec["stages"] else 10
            assert ds["trainable_params"].sel(at).isel(stage=0).item() == expected
