"""The held-out study: the experimental-like instrument (physics of each step), the series whose
synthetic variants borrow their scenes from the others while its experimental-like domains have
scenes of their own, and the synthetic → experimental-like study end to end."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import smoke_project

from hrtem_book import datasets, simulate
from hrtem_book.config import MeasuredImaging
from hrtem_book.evidence import FAILS, HOLDS, UNMEASURABLE
from hrtem_book.findings import collect, get_rule, score
from hrtem_book.findings import ruleset_sha as findings_ruleset_sha
from hrtem_book.layout import Layout
from hrtem_book.profiles import get_profile
from hrtem_book.results import load_database
from hrtem_book.series import HELDOUT_MEASURED, HELDOUT_SYNTHETIC, fixed_support_nm, get_series
from hrtem_book.simulate import (
    CTF,
    Images,
    detector_mtf,
    drift_transfer,
    measured_counts,
    wavelength_A,
)
from hrtem_book.studies import build_grid
from hrtem_book.studies.heldout import heldout_table
from hrtem_book.sweep import run_sweep
from hrtem_book.testing import synthetic_database

SMOKE = get_profile("smoke")
# a detector that only counts (no gain spread, blur, read noise, background or drift)
IDEAL = MeasuredImaging(
    astigmatism_A=0.0, drift_A=0.0, background_fraction=0.0, gain_shape=1e6,
    mtf_at_nyquist=1.0, read_noise_e=0.0,
)  # fmt: skip


# --- the experimental-like instrument ---------------------------------------------------------
def test_astigmatism_adds_a_two_fold_phase():
    """χ gains π λ |A1| q² cos 2(φ − φ_A): + along the astigmatism's azimuth, − across it."""
    n, step, a1, angle = 64, 0.5, 30.0, math.radians(30.0)
    plain = CTF(300e3, 0.0)._terms(n, step, "cpu")[1]
    astig = CTF(300e3, 0.0, astigmatism_A=a1, astigmatism_angle_rad=angle)._terms(n, step, "cpu")[1]
    extra = (astig - plain).double().numpy()
    q = np.fft.fftfreq(n, d=step)
    qy, qx = q[:, None], q[None, :]
    expected = (
        math.pi
        * wavelength_A(300e3)
        * a1
        * (qx**2 + qy**2)
        * np.cos(2 * (np.arctan2(qy, qx) - angle))
    )
    np.testing.assert_allclose(extra, expected, atol=1e-4)
    assert extra.max() > 0 > extra.min()


def test_drift_blurs_along_its_direction_only():
    """A linear drift of L Å is a uniform motion blur: the transfer is 1 across the drift and
    first vanishes where q·u = 1/L along it."""
    n, pixel, L = 64, 1.0, 4.0
    h = drift_transfer(n, pixel, L, 0.0)  # along x
    q = np.fft.fftfreq(n, d=pixel)
    assert np.allclose(h[:, 0], 1.0)  # qx = 0: nothing changes across the drift
    j = int(np.argmin(np.abs(q - 1 / L)))
    assert abs(h[0, j]) < 1e-12 and h[0, 1] > 0.99


def test_detector_mtf_is_its_value_at_nyquist():
    mtf = detector_mtf(64, 1.0, 0.3)
    assert mtf[0, 0] == 1.0
    assert mtf[0, 32] == pytest.approx(0.3)  # q = 1/(2 pixel) along x
    assert np.all(np.diff(mtf[0, :33]) < 0)


@pytest.mark.parametrize("shape", [1.0, 4.0])
def test_gain_spread_adds_noise_as_the_dqe_says(shape):
    """Shot noise times a gamma gain of shape k: mean = counts, variance = counts (1 + 1/k),
    i.e. DQE(0) = k / (k + 1)."""
    rng = np.random.default_rng(0)
    flat = Images(torch.ones(256, 256), 1.0)
    m = replace(IDEAL, gain_shape=shape)
    dose = 50.0
    signal = measured_counts(flat, dose, m, rng).array.double().numpy()
    assert signal.mean() == pytest.approx(dose, rel=0.01)
    # relative standard error of a variance from 65,536 pixels: about 0.6 %
    assert signal.var() / signal.mean() == pytest.approx(1 + 1 / shape, rel=0.03)


