"""The failure contract, through the real command line in subprocesses (smoke profile, temporary
project folders): a bad input ends with status 2 and one line naming the value and what is
allowed; a damaged derived file is named, moved aside and regenerated; a model failure is
recorded, an environment failure is not (the next run retries it); never a traceback, never lost
work. One test per case of the reliability issue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xarray as xr
from conftest import smoke_project

from hrtem_book.layout import Layout
from hrtem_book.profiles import get_profile
from hrtem_book.studies import build_grid

SMOKE = get_profile("smoke")
TIMES = ["train_time_s", "eval_time_s"]  # wall clocks: the only values that differ between runs


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HRTEM_BOOK_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "hrtem_book.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def assert_one_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Status 2, exactly one line on stderr holding every fragment, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-500:], err[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def main_one_line(args: list[str], capsys, *fragments: str) -> str:
    """:func:`assert_one_line` for a refusal that comes before any work, through
    ``hrtem_book.cli.main`` (argv parsed as the console gives it) in this process: a subprocess
    per case would mostly time its imports."""
    from hrtem_book.cli import main

    try:
        status = main(list(args))
    except SystemExit as exc:  # argparse's own refusals leave through parser.exit
        status = exc.code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert status == 2, (status, err[-2000:])
    assert "Traceback" not in captured.err + captured.out
    assert len(err.splitlines()) == 1 and "usage:" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]


def sweep(root: Path, *extra: str, study: str = "defocus") -> subprocess.CompletedProcess:
    return cli("sweep", "--study", study, "--profile", "smoke", "--root", str(root), *extra)


def database(root: Path, study: str = "defocus") -> xr.Dataset:
    proc = cli("collect", "--profile", "smoke", "--root", str(root))
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    ds = xr.load_dataset(Layout(root, "smoke").database_path(study))
    return ds.drop_vars(TIMES).drop_attrs()


@pytest.fixture(scope="module")
def clean(smoke_sweep) -> Path:
    """A clean run of the smoke sweep (the session's): the reference every recovered run must
    equal. Copied before a test changes anything."""
    return smoke_sweep


@pytest.fixture(scope="module")
def clean_db(clean) -> xr.Dataset:
    """The clean run's defocus database, as :func:`database` reads it (collected once)."""
    return database(clean)


TRAIN = ["train", "--series", "defocus", "--pretrain", "-10", "--profile", "smoke"]


# --- 1. divergence that stays finite is a recorded model failure -----------------------------
@pytest.mark.slow
def test_1_finite_divergence_is_recorded_as_failed(tmp_path, smoke_data):
    root = smoke_project(tmp_path / "p", smoke_data)
    proc = cli(*TRAIN, "--transfer", "10", "--n-transfer", "4", "--pretrain-lr", "1e9",
               "--root", str(root))  # fmt: skip
    no_traceback(proc)
    assert proc.returncode == 1  # a model failure: recorded, not a user error
    (path,) = Layout(root, "smoke").records_dir("train").glob("*.json")
    record = json.loads(path.read_text())
    assert record["status"] == "failed"
    assert record["error"].startswith("pretraining failed: ")
    assert "diverged" in record["error"] or "non-finite" in record["error"]
    assert record["stages"]["pretrain"]["stop_reason"] == "diverged"


# --- 2. failures of the environment are not frozen into records --------------------------------
@pytest.mark.slow
def test_2_a_bad_device_records_nothing_and_a_plain_rerun_completes(tmp_path, smoke_data, clean_db):
    root = smoke_project(tmp_path / "p", smoke_data)
    assert_one_line(sweep(root, "--device", "nope"), "--device 'nope'", "allowed: cpu")
    assert not Layout(root, "smoke").records_root.exists()
    proc = sweep(root)  # no --retry-failed needed: nothing was recorded
    no_traceback(proc)
    assert proc.returncode == 0 and ", 0 skipped, 0 failed" in proc.stderr
    xr.testing.assert_identical(database(root), clean_db)


@pytest.mark.slow
def test_2_an_unreadable_checkpoint_is_trained_again(tmp_path, clean, clean_db):
    import shutil

    from hrtem_book.checkpoints import checkpoint_path

    root = tmp_path / "p"
    shutil.copytree(clean, root, symlinks=True)  # the clean run's records and checkpoints
    layout = Layout(root, "smoke")
    (pretrain,) = build_grid("defocus", SMOKE).pretrains.values()
    ckpt = checkpoint_path(layout, pretrain)  # the checkpoint the defocus transfers load
    damages = (  # a truncated file; a readable one whose weights changed on disk
        (lambda: ckpt.write_bytes(ckpt.read_bytes()[:500]), "training it again"),
        (lambda: flip_bytes_inside(ckpt, _largest_tensor_bytes(ckpt)),
         "differs from its content checksum"),
    )  # fmt: skip
    for moved_aside, (damage, said) in enumerate(damages, 1):
        damage()
        for h in build_grid("defocus", SMOKE).runs:  # the transfer runs must load it again
            layout.record_path("defocus", h).unlink()
        proc = sweep(root)
        no_traceback(proc)
        assert proc.returncode == 0 and said in proc.stderr and "training it again" in proc.stderr
        assert len(list(layout.checkpoints_dir.glob("*.pt.invalid-*"))) == moved_aside
        xr.testing.assert_identical(database(root), clean_db)


def flip_bytes_inside(path: Path, block: bytes, n: int = 64) -> None:
    """Invert ``n`` bytes in the middle of the stored copy of ``block`` inside ``path`` (the
    file stays readable: only values change)."""
    raw = bytearray(path.read_bytes())
    at = raw.find(block)
    assert at >= 0 and len(block) > 2 * n, "block not stored verbatim"
    start = at + len(block) // 2
    raw[start : start + n] = bytes(b ^ 0xFF for b in raw[start : start + n])
    path.write_bytes(bytes(raw))


def _largest_tensor_bytes(ckpt: Path) -> bytes:
    import torch

    state = torch.load(ckpt, weights_only=True)["state_dict"]
    tensor = max(state.values(), key=lambda t: t.numel())
    # its storage as saved (a channels_last weight is stored in that order)
    storage = torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())
    return storage.numpy().tobytes()


