"""The companion study: the magnification and substrate series (physics) and the generalization
study (no transfer; train on one domain, test on all) through the real sweep and collect."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import smoke_project

from hrtem_book import datasets
from hrtem_book.analysis import deviation_from_ideal, generalization_matrix
from hrtem_book.layout import Layout
from hrtem_book.profiles import get_profile
from hrtem_book.results import collect, generalization_databases, load_database
from hrtem_book.series import get_series
from hrtem_book.simulate import Images, simulate_scene, view
from hrtem_book.structures import build_scene, carbon_atom_count
from hrtem_book.studies import STUDY_GROUPS, build_grid, expand_studies
from hrtem_book.studies.generalization import generalization_gaps
from hrtem_book.sweep import run_sweep

SMOKE = get_profile("smoke")
LAPTOP = get_profile("laptop").data


# --- magnification ---------------------------------------------------------------------------
def test_view_crops_the_middle_and_bins_to_the_pixel():
    a = torch.arange(36.0).reshape(6, 6)
    same = view(Images(a, 0.5), 0.5, 6)
    assert torch.equal(same.array, a) and same.sampling_A == 0.5  # the identity
    half = view(Images(a, 0.5), 1.0, 2)  # the middle 4 × 4 pixels, 2 × 2 binned
    expected = a[1:5, 1:5].reshape(2, 2, 2, 2).mean((1, 3))
    assert torch.allclose(half.array, expected) and half.sampling_A == 1.0
    with pytest.raises(ValueError, match="whole multiples"):
        view(Images(a, 0.5), 0.75, 2)
    with pytest.raises(ValueError, match="fit the field"):
        view(Images(a, 0.5), 1.0, 4)


def test_magnification_scenes_cover_the_widest_field_at_the_finest_pixel():
    spec = get_series("magnification")
    sim = spec.scene_sim(LAPTOP, None)
    pixels = LAPTOP.magnification_pixels_A
    assert sim.pixel_A == min(pixels)
    assert sim.field_nm == pytest.approx(LAPTOP.sim.image_px * max(pixels) / 10)
    # the particle count per scene grows with its area: the same density as the 6.4 nm field
    ratio = (sim.field_nm / LAPTOP.sim.field_nm) ** 2
    assert sim.particles_per_image[1] == round(LAPTOP.sim.particles_per_image[1] * ratio)
    assert [spec.pixel(LAPTOP, p) for p in pixels] == list(pixels)


@pytest.fixture(scope="module")
def magnification(tmp_path_factory):
    data = replace(SMOKE.data, n_train=4, n_val=2)
    root = tmp_path_factory.mktemp("mag")
    return data, datasets.load_series("magnification", data, root, progress=False)


def test_magnification_domains_have_their_pixel_size_and_dose_per_pixel(magnification):
    data, ds = magnification
    spec = get_series("magnification")
    n = data.sim.image_px
    assert ds.sizes["y"] == ds.sizes["x"] == n and ds["x"].attrs["units"] == "px"
    for p in data.magnification_pixels_A:
        hit = spec.matches(ds["domain"].values, p)
        assert np.allclose(ds["pixel_A"].values[hit], p)
        # vacuum intensity ≈ 1 (weak support): counts ≈ dose × pixel area
        mean = float(ds["image"].values[hit].mean())
        assert mean == pytest.approx(data.structure_series_dose * p**2, rel=0.05)


def test_magnification_shows_one_scene_at_consistent_scale(magnification):
    """The finest pixel is a zoom into the middle of the coarser one's field: the particle mask
    of a 0.5 Å image equals the middle of the 1 Å image's mask seen at twice the size."""
    data, ds = magnification
    fine, coarse = 0.5, 1.0
    assert {fine, coarse} <= set(data.magnification_pixels_A)
    n = data.sim.image_px
    ious = []
    for index in range(data.n_train):
        m = {}
        for p in (fine, coarse):
            sel = (ds["domain"].values == p) & (ds["split"].values == "train")
            sel &= ds["index"].values == index
            m[p] = ds["mask"].values[sel][0].astype(bool)
        middle = m[coarse][n // 4 : 3 * n // 4, n // 4 : 3 * n // 4]
        up = np.repeat(np.repeat(middle, 2, 0), 2, 1)
        union = (up | m[fine]).sum()
        if union:
            ious.append((up & m[fine]).sum() / union)
    assert ious and np.median(ious) > 0.8


# --- substrate -------------------------------------------------------------------------------
@pytest.mark.parametrize("thickness_nm", LAPTOP.substrate_thickness_nm)
def test_substrate_domain_has_its_support_thickness(thickness_nm):
    sim = get_series("substrate").scene_sim(LAPTOP, thickness_nm)
    scene = build_scene(sim, "CdSe", LAPTOP.series_radius_nm, np.random.default_rng(1))
    carbon = scene.atoms.positions[scene.atoms.get_tags() == 0]
    L = sim.field_nm * 10
    # the areal density of the support: density × thickness (none at 0 nm)
    expected = carbon_atom_count(L * L, thickness_nm * 10, sim.carbon_density_g_cm3)
    assert len(carbon) == expected
    if thickness_nm > 0:
        assert np.ptp(carbon[:, 2]) == pytest.approx(thickness_nm * 10, abs=1.0)
    particles = scene.atoms.positions[scene.atoms.get_tags() > 0]
    top = carbon[:, 2].max() if len(carbon) else 0.0
    assert particles[:, 2].min() > top  # the particles rest on the support


def test_thicker_support_adds_background_phase_contrast():
    """Amorphous carbon is a weak phase object: the phase variance of the exit wave away from
    the particles grows with the projected thickness (none without a support)."""
    data = SMOKE.data
    spreads = []
    for t in (0.0, 1.0, 3.0):
        sim = replace(get_series("substrate").scene_sim(data, t), n_phonons=1)
        rng = np.random.default_rng(7)
        scene = build_scene(sim, "CdSe", data.series_radius_nm, rng)
        sw = simulate_scene(scene, sim, 1.0, rng)
        phase = sw.waves.array[0].angle()
        grid = phase.shape[-1]
        mask = torch.nn.functional.interpolate(sw.mask[None, None].float(), size=grid)[0, 0]
        spreads.append(float(phase[mask < 0.5].std()))
    assert spreads[0] < 0.02  # vacuum: flat phase apart from the particles' tails
    assert spreads[0] < spreads[1] < spreads[2]


# --- the generalization study ----------------------------------------------------------------
def test_generalization_group_names_one_study_per_series():
    studies = expand_studies("generalization")
    assert studies == list(STUDY_GROUPS["generalization"])
    assert [get_series(s.split("-", 1)[1]).name for s in studies] == [
        "defocus", "dose", "structure", "magnification", "substrate"
    ]  # fmt: skip
    grid = build_grid("generalization-dose", get_profile("laptop"))
    assert grid.spec.stages == ("pretrain",) and set(grid.coords) == {"train_domain", "seed"}
    assert len(grid.runs) == len(LAPTOP.doses) * 3  # every dose × 3 seeds


def test_generalization_reuses_the_transfer_studies_pretrainings():
    """Identical configs are one run: the laptop's generalization models of the dose series
    are exactly the pretrainings the dose study transfers from."""
    laptop = get_profile("laptop")
    gen = set(build_grid("generalization-dose", laptop).runs)
    assert gen == set(build_grid("dose", laptop).pretrains)
    defocus = set(build_grid("generalization-defocus", laptop).runs)
    assert defocus == set(build_grid("defocus", laptop).pretrains)


@pytest.fixture(scope="module")
def generalization(tmp_path_factory, smoke_data):
    root = smoke_project(tmp_path_factory.mktemp("gen"), smoke_data)
    summary = run_sweep("generalization", SMOKE, root, progress=False)
    assert summary.failed == 0 and not summary.errors
    paths = collect(SMOKE, root)
    return root, paths


def test_generalization_sweep_writes_a_dice_matrix_per_series(generalization):
    root, paths = generalization
    dbs = generalization_databases(Layout(root, "smoke").results_dir)
    assert set(dbs) == {"defocus", "dose", "structure", "magnification", "substrate"}
    for series, ds in dbs.items():
        assert set(ds["final_dice"].dims) == {"train_domain", "seed", "stage", "eval_domain"}
        domains = SMOKE.data.domains(series)
        assert ds.sizes["train_domain"] == ds.sizes["eval_domain"] == len(domains)
        assert (ds["status"].values == "ok").all()
        m = generalization_matrix(ds)
        assert m.dims == ("train_domain", "test_domain")
        assert np.isfinite(m.values).all() and ((m.values >= 0) & (m.values <= 1)).all()


def test_trained_and_tested_on_one_domain_lands_on_the_diagonal(generalization):
    root, _ = generalization
    layout = Layout(root, "smoke")
    ds = load_database(layout.results_dir, "generalization-structure")
    m = generalization_matrix(ds)
    dev = deviation_from_ideal(m)
    for i, domain in enumerate(m["train_domain"].values.tolist()):
        h = str(ds["config_hash"].sel(train_domain=domain, seed=0).item())
        record = json.loads(layout.record_path("generalization-structure", h).read_text())
        dice = record["stages"]["pretrain"]["test_dice"][domain]  # on the test images
        # the model's own domain: the diagonal (databases store metrics to 1e-4)
        assert m.values[i, i] == pytest.approx(dice, abs=1e-4)
        assert dev.values[i, i] == 0.0
    # off the diagonal: the row's model on the column's domain, against the column's ideal
    j = 1
    assert dev.values[0, j] == pytest.approx(m.values[0, j] - m.values[j, j])


def test_generalization_gaps_need_two_seeds_for_a_spread(generalization):
    root, _ = generalization
    ds = load_database(Layout(root, "smoke").results_dir, "generalization-substrate")
    g = generalization_gaps(ds)
    assert len(g["gaps"]) == 2 and math.isnan(g["seed_sd"])  # smoke: one seed
    # a second seed that repeats the first exactly has no spread
    two = xr.concat([ds, ds.assign_coords(seed=[1])], "seed")
    assert generalization_gaps(two)["seed_sd"] == 0.0