def test_background_and_mtf_act_as_configured():
    rng = np.random.default_rng(1)
    flat = Images(torch.ones(128, 128), 1.0)
    m = replace(IDEAL, background_fraction=0.2, background_gradient=0.0)
    assert measured_counts(flat, 100.0, m, rng).array.mean().item() == pytest.approx(
        120.0, rel=0.01
    )
    blurred = replace(IDEAL, mtf_at_nyquist=0.2)
    sharp = measured_counts(flat, 100.0, IDEAL, np.random.default_rng(2)).array.var().item()
    soft = measured_counts(flat, 100.0, blurred, np.random.default_rng(2)).array.var().item()
    # white noise through the MTF keeps the mean of |MTF|² of its power
    expected = float((detector_mtf(128, 1.0, 0.2) ** 2).mean())
    assert soft / sharp == pytest.approx(expected, rel=0.05)


# --- the series ---------------------------------------------------------------------------------
def test_heldout_variants_borrow_scenes_and_the_experimental_like_have_their_own():
    data = SMOKE.data
    spec = get_series("heldout")
    assert data.domains("heldout") == HELDOUT_SYNTHETIC + HELDOUT_MEASURED
    sources = {d: spec.scene_source(data, d) for d in data.domains("heldout")}
    assert sources["varied"] == ("cdse", None)
    assert sources["small"] == ("structure", "CdSe-small")
    assert sources["experimental"] == ("heldout", "experimental")
    assert sources["experimental-small"] == ("heldout", "experimental-small")
    assert sources["fixed-support"] == ("substrate", fixed_support_nm(data))
    assert fixed_support_nm(data) in data.substrate_thickness_nm
    assert {spec.imaging(data, d) is None for d in HELDOUT_SYNTHETIC} == {True}
    assert {spec.imaging(data, d) for d in HELDOUT_MEASURED} == {data.measured}


def test_heldout_series_needs_cdse_in_both_sizes(tmp_path):
    with pytest.raises(ValueError, match="heldout series has no domains"):
        datasets.generate("heldout", replace(SMOKE.data, lattices=("Cu",)), tmp_path)


def test_heldout_images_show_the_lenders_scenes_and_scenes_of_their_own(smoke_data):
    """The synthetic variants show the scenes of the series they borrow from (the same masks);
    the experimental-like images show scenes no training series has: their masks match none of
    the variants' (each scene a new draw), their particles span both size populations."""
    data = SMOKE.data
    held = datasets.load_series("heldout", data, smoke_data)

    def masks(ds, domain, split="train"):
        pos = datasets.sample_positions(ds, domain, split)
        return ds["mask"].values[pos]

    dose = datasets.load_series("dose", data, smoke_data)
    structure = datasets.load_series("structure", data, smoke_data)
    substrate = datasets.load_series("substrate", data, smoke_data)
    np.testing.assert_array_equal(masks(held, "varied"), masks(dose, data.doses[0]))
    np.testing.assert_array_equal(masks(held, "small"), masks(structure, "CdSe-small"))
    np.testing.assert_array_equal(masks(held, "large"), masks(structure, "CdSe-large"))
    np.testing.assert_array_equal(
        masks(held, "fixed-support"), masks(substrate, fixed_support_nm(data))
    )
    synthetic = np.concatenate(
        [masks(held, d, split) for d in HELDOUT_SYNTHETIC for split in ("train", "val", "test")]
    )
    for domain in HELDOUT_MEASURED:
        for split in ("train", "val", "test"):
            for mask in masks(held, domain, split):
                assert not (synthetic == mask).all(axis=(1, 2)).any(), (domain, split)
    spec = get_series("heldout")
    assert spec.scene_source(data, "experimental") == ("heldout", "experimental")
    lattice, radii = spec.scene(data, "experimental")
    assert radii == (data.small_radius_nm[0], data.series_radius_nm[1])
    assert spec.scene(data, "experimental-small")[1] == data.small_radius_nm
    sim = spec.scene_sim(data, "experimental")
    assert sim.carbon_thickness_nm == data.measured.support_nm
    assert sim.contamination_nm == data.measured.contamination_nm


