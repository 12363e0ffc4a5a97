"""The GPU campaign, rehearsed on the CPU: the identical code path on the smoke profile."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
from conftest import smoke_project

from hrtem_book.cli import main
from hrtem_book.layout import Layout
from hrtem_book.profiles import get_profile
from hrtem_book.results import load_database
from hrtem_book.studies import STUDY_NAMES, build_grid
from hrtem_book.sweep import run_sweep

SMOKE = get_profile("smoke")


@pytest.mark.slow
def test_stacked_sweep_gives_the_in_process_database(tmp_path, smoke_data, smoke_sweep):
    """Stacks train every run as if alone: the same stop epochs and numbers up to rounding
    (bfloat16 in the smoke profile: a few per cent after two epochs, see test_stacked.py)."""
    quiet = {"progress": False, "log": lambda m: None}
    plain = smoke_sweep
    stacked = smoke_project(tmp_path / "stacked", smoke_data)
    summary = run_sweep("all", SMOKE, stacked, executor="stacked", max_stack=8, **quiet)
    # distinct runs: a config that several studies share (a generalization model equal to a
    # transfer study's pretraining) runs once and is recorded in each
    distinct = {
        h for s in STUDY_NAMES for g in [build_grid(s, SMOKE)] for h in {**g.runs, **g.pretrains}
    }
    assert summary.done == len(distinct)
    from hrtem_book.results import collect

    for study in STUDY_NAMES:
        a = load_database(collect(SMOKE, plain)[study])
        b = load_database(collect(SMOKE, stacked)[study])
        xr.testing.assert_equal(a["status"], b["status"])
        xr.testing.assert_equal(a["epochs_run"], b["epochs_run"])
        for var in ("final_loss", "final_dice", "history_loss"):
            np.testing.assert_allclose(a[var].values, b[var].values, rtol=5e-2, atol=5e-3)


@pytest.mark.slow
def test_campaign_rehearsal_writes_databases_and_benchmark(tmp_path, smoke_data):
    root = smoke_project(tmp_path / "p", smoke_data)
    out = tmp_path / "out"
    argv = ["campaign", "--profile", "smoke", "--device", "cpu", "--root", str(root),
            "--out", str(out), "--budget-s", "600", "--bench-scale", "profile",
            "--bench-steps", "2", "--max-stack", "4"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "campaign.json").read_text())
    assert result["runs_failed"] == result["runs_errors"] == result["runs_not_started"] == 0
    assert set(result["databases"]) == set(STUDY_NAMES)
    for study in STUDY_NAMES:
        ds = load_database(out / f"{study}.nc", study)
        assert ds.attrs["device"].startswith("CPU") and ds.attrs["campaign_budget_s"] == 600
        assert bool((ds["status"] == "ok").any())
        # the project's own database holds the same provenance
        own = load_database(Layout(root, "smoke").database_path(study), study)
        assert own.attrs["campaign_wall_s"] == ds.attrs["campaign_wall_s"]
    bench = json.loads((out / "benchmark.json").read_text())
    assert bench["training_profile"]["stacked_fp32_img_s"] > 0
    assert bench["simulation"]["images_per_s"] > 0


def test_a_campaign_that_runs_out_of_time_stops_cleanly(tmp_path, smoke_data):
    """The deadline: no run starts after it; what did not start stays missing."""
    root = smoke_project(tmp_path / "p", smoke_data)
    lines: list[str] = []
    summary = run_sweep(
        "all", SMOKE, root, executor="stacked", deadline_s=0.0, progress=False, log=lines.append
    )
    assert summary.done == 0 and summary.unstarted > 0
    assert "not started (deadline)" in lines[-1]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--budget-s", "30"], "--budget-s 30; allowed: more than 60 s"),
        (["--max-stack", "0"], "--max-stack 0; allowed: an integer >= 1"),
        (["--device", "nope"], "--device 'nope'"),
        (["--profile", "nope"], "unknown profile 'nope'"),
    ],
)
def test_campaign_bad_inputs_are_one_line(args, fragment, tmp_path, capsys):
    argv = ["campaign", "--profile", "smoke", "--device", "cpu", "--out", str(tmp_path / "o"),
            "--root", str(tmp_path)]  # fmt: skip
    for i in range(0, len(args), 2):
        if args[i] in argv:
            argv[argv.index(args[i]) + 1] = args[i + 1]
        else:
            argv += args[i : i + 2]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err


def test_campaign_command_needs_none_of_the_book():
    """The device image has torch and xarray but not the book's widgets: the campaign command
    must parse without importing hrtem_book.book, ipywidgets or papermill."""
    code = (
        "import sys; from hrtem_book.cli import build_parser; "
        "build_parser('campaign').parse_args(['campaign', '--profile', 'gpu', '--out', 'x']); "
        "bad = [m for m in ('hrtem_book.book', 'ipywidgets', 'papermill', 'distributed') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
