"""Training stages, pretrain → transfer with checkpoint reuse, mixtures, records and the CLI.

The tests train on a small synthetic series in the dataset schema (``testing.synthetic_series``):
discs on noise whose contrast depends on the "defocus" domain and flips sign across it, like
HRTEM phase contrast through focus, so the domains differ and transfer is meaningful.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import smoke_project

from hrtem_book import checkpoints, runs, train
from hrtem_book.cli import main as cli_main
from hrtem_book.config import (
    CPU_ISA_VARS,
    MixtureConfig,
    PretrainConfig,
    StageConfig,
    TransferConfig,
    config_hash,
)
from hrtem_book.layout import Layout
from hrtem_book.models import build_model, count_parameters
from hrtem_book.profiles import NARROW_MODEL, SMOKE_DATA, SMOKE_STAGE, get_profile
from hrtem_book.testing import SYNTHETIC_DOMAINS, synthetic_series

DOMAINS = SYNTHETIC_DOMAINS  # the smoke profile's defoci [nm]
PX = 32  # the smoke profile's image size (3.2 nm at 1 Å per pixel)
STAGE = StageConfig(max_epochs=3, batch_size=4, augment="none", n_eval=6)


def run(cfg, *, root, **kw) -> dict:
    """``runs.run`` with the layout of the smoke profile in the project folder ``root``."""
    return runs.run(cfg, Layout(root, "smoke"), **kw)


def checkpoint_path(root, cfg: PretrainConfig):
    return checkpoints.checkpoint_path(Layout(root, "smoke"), cfg)


@pytest.fixture(scope="module")
def data() -> xr.Dataset:
    return synthetic_series()


def pretrain_cfg(**changes) -> PretrainConfig:
    base = PretrainConfig(
        data=SMOKE_DATA,
        series="defocus",
        domain=-10.0,
        lr=3e-3,
        seed=0,
        model=NARROW_MODEL,
        stage=STAGE,
        n_train=16,
    )
    return replace(base, **changes)


def transfer_cfg(freeze: str = "none", **changes) -> TransferConfig:
    base = TransferConfig(
        pretrain_cfg(), domain=10.0, n_train=8, lr=1e-3, freeze=freeze, stage=STAGE
    )
    return replace(base, **changes)


def mixture_cfg(**changes) -> MixtureConfig:
    base = MixtureConfig(
        data=SMOKE_DATA,
        series="defocus",
        domains=(-10, 10),
        n_images=(4, 12),
        lr=3e-3,
        seed=0,
        model=NARROW_MODEL,
        stage=STAGE,
    )
    return replace(base, **changes)


# --- building blocks --------------------------------------------------------------------------
def test_standardize_gives_mean_zero_variance_one_per_image():
    x = torch.rand(3, 1, 16, 16) * torch.tensor([1.0, 50.0, 1e4]).view(3, 1, 1, 1) + 7
    z = train.standardize(x)
    torch.testing.assert_close(z.mean(dim=(-2, -1)), torch.zeros(3, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        z.var(dim=(-2, -1), unbiased=False), torch.ones(3, 1), atol=1e-4, rtol=0
    )


def test_d4_is_the_dihedral_group_and_keeps_images_and_masks_aligned():
    x = torch.arange(16.0).view(1, 4, 4)  # no symmetry: all 8 elements differ
    copies = [train.d4(x, k) for k in range(8)]
    assert len({tuple(c.flatten().tolist()) for c in copies}) == 8
    for k in range(8):  # closure: applying any element twice stays in the group
        assert any(torch.equal(train.d4(copies[k], k), c) for c in copies)
    images = torch.randn(8, 1, 6, 6)
    masks = (images[:, 0] > 0).long()
    ks = torch.arange(8)
    assert torch.equal(train._augment(images, ks)[:, 0] > 0, train._augment(masks, ks) == 1)


@pytest.mark.parametrize("n, d4", [(5, False), (9, False), (8, False), (3, True)])
def test_an_epoch_sees_every_image_once_and_never_a_batch_of_one(n, d4):
    stage = StageConfig(batch_size=4, augment="d4" if d4 else "none")
    batches = list(train._batches(n, stage, torch.Generator().manual_seed(0)))
    pairs = [(i, k) for idx, ks in batches for i, k in zip(idx.tolist(), ks.tolist(), strict=True)]
    assert sorted(pairs) == [(i, k) for i in range(n) for k in range(8 if d4 else 1)]
    assert min(len(idx) for idx, _ in batches) > 1


def test_random_d4_shows_every_image_once_in_varied_orientations():
    stage = StageConfig(batch_size=4, augment="d4-random")
    gen = torch.Generator().manual_seed(0)
    seen = [list(zip(*(t.tolist() for t in pair), strict=True))
            for pair in train._batches(64, stage, gen)]  # fmt: skip
    pairs = [p for batch in seen for p in batch]
    assert sorted(i for i, _ in pairs) == list(range(64))  # each image once per epoch
    assert len({k for _, k in pairs}) == 8  # every orientation occurs


def test_a_remainder_of_one_image_trains(data, tmp_path):
    # 5 images in batches of 4: a lone last image at a 1×1 bottleneck broke BatchNorm
    record = run(pretrain_cfg(n_train=5, stage=replace(STAGE, max_epochs=1)), root=tmp_path,
                       data=data)  # fmt: skip
    assert record["status"] == "ok"


def test_select_takes_the_first_images_by_index(data):
    images, masks = train.select(data, 0.0, "val", 3)
    assert images.shape == (3, 1, PX, PX) and images.dtype == torch.float32
    assert masks.shape == (3, PX, PX) and masks.dtype == torch.int64
    keep = (data.domain == 0.0) & (data.split == "val") & (data["index"] < 3)
    assert torch.equal(masks, torch.from_numpy(data["mask"].values[keep.values].astype(np.int64)))
    with pytest.raises(ValueError, match=r"allowed: 1\.\.8"):
        train.select(data, 0.0, "val", 9)


# --- one stage --------------------------------------------------------------------------------
def test_record_format_and_falling_loss(data, tmp_path):
    record = run(pretrain_cfg(), root=tmp_path, data=data)
    assert record["status"] == "ok" and record["error"] is None and record["kind"] == "pretrain"
    assert set(record) == {
        "record_format", "config_hash", "kind", "config", "status", "error", "stages",
        "trainable_params", "total_params", "package_version", "git_commit", "compute",
    }  # fmt: skip
    json.dumps(record, allow_nan=False)  # JSON-serialisable, finite
    s = record["stages"]["pretrain"]
    assert set(s) == {
        "train_loss", "val_loss", "val_dice", "val_iou", "best_loss", "best_dice", "best_iou",
        "final_loss", "final_dice", "final_iou", "test_loss", "test_dice", "test_iou",
        "train_time_s", "eval_time_s", "peak_memory_mb", "epochs_run", "best_epoch",
        "stop_reason", "monitor", "test_image_loss", "test_image_counts",
    }  # fmt: skip
    assert s["epochs_run"] == STAGE.max_epochs == len(s["train_loss"])
    assert s["stop_reason"] == "max_epochs" and s["monitor"] == {"-10.0": 1.0}
    for m in ("loss", "dice", "iou"):
        assert set(s[f"val_{m}"]) == {str(d) for d in DOMAINS}  # every domain, every epoch
        assert all(len(h) == STAGE.max_epochs for h in s[f"val_{m}"].values())
    assert s["best_loss"] == {k: min(h) for k, h in s["val_loss"].items()}
    assert s["best_dice"] == {k: max(h) for k, h in s["val_dice"].items()}
    # the stage keeps its best in-domain epoch: final_* are that epoch's values on every domain
    kept = s["best_epoch"]
    assert s["val_loss"]["-10.0"][kept - 1] == min(s["val_loss"]["-10.0"])
    for m in ("loss", "dice", "iou"):
        assert s[f"final_{m}"] == {k: h[kept - 1] for k, h in s[f"val_{m}"].items()}
    assert s["train_loss"][-1] < s["train_loss"][0]
    assert s["val_loss"]["-10.0"][-1] < s["val_loss"]["-10.0"][0]
    assert record["trainable_params"] == record["total_params"] == 920_722
    assert s["train_time_s"] > 0 and s["peak_memory_mb"] > 0


def test_the_kept_model_is_scored_on_test_images_no_selection_read(data, tmp_path):
    """Selection (plateau, kept epoch) reads the validation images; the numbers a database and
    the book report (``test_*``) are the kept model's on the test images of every domain, a
    split whose scenes no other split shows."""
    cfg = pretrain_cfg()
    s = run(cfg, root=tmp_path, data=data)["stages"]["pretrain"]
    model = build_model(cfg.model)
    model.load_state_dict(checkpoints.load_checkpoint(checkpoint_path(tmp_path, cfg), cfg)[
        "state_dict"])  # fmt: skip
    for split, numbers in (("test", s["test_loss"]), ("val", s["final_loss"])):
        n = None if split == "test" else STAGE.n_eval  # every test image; the stage's val
        sets = {str(d): train.select(data, d, split, n) for d in DOMAINS}
        got = train.evaluate_domains(model, train.EvalSet.from_sets(sets))["loss"]
        assert got == pytest.approx(numbers, rel=1e-5), split
    assert s["test_loss"] != pytest.approx(s["final_loss"], rel=1e-3)
    # each test image's own scores: the loss their mean, Dice and IoU their summed counts'
    for dom, losses in s["test_image_loss"].items():
        counts = np.array(s["test_image_counts"][dom])
        n_test = int(((data["split"] == "test") & (data["domain"] == float(dom))).sum())
        assert len(losses) == len(counts) == n_test and counts.shape[1] == 3
        assert np.mean(losses) == pytest.approx(s["test_loss"][dom], abs=1e-6)
        tp, fp, fn = counts.sum(axis=0)
        assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(s["test_dice"][dom], rel=1e-9)
        assert tp / (tp + fp + fn) == pytest.approx(s["test_iou"][dom], rel=1e-9)
    test_images = data["image"].values[data["split"].values == "test"]
    other = data["image"].values[data["split"].values != "test"]
    assert not any(np.array_equal(t, o) for t in test_images for o in other)


def test_pretrained_model_beats_untrained_on_its_domain(data, tmp_path):
    cfg = pretrain_cfg()
    record = run(cfg, root=tmp_path, data=data)
    torch.manual_seed(cfg.seed)
    untrained = build_model(cfg.model)
    val = train.select(data, cfg.domain, "val", STAGE.n_eval)
    assert record["stages"]["pretrain"]["best_loss"]["-10.0"] < train.evaluate(untrained, *val)


def test_cpu_training_is_deterministic(data, tmp_path):
    cfg = transfer_cfg("encoder")
    first = run(cfg, root=tmp_path / "a", data=data)
    again = run(cfg, root=tmp_path / "b", data=data)  # pretrains again, in another root
    loaded = run(cfg, root=tmp_path / "a", data=data)  # reuses the checkpoint
    for other in (again, loaded):
        assert other["stages"] == _without_time(first["stages"], other["stages"])


def _without_time(stages: dict, like: dict) -> dict:
    """``stages`` with the wall-clock and memory entries of ``like`` (they may differ)."""
    out = json.loads(json.dumps(stages))
    for name, s in out.items():
        for key in ("train_time_s", "eval_time_s", "peak_memory_mb"):
            s[key] = like[name][key]
    return out


def test_d4_augmentation_multiplies_the_epoch(data, tmp_path, monkeypatch):
    cfg = pretrain_cfg(stage=replace(STAGE, max_epochs=1, augment="d4"), n_train=4)
    calls = []
    original = train._batches
    batches = lambda n, stage, gen: (calls.append(b) or b for b in original(n, stage, gen))  # noqa: E731
    monkeypatch.setattr(train, "_batches", batches)
    record = run(cfg, root=tmp_path, data=data)
    assert record["status"] == "ok"
    assert sorted(
        (i.item(), k.item()) for idx, ks in calls for i, k in zip(idx, ks, strict=True)
    ) == [(i, k) for i in range(4) for k in range(8)]  # every image in all 8 orientations, once


# --- pretrain → transfer ----------------------------------------------------------------------
def test_transfer_runs_share_one_pretraining(data, tmp_path, monkeypatch):
    calls = []
    original = runs.train_pretrain
    monkeypatch.setattr(runs, "train_pretrain", lambda *a: calls.append(1) or original(*a))
    records = [run(transfer_cfg(f), root=tmp_path, data=data) for f in ("none", "encoder")]
    path = checkpoint_path(tmp_path, pretrain_cfg())
    mtime = path.stat().st_mtime_ns
    records.append(run(transfer_cfg("decoder"), root=tmp_path, data=data))
    records.append(run(pretrain_cfg(), root=tmp_path, data=data))  # loads, never retrains
    assert len(calls) == 1 and path.stat().st_mtime_ns == mtime
    assert all(r["status"] == "ok" for r in records)
    pretrain_stages = [r["stages"]["pretrain"] for r in records]
    assert all(s == pretrain_stages[0] for s in pretrain_stages)
    assert [r["kind"] for r in records] == ["transfer"] * 3 + ["pretrain"]
    total = records[0]["total_params"]
    assert [r["trainable_params"] for r in records] == [total, 209_778, 711_090, total]


def test_concurrent_transfer_runs_train_their_pretraining_once(data, tmp_path, monkeypatch):
    """Two workers (threads here; the lock is per open file, so processes behave alike) start
    transfer runs of one pretraining at once: one trains it, the other waits and loads it."""
    calls = []
    original = runs.train_pretrain
    monkeypatch.setattr(runs, "train_pretrain", lambda *a: calls.append(1) or original(*a))
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(run, transfer_cfg(f), root=tmp_path, data=data)
                for f in ("none", "encoder")]  # fmt: skip
        records = [job.result() for job in jobs]
    assert len(calls) == 1
    assert records[0]["stages"]["pretrain"] == records[1]["stages"]["pretrain"]
    assert not list(checkpoint_path(tmp_path, pretrain_cfg()).parent.glob(".*.tmp"))


def test_transfer_keeps_frozen_encoder_and_its_batchnorm(data, tmp_path, monkeypatch):
    cfg = transfer_cfg("encoder")
    run(cfg, root=tmp_path, data=data)
    ckpt = checkpoints.load_checkpoint(checkpoint_path(tmp_path, cfg.pretrain), cfg.pretrain)
    calls = []
    original = train.train_stage
    stage = lambda model, *a, **k: calls.append(model) or original(model, *a, **k)  # noqa: E731
    monkeypatch.setattr(train, "train_stage", stage)
    run(cfg, root=tmp_path, data=data)
    state = calls[0].state_dict()
    encoder = [k for k in state if k.startswith("encoder.") and state[k].is_floating_point()]
    decoder = [k for k in state if k.startswith("decoder.") and state[k].is_floating_point()]
    assert any("running_mean" in k for k in encoder)
    assert all(torch.equal(state[k], ckpt["state_dict"][k]) for k in encoder)
    assert not any(torch.equal(state[k], ckpt["state_dict"][k]) for k in decoder)


def test_a_checkpoint_of_another_config_is_named_moved_aside_and_trained_again(
    data, tmp_path, capsys
):
    """A valid checkpoint of another config copied over this one's is foreign derived data: the
    run names it, moves it aside and trains the right pretraining (never a sweep that fails on
    it rerun after rerun)."""
    run(pretrain_cfg(), root=tmp_path, data=data)
    other = pretrain_cfg(lr=1e-4)
    clean = run(transfer_cfg(pretrain=other), root=tmp_path / "clean", data=data)
    capsys.readouterr()
    source = checkpoint_path(tmp_path, pretrain_cfg())
    target = checkpoint_path(tmp_path, other)
    shutil.copy(source, target)
    with pytest.raises(checkpoints.ForeignCheckpoint, match=r"\(fields differ: lr\)"):
        checkpoints.load_checkpoint(target, other)
    record = run(transfer_cfg(pretrain=other), root=tmp_path, data=data)
    assert record["stages"] == _without_time(clean["stages"], record["stages"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fields differ: lr" in err[0] and "training it again" in err[0]
    assert len(list(target.parent.glob(f"{target.name}.invalid-*"))) == 1


def test_truncated_checkpoint_is_trained_again(data, tmp_path, capsys):
    """A damaged checkpoint is derived data: moved aside (never deleted) and trained again; the
    deterministic training gives back the same pretraining."""
    clean = run(transfer_cfg(), root=tmp_path / "clean", data=data)
    run(pretrain_cfg(), root=tmp_path, data=data)
    path = checkpoint_path(tmp_path, pretrain_cfg())
    path.write_bytes(path.read_bytes()[:1000])
    record = run(transfer_cfg(), root=tmp_path, data=data)
    assert record["stages"] == _without_time(clean["stages"], record["stages"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is unreadable" in err[0] and "training it again" in err[0]
    assert len(list(path.parent.glob(f"{path.name}.invalid-*"))) == 1


def test_a_checkpoint_of_an_older_record_format_is_trained_again(data, tmp_path, capsys):
    """A checkpoint whose record lacks what this code stores (written by older code) is
    foreign derived data: named, moved aside and trained again, never read half."""
    run(pretrain_cfg(), root=tmp_path, data=data)
    path = checkpoint_path(tmp_path, pretrain_cfg())
    ckpt = torch.load(path, weights_only=True)
    old = {**ckpt["record"], "record_format": 3}
    checkpoints.save_checkpoint(path, pretrain_cfg(), old, ckpt["state_dict"])  # valid checksum
    record = run(transfer_cfg(), root=tmp_path, data=data)
    assert record["status"] == "ok" and "test_image_loss" in record["stages"]["pretrain"]
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "holds a record of format 3" in err[0] and "training it again" in err[0]
    )
    assert len(list(path.parent.glob(f"{path.name}.invalid-*"))) == 1


def test_mixture_trains_on_both_domains(data, tmp_path):
    record = run(mixture_cfg(), root=tmp_path, data=data)
    assert record["status"] == "ok" and record["kind"] == "mixture"
    assert set(record["stages"]) == {"mixture"}
    assert record["stages"]["mixture"]["epochs_run"] == STAGE.max_epochs
    # it trains on both and is selected on its target's validation images, as a transfer is
    assert record["stages"]["mixture"]["monitor"] == {"10.0": 1.0}


def test_mixture_with_a_zero_share_trains_on_the_other_domain(data, tmp_path):
    # studies.parse_mix allows "0:n"; such a mixture is one domain alone, never an error
    cfg = mixture_cfg(n_images=(0, 8), stage=replace(STAGE, max_epochs=1))
    record = run(cfg, root=tmp_path, data=data)
    assert record["status"] == "ok" and record["stages"]["mixture"]["epochs_run"] == 1


# --- failures ---------------------------------------------------------------------------------
def test_diverging_run_fails_without_raising(data, tmp_path):
    record = run(pretrain_cfg(lr=1e30), root=tmp_path, data=data)
    assert record["status"] == "failed"
    assert "non-finite training loss" in record["error"]
    assert record["stages"]["pretrain"]["epochs_run"] == 0
    json.dumps(record, allow_nan=False)
    transfer = run(transfer_cfg(pretrain=pretrain_cfg(lr=1e30)), root=tmp_path, data=data)
    assert transfer["status"] == "failed" and transfer["error"].startswith("pretraining failed")


def test_injected_nan_image_fails_the_run(data, tmp_path):
    broken = data.copy(deep=True)
    broken["image"][0, 0, 0] = np.nan  # the first training image of domain -10
    record = run(pretrain_cfg(), root=tmp_path, data=broken)
    assert record["status"] == "failed" and "nan" in record["error"]


def test_bad_run_inputs_are_value_errors(data, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="domain 5.0 is not in the series; allowed: -10.0, 0.0"):
        run(pretrain_cfg(domain=5.0), root=tmp_path, data=data)
    with pytest.raises(ValueError, match=r"n=17 images requested; allowed: 1\.\.16"):
        run(pretrain_cfg(n_train=17), root=tmp_path, data=data)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device here; allowed: cpu"):
            run(pretrain_cfg(), root=tmp_path, device="cuda", data=data)
    monkeypatch.setenv("HRTEM_BOOK_THREADS", "two")
    with pytest.raises(ValueError, match="HRTEM_BOOK_THREADS='two'"):
        run(pretrain_cfg(), root=tmp_path, data=data)


# --- command line -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--series", "focus"], "--series 'focus'; allowed: defocus, dose, structure"),
        (["--pretrain", "-7"], "--pretrain '-7'; allowed for defocus: -10.0, 0.0, 10.0"),
        (["--transfer", "x"], "--transfer 'x'; allowed for defocus"),
        (["--n-transfer", "9"], r"--n-transfer 9; allowed: 1\.\.8"),
        (["--freeze", "head"], "freeze='head'; allowed: none, encoder, decoder"),
        (["--profile", "huge"], "unknown profile 'huge'"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(args, message, tmp_path, capsys):
    base = ["train", "--series", "defocus", "--pretrain", "-10", "--transfer", "10",
            "--n-transfer", "4", "--freeze", "none", "--profile", "smoke",
            "--root", str(tmp_path)]  # fmt: skip
    for i in range(0, len(args), 2):
        base[base.index(args[i]) + 1] = args[i + 1]
    assert cli_main(base) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err


def test_cli_trains_and_writes_a_record(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runs, "open_series", lambda *args, **kw: data)
    argv = ["train", "--series", "defocus", "--pretrain", "-10", "--transfer", "10",
            "--n-transfer", "8", "--freeze", "encoder", "--profile", "smoke",
            "--root", str(tmp_path)]  # fmt: skip
    assert cli_main(argv) == 0
    out = capsys.readouterr()
    rows = [line for line in out.out.splitlines() if line.startswith(("pretrain ", "transfer "))]
    assert len(rows) == 2 * SMOKE_STAGE.max_epochs
    records = list((tmp_path / "results" / "smoke" / "records" / "train").glob("*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["kind"] == "transfer" and record["config"]["freeze"] == "encoder"
    assert record["trainable_params"] < count_parameters(build_model(NARROW_MODEL))[1]


# --- precision ----------------------------------------------------------------------------------
def test_cpu_profiles_train_in_fp32_and_bf16_is_an_opt_in_variant(tmp_path):
    """The same numbers on every x86 CPU: the CPU profiles are fp32; bf16 is the gpu profile's
    and a named variant of each CPU profile that reads its base's data and keeps its results
    apart (precision is in every stage config, so the runs hash differently)."""
    for name in ("smoke", "laptop", "paper"):
        profile = get_profile(name)
        assert profile.precisions == ("fp32",)
        variant = get_profile(f"{name}-bf16")
        assert variant.precisions == ("bf16",) and variant.base == name
        assert variant.data == profile.data and variant.studies == profile.studies
        assert Layout.of(tmp_path, variant).data_dir == Layout.of(tmp_path, profile).data_dir
        assert Layout.of(tmp_path, variant).results_dir != Layout.of(tmp_path, profile).results_dir
    assert get_profile("gpu").precisions == ("bf16",)
    pre = pretrain_cfg()
    assert config_hash(pre) != config_hash(replace(pre, stage=replace(STAGE, precision="bf16")))
    # and their kernels pinned to AVX2 (the bf16 variants and the gpu profile: the device's own)
    for name in ("smoke", "laptop", "paper"):
        profile = get_profile(name)
        assert {profile.stage.cpu_isa, profile.transfer.cpu_isa} == {"avx2"}
        assert profile.cpu_env == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
        assert get_profile(f"{name}-bf16").cpu_env == {}
    assert get_profile("gpu").cpu_env == {}
    assert config_hash(pre) != config_hash(replace(pre, stage=replace(STAGE, cpu_isa="avx2")))
    with pytest.raises(ValueError, match="cpu_isa='avx512'; allowed: None, avx2"):
        StageConfig(cpu_isa="avx512")
    with pytest.raises(ValueError, match="bf16 needs the CPU's own bf16 kernels"):
        StageConfig(cpu_isa="avx2", precision="bf16")


_ISA_PROBE = (
    "import torch; from hrtem_book import train; "
    "print(torch.backends.cpu.get_cpu_capability()); print(train.cpu_isa_problem('avx2', 'cpu'))"
)


def _unpinned_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in CPU_ISA_VARS}


def test_a_process_not_pinned_to_the_profiles_kernels_is_refused():
    """Torch reads the pin when it loads: a process that loaded it unpinned on a CPU with wider
    kernels than AVX2 would compute other numbers and is refused in one line; a pinned one (as
    this test process: conftest) computes with AVX2 kernels."""
    pinned = subprocess.run([sys.executable, "-c", _ISA_PROBE], capture_output=True, text=True,
                            check=True).stdout.split("\n")  # fmt: skip
    unpinned = subprocess.run([sys.executable, "-c", _ISA_PROBE], capture_output=True, text=True,
                              check=True, env=_unpinned_env()).stdout.split("\n")  # fmt: skip
    assert pinned[:2] == ["AVX2", "None"]
    if unpinned[0].startswith("AVX512"):
        assert "this process computes with other kernels" in unpinned[1]
        assert (
            "ONEDNN_MAX_CPU_ISA=AVX2" in unpinned[1] and "ATEN_CPU_CAPABILITY=avx2" in unpinned[1]
        )
    else:  # an AVX2 CPU: its own kernels are the pinned ones
        assert unpinned[:2] == ["AVX2", "None"]


def test_the_command_line_pins_the_kernels_before_torch_loads(smoke_data, tmp_path):
    """Started without the pin, `hrtem-book train` sets it for itself: the record says AVX2."""
    root = smoke_project(tmp_path, smoke_data)
    proc = subprocess.run(
        [sys.executable, "-m", "hrtem_book.cli", "train", "--series", "defocus", "--pretrain",
         "-10", "--profile", "smoke", "--root", str(root)],
        capture_output=True, text=True, timeout=300, env=_unpinned_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = (root / "results" / "smoke" / "records" / "train").glob("*.json")
    assert json.loads(path.read_text())["compute"]["cpu_capability"].split()[0] == "AVX2"


@pytest.mark.parametrize(
    "capability, native",
    [("AVX2", False), ("AVX512", False), ("DEFAULT", False), ("AVX512 AVX512_BF16", True),
     ("AVX512 AVX512_BF16 AMX", True), ("AVX512 AMX", True)],
)  # fmt: skip
def test_native_bf16_means_avx512_bf16_or_amx(capability, native):
    assert train.native_bf16(capability) is native


def test_bf16_on_a_cpu_without_it_exits_2_with_one_line_before_any_work(tmp_path):
    """On this machine's CPU: refused in one line (exit 2, nothing simulated) unless it computes
    bf16 natively. The real command line, in a fresh process (no torch imported beforehand)."""
    capability = train.cpu_capability()
    if train.native_bf16(capability):
        assert train.precision_problem("bf16", "cpu") is None
        pytest.skip(f"this CPU ({capability}) has native bf16: the opt-in is allowed here")
    for argv in (
        ["train", "--series", "defocus", "--pretrain", "-10", "--profile", "smoke-bf16"],
        ["sweep", "--study", "defocus", "--profile", "laptop-bf16"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "hrtem_book.cli", *argv, "--root", str(tmp_path)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert f"precision bf16 on this CPU ({capability})" in lines[0]
        assert "allowed here:" in lines[0]
    assert not (tmp_path / "data").exists()  # nothing simulated, nothing trained


def test_records_say_where_they_computed(data, tmp_path):
    record = run(transfer_cfg(), root=tmp_path, data=data)
    assert record["compute"] == train.compute_provenance("cpu")
    assert record["compute"]["cpu_capability"] == train.cpu_capability()


# --- the real smoke series --------------------------------------------------------------------
@pytest.mark.slow
def test_pretrain_and_transfer_on_the_simulated_smoke_series(tmp_path):
    """End to end through the default loader: the series is simulated into data/smoke of the
    project folder (about 10 s), then pretrained and transferred."""
    profile = get_profile("smoke")
    pre = PretrainConfig(
        data=profile.data,
        series="defocus",
        domain=-10,
        lr=1e-3,
        seed=0,
        model=profile.model,
        stage=profile.stage,
        n_train=profile.n_pretrain,
    )
    cfg = TransferConfig(pre, domain=10, n_train=4, lr=1e-4, freeze="encoder", stage=profile.stage)
    record = run(cfg, root=tmp_path)
    assert record["status"] == "ok", record["error"]
    assert len(list((tmp_path / "data" / "smoke").glob("defocus-*.nc"))) == 1
    for stage in ("pretrain", "transfer"):
        history = record["stages"][stage]["val_loss"]
        assert set(history) == {str(d) for d in profile.data.defoci_nm}
        assert all(len(h) == record["stages"][stage]["epochs_run"] for h in history.values())
        assert record["stages"][stage]["stop_reason"] in ("plateau", "max_epochs")


@pytest.mark.gpu
def test_cuda_run_matches_the_cpu_run_closely(data, tmp_path):
    """bf16 autocast + channels_last on the GPU: same record layout, losses near the CPU's."""
    cfg = transfer_cfg("encoder")
    gpu = run(cfg, root=tmp_path / "gpu", device="cuda", data=data)
    cpu = run(cfg, root=tmp_path / "cpu", data=data)
    assert gpu["status"] == "ok" and set(gpu["stages"]) == {"pretrain", "transfer"}
    for stage in ("pretrain", "transfer"):
        g, c = gpu["stages"][stage]["train_loss"], cpu["stages"][stage]["train_loss"]
        # bf16 keeps ~3 significant digits; a few optimiser steps keep the curves within 10 %
        assert np.allclose(g, c, rtol=0.1), (stage, g, c)