def test_unrecorded_focus_offset_is_uniform_and_only_experimental():
    """Each experimental-like image's defocus carries a uniform offset within ± the range (on
    top of every series' jitter); an ideal recording draws nothing (its stream unchanged)."""
    m = MeasuredImaging(defocus_range_nm=3.0)
    rng = np.random.default_rng(0)
    offsets = np.array([datasets._focus_offset(m, rng) for _ in range(20000)])
    assert np.abs(offsets).max() <= 3.0
    assert offsets.mean() == pytest.approx(0.0, abs=0.05)
    assert offsets.var() == pytest.approx(3.0**2 / 3, rel=0.05)  # uniform on ±a: a²/3
    before = np.random.default_rng(1)
    after = np.random.default_rng(1)
    assert datasets._focus_offset(None, after) == 0.0
    assert before.random() == after.random()


def test_borrowed_scenes_are_simulated_once(tmp_path, monkeypatch):
    """Generated together, the lenders and the held-out series run each scene's multislice once;
    the experimental-like domains' own scenes are simulated for them alone, their training split
    only as many as their recordings (MeasuredImaging.n_train), the other splits in full."""
    calls = []
    real = simulate.simulate_scene

    def counting(scene, *args, **kwargs):
        calls.append(1)
        return real(scene, *args, **kwargs)

    monkeypatch.setattr(simulate, "simulate_scene", counting)
    measured = replace(SMOKE.data.measured, n_train=1)
    data = replace(SMOKE.data, n_train=2, n_val=1, n_test=1, lattices=("CdSe",), measured=measured)
    series = ("heldout", "defocus", "structure", "substrate")
    datasets.generate(series[0], data, tmp_path, progress=False, with_series=series[1:])
    per_scene = data.n_train + data.n_val + data.n_test
    recorded = measured.n_train + data.n_val + data.n_test
    # cdse (shared by defocus, dose and heldout) + 2 structure + 2 substrate scene sets, and
    # the experimental-like domains' own two
    assert len(calls) == per_scene * (1 + 2 + len(data.substrate_thickness_nm)) + 2 * recorded
    for s in (*series, "dose"):
        assert datasets.series_path(s, data, tmp_path).exists()
        assert datasets.series_problem(s, data, tmp_path) is None, s
    assert not (tmp_path / ".chunks").exists()
    ds = datasets.load_series("heldout", data, tmp_path)
    for domain in HELDOUT_MEASURED + HELDOUT_SYNTHETIC:
        n = data.n_train if domain in HELDOUT_SYNTHETIC else measured.n_train
        assert datasets.sample_positions(ds, domain, "train").size == n, domain
        assert datasets.sample_positions(ds, domain, "test").size == data.n_test, domain


def test_a_transfer_set_larger_than_the_recordings_is_refused():
    """A profile whose held-out transfers ask for more images than its experimental-like
    domains record is refused when its grid is built, naming the domain and its count."""
    laptop = get_profile("laptop")
    assert laptop.data.measured.n_train == laptop.studies["heldout"]["n_transfer"]
    studies = {**laptop.studies, "heldout": {**laptop.studies["heldout"], "n_transfer": 9}}
    with pytest.raises(ValueError, match="n_transfer=9 exceeds the 8 train images of 'experim"):
        build_grid("heldout", replace(laptop, studies=studies))


# --- the study ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def heldout_db(tmp_path_factory, smoke_data):
    root = smoke_project(tmp_path_factory.mktemp("heldout"), smoke_data)
    summary = run_sweep("heldout", SMOKE, root, progress=False, log=lambda m: None)
    assert summary.failed == summary.errors == 0
    return root, load_database(collect(SMOKE, root, ["heldout"])["heldout"])