# --- 3. corrupt derived files are regenerated -------------------------------------------------
@pytest.mark.slow
def test_3_a_truncated_dataset_is_simulated_again(tmp_path, smoke_data, clean_db):
    root = tmp_path / "p"
    data_dir = Layout(root, "smoke").data_dir
    data_dir.mkdir(parents=True)
    for f in smoke_data.glob("*.nc"):  # a private copy: this test damages it
        (data_dir / f.name).write_bytes(f.read_bytes())
    (series,) = data_dir.glob("defocus-*.nc")
    series.write_bytes(series.read_bytes()[: series.stat().st_size // 2])
    proc = cli("simulate", "--series", "defocus", "--profile", "smoke", "--root", str(root))
    no_traceback(proc)
    assert proc.returncode == 0
    damaged = [line for line in proc.stderr.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and str(series) in damaged[0] and "simulating it again" in damaged[0]
    xr.testing.assert_identical(xr.load_dataset(series), xr.load_dataset(smoke_data / series.name))
    # the sweep meets a damaged file the same way
    series.write_bytes(series.read_bytes()[:2000])
    proc = sweep(root)
    no_traceback(proc)
    assert proc.returncode == 0 and "is damaged" in proc.stderr
    xr.testing.assert_identical(database(root), clean_db)
    # a readable series with one image changed on disk: its checksum says which
    with xr.open_dataset(series) as ds:
        image = ds["image"].values[5].tobytes()
    flip_bytes_inside(series, image)
    proc = cli("simulate", "--series", "defocus", "--profile", "smoke", "--root", str(root))
    no_traceback(proc)
    assert proc.returncode == 0 and "image 5 differs from its checksum" in proc.stderr
    xr.testing.assert_identical(xr.load_dataset(series), xr.load_dataset(smoke_data / series.name))


# --- 4. malformed records are named, moved aside and redone ------------------------------------
@pytest.mark.slow
def test_4_garbage_and_wrongly_shaped_records_are_redone(tmp_path, clean, clean_db):
    import shutil

    root = tmp_path / "p"
    shutil.copytree(clean, root, symlinks=True)  # the clean run's records (its series linked)
    layout = Layout(root, "smoke")
    runs = list(build_grid("defocus", SMOKE).runs)
    garbage, shaped = (layout.record_path("defocus", h) for h in runs[:2])
    garbage.write_text("{not json")
    record = json.loads(shaped.read_text())
    shaped.write_text(json.dumps({**record, "stages": "oops"}))
    proc = cli("collect", "--profile", "smoke", "--root", str(root))
    no_traceback(proc)
    named = [line for line in proc.stderr.splitlines() if "is invalid" in line]
    assert len(named) == 2 and any(str(garbage) in line for line in named)
    assert any("stages is a str" in line for line in named)
    proc = sweep(root)
    no_traceback(proc)
    assert proc.returncode == 0 and "2 done" in proc.stderr
    xr.testing.assert_identical(database(root), clean_db)
    assert len(list(garbage.parent.glob("*.invalid-*"))) == 2  # kept, never deleted


# --- 5. one line instead of a traceback ---------------------------------------------------------
@pytest.mark.parametrize(
    "args, fragments",
    [
        (TRAIN + ["--device", "nope"], ["--device 'nope'", "allowed: cpu"]),
        (["simulate", "--series", "dose", "--profile", "smoke", "--device", "nope"],
         ["--device 'nope'", "allowed: cpu"]),
        (["sweep", "--study", "dose", "--profile", "smoke", "--device", "nope"],
         ["--device 'nope'", "allowed: cpu"]),
    ],
)  # fmt: skip
def test_5_a_bad_device_is_one_line(args, fragments, tmp_path, capsys):
    main_one_line([*args, "--root", str(tmp_path)], capsys, *fragments)


@pytest.mark.parametrize("command", ["train", "sweep", "simulate"])
def test_5_a_root_that_cannot_be_written_is_refused_before_any_work(command, tmp_path, capsys):
    """Even as root, a file in the path cannot be a folder (chmod alone does not stop root)."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the project folder should be")
    args = {
        "train": TRAIN,
        "sweep": ["sweep", "--study", "dose", "--profile", "smoke"],
        "simulate": ["simulate", "--series", "dose", "--profile", "smoke"],
    }[command]
    start = time.monotonic()
    main_one_line([*args, "--root", str(blocker / "project")], capsys, "cannot write",
                  "allowed: a writable folder")  # fmt: skip
    assert time.monotonic() - start < 60  # refused at once, not after training
    assert blocker.read_text().startswith("a file")


def test_5_an_unreachable_scheduler_fails_fast_in_one_line(tmp_path):
    start = time.monotonic()
    proc = cli("sweep", "--study", "dose", "--profile", "smoke", "--root", str(tmp_path),
               "--scheduler", "tcp://127.0.0.1:1")  # fmt: skip
    assert_one_line(proc, "--scheduler tcp://127.0.0.1:1", "no Dask scheduler answered")
    assert time.monotonic() - start < 45


def test_5_book_check_only_without_a_site_or_with_an_unknown_profile(tmp_path, capsys):
    main_one_line(["book", "--check-only", "--profile", "smoke", "--root", str(tmp_path)],
                  capsys, "no built site in", "hrtem-book book --profile smoke")  # fmt: skip
    main_one_line(["book", "--check-only", "--profile", "nope", "--root", str(tmp_path)],
                  capsys, "unknown profile 'nope'; allowed: paper, laptop, gpu, smoke")  # fmt: skip


def test_5_live_without_notebooks_is_one_line(tmp_path, capsys):
    main_one_line(["live", "--profile", "smoke", "--root", str(tmp_path)], capsys,
                  "no figure notebooks in")  # fmt: skip


# --- 6. smaller cases ------------------------------------------------------------------------
@pytest.mark.slow
def test_6_train_without_transfer_needs_no_transfer_size(tmp_path, smoke_data):
    root = smoke_project(tmp_path / "p", smoke_data)
    proc = cli(*TRAIN, "--root", str(root))
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    (path,) = Layout(root, "smoke").records_dir("train").glob("*.json")
    assert json.loads(path.read_text())["kind"] == "pretrain"


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["sweep", "--study", "dose", "--profile", "smoke", "--sim-workers", "0"],
         ["--sim-workers 0", "allowed: an integer >= 1"]),
        (["sweep", "--study", "dose", "--profile", "smoke", "--workers", "-2"],
         ["--workers -2", "allowed: an integer >= 1"]),
        (["live", "--profile", "nope"], ["unknown profile 'nope'"]),
        (["book", "--profile", "smoke", "--notebook-timeout-s", "0"],
         ["--notebook-timeout-s 0", "allowed: a positive number of seconds"]),
        (TRAIN + ["--seed", "-1"], ["seed=-1", "an integer in 0.."]),
        (TRAIN + ["--n-transfer", "4"], ["--n-transfer without --transfer"]),
        (TRAIN + ["--transfer", "10"], ["--transfer needs --n-transfer", "allowed: 1..8"]),
    ],
)  # fmt: skip
def test_6_small_bad_inputs_are_one_line(args, fragments, tmp_path, capsys):
    main_one_line([*args, "--root", str(tmp_path)], capsys, *fragments)


def test_6_book_without_notebooks_complains_before_any_sweep(tmp_path, capsys):
    start = time.monotonic()
    main_one_line(["book", "--profile", "smoke", "--root", str(tmp_path)], capsys,
                  "no figure notebooks in")  # fmt: skip
    assert time.monotonic() - start < 60
    assert not Layout(tmp_path, "smoke").results_dir.exists()  # nothing was swept


# --- reliability, round two (issue 20) -------------------------------------------------------
CAMPAIGN = ["campaign", "--profile", "smoke", "--device", "cpu"]


@pytest.mark.parametrize(
    "args, fragments",
    [
        # argparse's own errors: one line, no usage block (12)
        (["sweep", "--study", "nope", "--profile", "smoke"],
         ["argument --study: invalid choice: 'nope'"]),
        (["sweep", "--study", "dose", "--profile", "smoke", "--workers", "two"],
         ["argument --workers: invalid int value: 'two'"]),
        (["sweep", "--study", "dose", "--profile", "smoke", "--executor", "nope"],
         ["argument --executor: invalid choice: 'nope'"]),
        (["book", "--reduction", "nope"], ["argument --reduction: invalid choice: 'nope'"]),
        (["live", "--port", "abc"], ["argument --port: invalid int value: 'abc'"]),
        (TRAIN + ["--seed", "x"], ["argument --seed: invalid int value: 'x'"]),
        # values argparse accepts and the pipeline cannot use (3, 4, 12)
        (TRAIN + ["--seed", str(2**64)], [f"seed={2**64}", "0..9223372036854775807"]),
        (TRAIN + ["--freeze", "bogus"], ["--freeze 'bogus' without --transfer"]),
        (["train", "--series", "heldout", "--pretrain", "experimental", "--profile", "laptop"],
         ["--pretrain 'experimental' has 8 training images", "allowed: varied"]),
        (["live", "--profile", "smoke", "--port", "-5"], ["--port -5", "1..65535"]),
        (["live", "--profile", "smoke", "--port", "99999"], ["--port 99999", "1..65535"]),
        (CAMPAIGN + ["--out", "o", "--budget-s", "nan", "--bench-steps", "0"],
         ["--budget-s nan", "allowed: more than"]),
        (CAMPAIGN + ["--out", "o", "--bench-steps", "-1"], ["--bench-steps -1", "allowed: 0"]),
    ],
)  # fmt: skip
def test_r2_bad_values_are_one_line(args, fragments, tmp_path, capsys):
    main_one_line([*args, "--root", str(tmp_path)], capsys, *fragments)


# every bad value of the two test tables above and of test_5/test_6, by the heaviest library it
# may import before it is refused: the pipeline's commands check their values in pure Python
# (hrtem_book.commands), the book's with its light modules (xarray, matplotlib; never torch)
REFUSED_BEFORE = {
    "torch, xarray, distributed": [
        ["sweep", "--study", "nope", "--profile", "smoke"],
        ["sweep", "--study", "dose", "--profile", "nope"],
        ["sweep", "--study", "dose", "--profile", "smoke", "--workers", "two"],
        ["sweep", "--study", "dose", "--profile", "smoke", "--workers", "-2"],
        ["sweep", "--study", "dose", "--profile", "smoke", "--sim-workers", "0"],
        ["sweep", "--study", "dose", "--profile", "smoke", "--executor", "nope"],
        ["sweep", "--study", "dose", "--profile", "smoke", "--device", "nope"],
        ["simulate", "--series", "nope", "--profile", "smoke"],
        ["simulate", "--series", "dose", "--profile", "smoke", "--device", "nope"],
        [*TRAIN, "--device", "nope"],
        [*TRAIN, "--seed", "x"],
        [*TRAIN, "--seed", str(2**64)],
        [*TRAIN, "--freeze", "bogus"],
        [*TRAIN, "--transfer", "10"],
        [*TRAIN, "--pretrain", "7"],
        ["collect", "--profile", "nope"],
        [*CAMPAIGN, "--out", "o", "--budget-s", "nan"],
        [*CAMPAIGN, "--out", "o", "--bench-steps", "-1"],
        [*CAMPAIGN, "--out", "o", "--max-stack", "0"],
    ],
    "torch": [
        ["book", "--reduction", "nope"],
        ["book", "--profile", "nope"],
        ["book", "--profile", "smoke", "--notebook-timeout-s", "0"],
        ["live", "--port", "abc"],
        ["live", "--profile", "smoke", "--port", "-5"],
    ],
}
REFUSE_AND_LIST_IMPORTS = """
import json, sys
from hrtem_book.cli import main
heavy, root = json.loads(sys.argv[1]), sys.argv[2]
for libraries, cases in json.loads(sys.argv[3]).items():
    for args in cases:
        try:
            status = main([*args, "--root", root])
        except SystemExit as exc:
            status = exc.code
        loaded = [m for m in heavy if m in sys.modules]
        print(json.dumps([args, status, [m for m in loaded if m in libraries.split(", ")]]))
"""


def test_r2_bad_values_are_refused_before_torch_is_imported(tmp_path):
    """(13) A refusal comes from pure Python: no bad value waits for torch (3-4 s on two
    cores), and the pipeline's commands do not wait for xarray or Dask either."""
    heavy = ["torch", "xarray", "distributed"]
    proc = subprocess.run(
        [sys.executable, "-c", REFUSE_AND_LIST_IMPORTS, json.dumps(heavy), str(tmp_path),
         json.dumps(REFUSED_BEFORE)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == sum(map(len, REFUSED_BEFORE.values()))
    assert [(args, status) for args, status, _ in rows if status != 2] == []
    assert [(args, imported) for args, _, imported in rows if imported] == []
    assert not any(tmp_path.iterdir())  # and nothing was written


def test_r2_argparse_refusals_are_one_line_on_the_console(tmp_path):
    """The same through a real console process (the cases above run in this one)."""
    proc = cli("sweep", "--study", "nope", "--profile", "smoke", "--root", str(tmp_path))
    assert_one_line(proc, "argument --study: invalid choice: 'nope'")
    assert "usage:" not in proc.stderr


def test_r2_a_local_cluster_of_no_workers_is_one_line(tmp_path, capsys):
    spec = tmp_path / "local.yaml"
    spec.write_text("kind: local\ncluster: {n_workers: -1}\n")
    main_one_line(["sweep", "--study", "dose", "--profile", "smoke", "--root", str(tmp_path),
                   "--executor", "dask", "--cluster", str(spec)], capsys,
                  "n_workers=-1", "allowed: an integer >= 1")  # fmt: skip


def _silent_listener():
    """A loopback TCP server that accepts connections and never says a word."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    held = []

    def serve():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    return server, held


def test_r2_a_listener_that_is_no_dask_scheduler_is_one_line(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    server, held = _silent_listener()
    port = server.getsockname()[1]
    command = [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"]
    http = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        http_port = int(http.stdout.readline().split(" port ")[1].split()[0])
        addresses = (f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{http_port}")

        def attempt(address: str):
            start = time.monotonic()
            root = str(tmp_path / address[-5:])
            proc = cli("sweep", "--study", "dose", "--profile", "smoke", "--root", root,
                       "--scheduler", address, timeout=120)  # fmt: skip
            return proc, time.monotonic() - start

        with ThreadPoolExecutor(2) as pool:  # both at once: each waits out the handshake
            results = list(pool.map(attempt, addresses))
        for address, (proc, seconds) in zip(addresses, results, strict=True):
            assert_one_line(proc, f"--scheduler {address}", "allowed: the address of a running")
            assert seconds < 60
    finally:
        http.kill()
        http.wait()
        server.close()
        for conn in held:
            conn.close()


@pytest.mark.slow
def test_r2_collect_names_and_moves_aside_a_damaged_database(tmp_path, clean):
    import shutil

    root = tmp_path / "p"
    shutil.copytree(clean, root, symlinks=True)
    reference = database(root)
    path = Layout(root, "smoke").database_path("defocus")
    path.write_bytes(path.read_bytes()[:200])  # truncated
    proc = cli("collect", "--profile", "smoke", "--root", str(root))
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert "moved aside to defocus.nc.invalid-" in proc.stdout
    assert len(list(path.parent.glob("defocus.nc.invalid-*"))) == 1
    xr.testing.assert_identical(database(root), reference)


@pytest.mark.slow
def test_r2_two_sweeps_started_together_simulate_once_and_train_each_run_once(tmp_path, clean_db):
    """Two sweeps on a fresh folder: the second waits for the first's simulation (no race, no
    chunks left), and a run claimed by one is left to it (the other takes its record): between
    them every run is trained exactly once, and the database is the clean run's."""
    import re

    root = tmp_path / "p"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HRTEM_BOOK_THREADS": "1"}
    command = [sys.executable, "-m", "hrtem_book.cli", "sweep", "--study", "defocus",
               "--profile", "smoke", "--root", str(root)]  # fmt: skip
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]  # fmt: skip
    outputs = [proc.communicate(timeout=300) for proc in procs]
    done = 0
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert "Traceback" not in out + err, err[-3000:]
        assert proc.returncode == 0, err[-2000:]
        done += int(re.search(r"(\d+) done", err).group(1))
    grid = build_grid("defocus", SMOKE)
    assert done == len(grid.pretrains) + len(grid.runs), [e[-600:] for _, e in outputs]
    xr.testing.assert_identical(database(root), clean_db)
    layout = Layout(root, "smoke")
    left = [
        p for p in root.rglob("*") if p.name.endswith((".lock", ".tmp")) or ".chunks" in p.parts
    ]
    assert not left, left
    assert not (layout.data_dir / ".chunks").exists()


@pytest.mark.slow
def test_r2_temporary_files_of_killed_processes_are_removed(tmp_path, clean):
    """What kill -9 leaves while a checkpoint or a series file is written (``.<name>.<pid>.tmp``
    of a process that is gone) is removed by the next sweep; a live process's is kept."""
    import shutil

    root = tmp_path / "p"
    shutil.copytree(clean, root)  # the series copied too: their folder is this project's
    layout = Layout(root, "smoke")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    stale = [layout.checkpoints_dir / f".0123456789abcdef.pt.{dead}.tmp",
             layout.data_dir / f".defocus-0123456789abcdef.nc.{dead}.tmp"]  # fmt: skip
    alive = layout.checkpoints_dir / f".fedcba9876543210.pt.{os.getpid()}.tmp"
    for path in (*stale, alive):
        path.write_bytes(b"partial")
    proc = sweep(root, study="all")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert not any(p.exists() for p in stale)
    assert alive.exists()


def cli_limited(*args: str, fsize: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """:func:`cli` in a child whose files may not grow beyond ``fsize`` bytes (RLIMIT_FSIZE, with
    SIGXFSZ ignored so that a write fails with EFBIG): a full disk without a file system."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HRTEM_BOOK_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "hrtem_book.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, preexec_fn=limit)  # fmt: skip


def _one_storage_line(proc: subprocess.CompletedProcess) -> str:
    """Status 1 and one error line (beside any progress bar), no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    (err,) = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert "finished work is kept" in err and "run the command again" in err
    return err


@pytest.mark.slow
def test_r2_a_full_disk_is_one_line_and_leaves_nothing_behind(tmp_path, clean):
    import shutil

    root = tmp_path / "p"
    shutil.copytree(clean, root, symlinks=True)
    layout = Layout(root, "smoke")
    before = {p: p.read_bytes() for p in layout.results_dir.glob("*.nc")}
    # collect: the databases do not fit
    err = _one_storage_line(cli_limited("collect", "--profile", "smoke", "--root", str(root),
                                        fsize=4096))  # fmt: skip
    assert "file size limit reached" in err or "could not be written" in err
    assert {p: p.read_bytes() for p in layout.results_dir.glob("*.nc")} == before
    assert not list(layout.results_dir.rglob("*.tmp"))
    # simulate: a series that does not fit, in a fresh project
    fresh = tmp_path / "fresh"
    err = _one_storage_line(cli_limited("simulate", "--series", "dose", "--profile", "smoke",
                                        "--root", str(fresh), fsize=64 * 1024))  # fmt: skip
    assert not list(fresh.rglob("*.tmp"))


def cli_read_only(root: Path, *args: str) -> subprocess.CompletedProcess:
    """:func:`cli` in a child that sees ``root`` mounted read-only (its own mount namespace:
    ``unshare -rm``, a read-only bind mount; nothing changes outside the child)."""
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HRTEM_BOOK_THREADS": "1"}
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, str(root), sys.executable,
                           "-m", "hrtem_book.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip


def _read_only_mounts() -> bool:
    import shutil

    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -o remount,ro,bind / / ||"
                            " mount --bind /tmp /tmp"], capture_output=True)  # fmt: skip
    return probe.returncode == 0


@pytest.mark.slow
def test_r2_a_read_only_root_is_one_line_and_changes_nothing(tmp_path, clean):
    """A project on a read-only file system (a read-only bind mount in the child's own mount
    namespace): `collect`, which must write its databases, and `sweep`, which must write
    records, each end with one line naming the read-only file system; nothing is changed."""
    import shutil

    if not _read_only_mounts():
        pytest.skip("needs mount namespaces (unshare -rm) for a read-only file system")
    root = tmp_path / "p"
    shutil.copytree(clean, root, symlinks=True)
    layout = Layout(root, "smoke")
    layout.database_path("defocus").unlink(missing_ok=True)  # collect has something to write
    for h in list(build_grid("dose", SMOKE).runs)[:1]:  # and the sweep a run to record
        layout.record_path("dose", h).unlink()
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    # collect meets it while writing (an environment failure: 1, run again); the sweep checks
    # its folders before any work (the --root given cannot be used: 2)
    for args, status in ((("collect",), 1), (("sweep", "--study", "dose"), 2)):
        proc = cli_read_only(root, *args, "--profile", "smoke", "--root", str(root))
        assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
        (err,) = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert "read-only file system" in err.lower() and proc.returncode == status, err
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


_COUNT_UNDER_LOCK = """
import sys, time
from pathlib import Path
from hrtem_book.layout import file_lock
lock, counter = Path(sys.argv[1]), Path(sys.argv[2])
for _ in range(int(sys.argv[3])):
    with file_lock(lock):
        value = int(counter.read_text())
        time.sleep(0.001)  # a lost update, were the lock not exclusive
        counter.write_text(str(value + 1))
"""


def test_a_lock_file_excludes_and_is_not_left_behind(tmp_path):
    """Checkpoint locks (``<checkpoint>.lock``) are removed on release, and removing them keeps
    the lock exclusive: four processes incrementing one counter 25 times each lose no update."""
    lock, counter = tmp_path / "x.pt.lock", tmp_path / "counter"
    counter.write_text("0")
    cmd = [sys.executable, "-c", _COUNT_UNDER_LOCK, str(lock), str(counter), "25"]
    procs = [subprocess.Popen(cmd) for _ in range(4)]
    assert [p.wait(60) for p in procs] == [0] * 4
    assert counter.read_text() == "100"
    assert not lock.exists()


@pytest.mark.slow
def test_r2_simulation_workers_end_with_a_killed_sweep(tmp_path):
    """``kill -9`` of a simulation with ``--workers 2`` leaves no worker simulating on (each
    asks the kernel to end it with its parent)."""
    import signal

    import psutil

    cmd = [sys.executable, "-m", "hrtem_book.cli", "simulate", "--series", "structure",
           "--profile", "laptop", "--root", str(tmp_path), "--workers", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent, workers = psutil.Process(proc.pid), []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(workers) < 2:
        time.sleep(0.2)
        workers = [c for c in parent.children(recursive=True)
                   if "spawn_main" in " ".join(c.cmdline())]  # fmt: skip
    assert len(workers) == 2, "the simulation did not start two workers"
    chunks = Layout(tmp_path, "laptop").data_dir
    while time.monotonic() < deadline and not list(chunks.rglob("*.nc")):
        time.sleep(0.2)  # the workers are simulating
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, [p.pid for p in alive]
