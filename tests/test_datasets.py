"""Dataset series: layout, shared scenes, split separation, determinism, resumption, bad input."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import xarray as xr

from hrtem_book import datasets
from hrtem_book.config import DataConfig, SimulationConfig
from hrtem_book.profiles import get_profile

SMOKE = get_profile("smoke").data
# the smallest structure series that still has several chunks
TINY = replace(SMOKE, n_train=3, n_val=2, n_test=1, lattices=("Cu",), sizes=("small",))


@pytest.fixture(scope="module")
def cdse(tmp_path_factory):
    root = tmp_path_factory.mktemp("cdse")
    defocus = datasets.load_series("defocus", SMOKE, root, progress=False)
    dose = datasets.load_series("dose", SMOKE, root, progress=False)
    return root, defocus, dose


def test_layout_follows_the_architecture(cdse):
    root, ds, _ = cdse
    sim = SMOKE.sim
    n = len(SMOKE.defoci_nm) * (SMOKE.n_train + SMOKE.n_val + SMOKE.n_test)
    assert ds.sizes == {"sample": n, "y": sim.image_px, "x": sim.image_px}
    assert ds["image"].dtype == np.float32 and ds["mask"].dtype == np.uint8
    assert set(ds.coords) >= {"domain", "split", "index", "defocus_nm"}
    assert ds.attrs["series"] == "defocus" and ds.attrs["seed"] == SMOKE.seed
    assert ds.attrs["config_hash"] == datasets.series_hash("defocus", SMOKE)
    assert DataConfig.__name__ and '"field_nm":3.2' in ds.attrs["config"]
    assert datasets.series_path("defocus", SMOKE, root).exists()
    assert not (root / ".chunks" / f"defocus-{ds.attrs['config_hash']}").exists()
    # counts ~ dose × pixel area (vacuum intensity 1); masks are binary and not empty
    expected = SMOKE.defocus_series_dose * sim.pixel_A**2
    assert float(ds["image"].mean()) == pytest.approx(expected, rel=0.05)
    assert set(np.unique(ds["mask"].values)) == {0, 1}
    # defocus used = domain + jitter of σ = defocus_jitter_nm
    jitter = ds["defocus_nm"].values - ds["domain"].values
    assert 0.3 * sim.defocus_jitter_nm < jitter.std() < 3 * sim.defocus_jitter_nm


def test_defocus_and_dose_series_share_scenes_but_not_splits(cdse):
    _, defocus, dose = cdse
    _, m_defocus = datasets.domain_tensors(defocus, SMOKE.defoci_nm[0], "train")
    _, m_other = datasets.domain_tensors(defocus, SMOKE.defoci_nm[-1], "train")
    _, m_dose = datasets.domain_tensors(dose, SMOKE.doses[0], "train")
    assert torch.equal(m_defocus, m_other) and torch.equal(m_defocus, m_dose)
    _, m_val = datasets.domain_tensors(defocus, SMOKE.defoci_nm[0], "val")
    for v in m_val:  # no validation structure is a training structure
        assert not any(torch.equal(v, t) for t in m_defocus)


def test_domain_tensors_shapes_and_errors(cdse):
    _, _, dose = cdse
    images, masks = datasets.domain_tensors(dose, SMOKE.doses[1], "val", n=3)
    px = SMOKE.sim.image_px
    assert images.shape == (3, 1, px, px) and images.dtype == torch.float32
    assert masks.shape == (3, px, px) and masks.dtype == torch.int64
    # higher dose ⇒ more counts per pixel, in proportion
    low, _ = datasets.domain_tensors(dose, SMOKE.doses[0], "val")
    ratio = float(images.mean() / low[:3].mean())
    assert ratio == pytest.approx(SMOKE.doses[1] / SMOKE.doses[0], rel=0.05)
    with pytest.raises(ValueError, match="allowed"):
        datasets.domain_tensors(dose, 1234.0, "val")
    with pytest.raises(ValueError, match="split"):
        datasets.domain_tensors(dose, SMOKE.doses[0], "holdout")


def _structure(root, **kw):
    return xr.load_dataset(datasets.generate("structure", TINY, root, progress=False, **kw))


def test_generation_is_deterministic_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "CHUNK_SCENES", 2)  # 3 + 2 + 1 scenes → 4 chunks
    reference = _structure(tmp_path / "a")
    assert reference.sizes["sample"] == TINY.n_train + TINY.n_val + TINY.n_test
    assert np.array_equal(_structure(tmp_path / "b")["image"], reference["image"])

    # interrupt for real after the first chunk: the next chunk raises
    run_unit, calls = datasets._run_unit, []

    def failing(unit, *args):
        calls.append(unit)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_unit(unit, *args)

    monkeypatch.setattr(datasets, "_run_unit", failing)
    root = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        datasets.generate("structure", TINY, root, progress=False)
    chunks = list((root / ".chunks").rglob("*.nc"))
    assert len(chunks) == 1 and not datasets.series_path("structure", TINY, root).exists()
    monkeypatch.setattr(datasets, "_run_unit", run_unit)
    resumed = _structure(root)
    xr.testing.assert_identical(resumed, reference)


def test_seeds_make_images_order_independent(tmp_path, monkeypatch):
    """Chunks computed in reverse order (as parallel workers may) give the same dataset."""
    monkeypatch.setattr(datasets, "CHUNK_SCENES", 2)
    forward = _structure(tmp_path / "f")
    units = datasets._units
    monkeypatch.setattr(datasets, "_units", lambda *a: units(*a)[::-1])
    backward = _structure(tmp_path / "r")
    xr.testing.assert_identical(forward, backward)


def test_bad_values_raise_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown series 'focus'; allowed: defocus, dose"):
        datasets.generate("focus", SMOKE, tmp_path)
    with pytest.raises(ValueError, match="unknown lattice 'Au'; allowed: ZnS"):
        datasets.generate("structure", replace(SMOKE, lattices=("Au",)), tmp_path)
    with pytest.raises(ValueError, match="dose -5.0"):
        replace(SMOKE, doses=(-5.0,))
    # small and large particles must be two populations: overlapping ranges are refused
    with pytest.raises(ValueError, match=r"small_radius_nm=\(1.0, 2.0\).*apart"):
        replace(SMOKE, small_radius_nm=(1.0, 2.0), large_radius_nm=(1.8, 2.3))
    for name in ("paper", "laptop", "gpu", "smoke"):
        data = get_profile(name).data
        assert data.small_radius_nm[1] < data.large_radius_nm[0], name
    with pytest.raises(ValueError, match="too coarse"):
        replace(SMOKE.sim, sampling_A=0.5, pixel_A=1.0)
    coarse = replace(SMOKE, sim=replace(SMOKE.sim, pixel_A=4.0))
    with pytest.raises(ValueError, match="allowed: at least 16"):
        datasets.generate("dose", coarse, tmp_path)
    odd = replace(SMOKE, sim=SimulationConfig(field_nm=3.2, sampling_A=0.15, pixel_A=1.0))
    with pytest.raises(ValueError, match="does not divide"):
        datasets.generate("dose", odd, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing was started


def test_cli_reports_bad_values_and_keeps_data(cdse, capsys):
    from hrtem_book import cli

    root, _, _ = cdse
    before = sorted(p.name for p in root.iterdir())
    args = ["simulate", "--profile", "smoke", "--out", str(root)]
    assert cli.main(args + ["--series", "focus"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "hrtem-book simulate: error: unknown series 'focus'; allowed: defocus, dose, structure, "
        "magnification, substrate, heldout"
    ]
    assert cli.main(args + ["--series", "dose", "--profile", "nope"]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err
    # a cached series is returned without simulating again
    assert cli.main(args + ["--series", "dose"]) == 0
    assert capsys.readouterr().out.strip() == str(datasets.series_path("dose", SMOKE, root))
    assert sorted(p.name for p in root.iterdir()) == before


@pytest.mark.slow
def test_cli_runs_as_a_console_command(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "hrtem_book.cli",
            "simulate",
            "--series",
            "structure",
            "--profile",
            "smoke",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    ds = xr.load_dataset(out.stdout.strip())
    assert sorted(set(ds["domain"].values)) == ["CdSe-large", "CdSe-small", "Cu-large", "Cu-small"]


def test_example_images_figure_and_app(cdse):
    from hrtem_book.figures.example_images import example_images_figure
    from hrtem_book.widgets import ImagesApp

    _, defocus, dose = cdse
    fig = example_images_figure(defocus, SMOKE.defoci_nm[0], 1, overlay=True)
    assert len(fig.axes) == 3  # image, mask, colour bar
    assert len(fig.axes[0].collections) == 1  # the mask outline
    assert not example_images_figure(dose, SMOKE.doses[0], 0, overlay=False).axes[0].collections
    with pytest.raises(ValueError, match="index=99"):
        example_images_figure(defocus, SMOKE.defoci_nm[0], 99)
    app = ImagesApp({"defocus": defocus, "dose": dose})
    first = app.png
    app.series.value = "dose"  # switching series offers that series' domains and redraws
    assert list(app.domain.options) == list(SMOKE.doses)
    assert app.png != first and "image/png" in app._repr_mimebundle_()


def test_an_image_changed_on_disk_is_found_when_it_is_read(cdse, tmp_path):
    """Every image carries its checksum: a byte changed in a lazily read (paper-scale) file is
    found by the read that would have trained on it, and the file is moved aside (simulated
    again by the next sweep); a series read whole is checked when it is opened."""
    root, ds, _ = cdse
    domain = ds["domain"].values[0]
    position = int(datasets.sample_positions(ds, domain, "train")[1])
    assert datasets.image_checksums(ds["image"].values[:3], ds["mask"].values[:3]).tolist() == (
        ds["checksum"].values[:3].tolist()
    )
    path = tmp_path / datasets.series_path("defocus", SMOKE, root).name
    raw = bytearray(datasets.series_path("defocus", SMOKE, root).read_bytes())
    at = raw.find(ds["image"].values[position].tobytes())
    raw[at + 100] ^= 0x01  # one bit of one pixel
    path.write_bytes(bytes(raw))
    with xr.open_dataset(path) as lazy:
        datasets.domain_tensors(lazy, domain, "val")  # other images read as before
        with pytest.raises(datasets.DamagedSeries, match=f"image {position} differs") as err:
            datasets.domain_tensors(lazy, domain, "train")
    assert "moved aside" in str(err.value) and not path.exists()
    assert list(tmp_path.glob(f"{path.name}.invalid-*"))