def test_heldout_database_holds_before_and_after_on_the_experimental_images(heldout_db):
    root, ds = heldout_db
    grid = build_grid("heldout", SMOKE)
    assert ds["final_dice"].dims[:3] == ("pretrain_domain", "target_domain", "seed")
    assert list(ds["eval_domain"].values) == list(SMOKE.data.domains("heldout"))
    table = heldout_table(ds)
    assert list(table["case"].values) == ["before", "after", "after-biased"]
    assert np.isfinite(table.values).all()
    # "before" is the pretraining's own record, read on the experimental-like images
    layout = Layout(root, "smoke")
    for h, cfg in grid.pretrains.items():
        rec = json.loads(layout.record_path("heldout", h).read_text())
        dice = rec["stages"]["pretrain"]["test_dice"]["experimental"]  # its test images
        got = table.sel(pretrain_domain=cfg.domain, seed=cfg.seed, case="before")
        assert float(got) == pytest.approx(dice, abs=1e-4)  # databases keep 4 digits


def synthetic_variants_matter(dbs):
    return score(get_rule("G4"), dbs, "dice")


def transfer_rescues_experimental(dbs):
    return score(get_rule("G5"), dbs, "dice")


def size_bias_hurts_transfer(dbs):
    return score(get_rule("G6"), dbs, "dice")


def test_heldout_findings_need_two_seeds(heldout_db):
    _, ds = heldout_db
    # what the findings read is measured on the test split, never on the selection images
    assert {ds[f"final_{m}"].attrs["split"] for m in ("loss", "dice", "iou")} == {"test"}
    assert ds.attrs["ruleset_sha"] == findings_ruleset_sha()
    found = synthetic_variants_matter({"heldout": ds})
    assert found.verdict == UNMEASURABLE and "two or more seeds" in found.summary
    assert size_bias_hurts_transfer({"heldout": ds}).verdict == UNMEASURABLE
    assert transfer_rescues_experimental({}).verdict == UNMEASURABLE


def _with_dice(ds: xr.Dataset, before, after, biased) -> xr.Dataset:
    """A synthetic heldout database whose Dice on 'experimental' is set per case and variant."""
    ds = ds.copy(deep=True)
    var = ds["final_dice"]
    e = list(ds["eval_domain"].values).index("experimental")
    for i, v in enumerate(ds["pretrain_domain"].values):
        for s in range(ds.sizes["seed"]):
            jitter = 0.001 * s
            for t, target in enumerate(ds["target_domain"].values):
                var[i, t, s, 0, e] = before[v] + jitter
                var[i, t, s, 1, e] = (after if target == "experimental" else biased)[v] + jitter
    return ds


def test_heldout_rules_decide_on_the_numbers():
    ds = synthetic_database("heldout")
    variants = list(ds["pretrain_domain"].values)
    before = dict(zip(variants, (0.70, 0.80, 0.60, 0.75), strict=True))
    after = dict.fromkeys(variants, 0.88)
    worse = dict.fromkeys(variants, 0.80)
    ok = {"heldout": _with_dice(ds, before, after, worse)}
    assert synthetic_variants_matter(ok).verdict == HOLDS
    assert transfer_rescues_experimental(ok).verdict == HOLDS
    assert size_bias_hurts_transfer(ok).verdict == HOLDS
    flat = {"heldout": _with_dice(ds, dict.fromkeys(variants, 0.8), after, after)}
    assert synthetic_variants_matter(flat).verdict == FAILS
    assert size_bias_hurts_transfer(flat).verdict == FAILS
    down = {"heldout": _with_dice(ds, before, dict.fromkeys(variants, 0.65), worse)}
    assert transfer_rescues_experimental(down).verdict == FAILS


def test_gallery_puts_one_image_of_every_heldout_domain_side_by_side(smoke_data):
    """The figure a reader compares the variants and the experimental-like images in: one
    panel per domain, in the series' order, each the chosen test image of that domain."""
    from hrtem_book.figures.example_images import heldout_gallery

    held = datasets.load_series("heldout", SMOKE.data, smoke_data, progress=False)
    domains = list(dict.fromkeys(held["domain"].values.tolist()))
    fig = heldout_gallery(held, 1)
    axes = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title().split("\n")[0] for ax in axes] == domains
    for ax, domain in zip(axes, domains, strict=True):
        pos = datasets.sample_positions(held, domain, "test")[1]
        np.testing.assert_array_equal(ax.images[0].get_array(), held["image"].values[pos])
    with pytest.raises(ValueError, match="index=99 is not allowed; allowed: 0.."):
        heldout_gallery(held, 99)
