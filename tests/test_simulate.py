"""Physics of the torch simulator: constants, Lobato, abTEM reference, optics, dose, labels."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from importlib import resources

import ase
import ase.build
import numpy as np
import pytest
import scipy.constants as const
import torch

from hrtem_book.potentials import (
    PROJECTION_PREFACTOR_V_A2,
    Potential,
    lobato_parameters,
    scattering_factor,
    slicing,
)
from hrtem_book.profiles import get_profile
from hrtem_book.simulate import (
    CTF,
    Images,
    Waves,
    image_intensities,
    interaction_constant,
    label_mask,
    minimum_contrast_defocus,
    multislice,
    particle_wave,
    simulate_scene,
    wavelength_A,
)
from hrtem_book.structures import LATTICES, build_scene

SMOKE_SIM = get_profile("smoke").data.sim
LAPTOP_SIM = get_profile("laptop").data.sim


def test_parameters_are_cited_package_data():
    table = json.loads(resources.files("hrtem_book").joinpath("data/lobato.json").read_text())
    assert "Acta Cryst. A70, 636" in table["citation"]
    assert table["doi"] == "10.1107/S205327331401643X"
    params = lobato_parameters()
    assert {"C", "Cd", "Se", "Zn", "S", "Cu", "Ag", "Si", "Fe", "Co", "O"} <= set(params)
    assert all(a.shape == b.shape == (5,) for a, b in params.values())


@pytest.mark.parametrize("symbol, z", [("C", 6), ("Se", 34), ("Ag", 47), ("Cd", 48)])
def test_scattering_factor_obeys_mott_bethe_limit(symbol, z):
    # at large g the electrons see the bare nucleus: f_e → Z / (2π² a₀ g²) (Kirkland Eq. 5.16)
    g = 30.0
    bare = z / (2 * math.pi**2 * const.physical_constants["Bohr radius"][0] * 1e10 * g**2)
    assert scattering_factor(symbol, g**2) == pytest.approx(bare, rel=0.02)
    # and f_e decreases monotonically from its finite forward value
    f = scattering_factor(symbol, np.linspace(0, 4, 50))
    assert np.all(np.diff(f) < 0) and np.isfinite(f[0])


def test_wavelength_and_interaction_constant_at_300kV():
    # Kirkland, Advanced Computing in Electron Microscopy (2nd ed.), Table 2.2 / Eq. 5.6
    assert wavelength_A(300e3) == pytest.approx(0.019687, abs=2e-6)
    assert interaction_constant(300e3) == pytest.approx(6.5262e-4, rel=1e-4)


def test_slice_count_comes_from_full_cell_height():
    assert slicing(23.0, 2.0) == (12, pytest.approx(23.0 / 12))
    assert slicing(4.0, 2.0) == (2, 2.0)


def _test_atoms(seed: int = 0) -> ase.Atoms:
    """A Cu crystallite on a random carbon film in a 25.6 Å × 25.6 Å × 23 Å cell."""
    rng = np.random.default_rng(seed)
    side, height = 25.6, 23.0
    carbon = ase.Atoms("C" * 300, positions=rng.uniform(0, [side, side, 10], (300, 3)))
    cu = ase.build.bulk("Cu", "fcc", a=3.6157, cubic=True).repeat((3, 3, 3))
    cu.positions += [8.0, 8.0, 11.0]
    atoms = carbon + cu
    atoms.cell = [side, side, height]
    atoms.pbc = True
    return atoms


@pytest.fixture(scope="module")
def abtem_reference():
    abtem = pytest.importorskip("abtem")
    abtem.config.set({"diagnostics.progress_bar": False})
    atoms = _test_atoms()
    pot = abtem.Potential(
        atoms, sampling=0.1, slice_thickness=2.0, projection="infinite", parametrization="lobato"
    )
    wave = abtem.PlaneWave(energy=300e3).multislice(pot).compute()
    ctf = abtem.CTF(energy=300e3, defocus=50.0, Cs=-1.5e5, focal_spread=10.0)
    image = wave.apply_ctf(ctf).intensity().compute()
    # abTEM arrays are [x, y]; ours are [y, x] (rows = y)
    return atoms, wave.array.T, image.array.T


def test_exit_wave_matches_abtem(abtem_reference):
    atoms, ref_wave, _ = abtem_reference
    pot = Potential.from_atoms([atoms], sampling_A=0.1, slice_thickness_A=2.0)
    ours = multislice(pot, 300e3).array[0].numpy()
    assert ours.shape == ref_wave.shape
    rel = np.linalg.norm(ours - ref_wave) / np.linalg.norm(ref_wave)
    assert rel < 1e-3


def test_image_after_ctf_matches_abtem(abtem_reference):
    atoms, _, ref_image = abtem_reference
    pot = Potential.from_atoms([atoms], sampling_A=0.1, slice_thickness_A=2.0)
    waves = multislice(pot, 300e3)
    image = waves.apply_ctf(CTF(300e3, 50.0, -1.5e5, 10.0)).intensity().array[0].numpy()
    assert np.corrcoef(image.ravel(), ref_image.ravel())[0, 1] > 0.999


def test_potential_slices_integrate_to_the_forward_scattering_factor():
    """Each slice's projected potential integrates over the field to h²/(2π m₀ e) · Σ f_e(0)
    of its atoms (the q = 0 Fourier component); empty slices are zero, and the result does not
    depend on how a range of slices is split into calls (the potential reuses work buffers
    between calls and packs two slices into one complex FFT, whose rounding leaks ~1e-7 of a
    slice into its partner)."""
    rng = np.random.default_rng(0)
    side, sampling = 12.8, 0.2
    symbols = ["C", "Cd", "Se", "C", "Cu"]
    z = [1.0, 5.0, 5.5, 13.0, 13.9]  # slices 0, 2, 2, 6, 6 of 2 Å; 1, 3, 4, 5, 7 empty
    atoms = ase.Atoms(symbols, positions=np.c_[rng.uniform(0, side, (5, 2)), z])
    atoms.cell, atoms.pbc = [side, side, 16.0], True
    shifted = atoms.copy()
    shifted.positions[:, :2] += 0.37  # a second configuration
    pot = Potential.from_atoms([atoms, shifted], sampling_A=sampling, slice_thickness_A=2.0)
    full = pot.slices(0, pot.n_slices).double()
    assert full.shape == (2, 8, 64, 64)
    integral = full.sum((-2, -1)) * sampling**2  # [V·Å³]
    expected = np.zeros(8)
    for symbol, zi in zip(symbols, z, strict=True):
        expected[int(zi // 2)] += PROJECTION_PREFACTOR_V_A2 * scattering_factor(symbol, 0.0)
    for c in range(2):
        np.testing.assert_allclose(integral[c].numpy(), expected, rtol=1e-5, atol=1e-3)
    assert full[:, [1, 3, 4, 5, 7]].abs().max() < 1e-6 * full.abs().max()
    assert torch.equal(pot.slices(0, pot.n_slices).double(), full)  # reused buffers
    for split in ([0, 3, 8], [0, 1, 2, 5, 6, 8], [2, 7]):
        parts = torch.cat([pot.slices(a, b) for a, b in zip(split[:-1], split[1:], strict=True)], 1)
        ref = full[:, split[0] : split[-1]]
        assert (parts.double() - ref).abs().max() < 1e-5 * ref.abs().max()


def test_vacuum_stays_a_plane_wave():
    empty = ase.Atoms(cell=[12.8, 12.8, 10.0], pbc=True)
    pot = Potential.from_atoms([empty], sampling_A=0.1, slice_thickness_A=2.0)
    psi = multislice(pot, 300e3).array
    assert torch.allclose(psi, torch.ones_like(psi))


def _zeros_along_qx(ctf: CTF, gpts=1024, sampling=0.25) -> np.ndarray:
    """Frequencies [Å⁻¹] where Im(CTF) = −sin χ changes sign along +q_x (linear interpolation)."""
    s = ctf.evaluate(gpts, sampling).imag[0, : gpts // 2].double().numpy()
    q = np.fft.fftfreq(gpts, sampling)[: gpts // 2]
    i = np.flatnonzero(np.sign(s[1:]) * np.sign(s[:-1]) < 0)
    return q[i] - s[i] * (q[i + 1] - q[i]) / (s[i + 1] - s[i])


def test_ctf_zero_crossings_follow_the_analytic_formula():
    lam = wavelength_A(300e3)
    # pure defocus: χ = −π λ Δf q² (abTEM sign) ⇒ zeros at q_m = sqrt(m / (λ Δf))
    defocus = 500.0
    expected = np.sqrt(np.arange(1, 4) / (lam * defocus))
    got = _zeros_along_qx(CTF(300e3, defocus))[:3]
    np.testing.assert_allclose(got, expected, rtol=2e-3)
    # pure spherical aberration: χ = π C_s λ³ q⁴ / 2 ⇒ q_m = (2m / (C_s λ³))^(1/4)
    cs = 1e6
    expected = (2 * np.arange(1, 4) / (cs * lam**3)) ** 0.25
    np.testing.assert_allclose(_zeros_along_qx(CTF(300e3, 0.0, cs))[:3], expected, rtol=2e-3)
    # both: the analytic roots of the quartic agree with the evaluated transfer function
    ctf = CTF(300e3, -100.0, -1.5e5)
    np.testing.assert_allclose(_zeros_along_qx(ctf)[:3], ctf.zero_crossings(3), rtol=2e-3)


def test_focal_spread_is_a_one_over_e_half_width():
    # E(q) = exp(−(π λ Δ q² / 2)²): the envelope is 1/e where π λ Δ q² / 2 = 1
    lam, spread, gpts, sampling = wavelength_A(300e3), 30.0, 512, 0.05
    q_e = math.sqrt(2 / (math.pi * lam * spread))
    env = CTF(300e3, 0.0, 0.0, spread).evaluate(gpts, sampling).abs()[0, : gpts // 2].numpy()
    q = np.fft.fftfreq(gpts, sampling)[: gpts // 2]
    assert np.interp(q_e, q, env) == pytest.approx(math.exp(-1), abs=2e-3)


def test_dose_gives_poisson_counts():
    rng = np.random.default_rng(1)
    dose, pixel, n = 75.0, 0.5, 256
    clean = Images(torch.full((n, n), 1.0), pixel)
    counts = clean.poisson_noise(dose, rng).array.double().numpy()
    mean = dose * pixel**2  # electrons per pixel in vacuum
    stderr = math.sqrt(mean / counts.size)
    assert abs(counts.mean() - mean) < 4 * stderr
    # Poisson: variance = mean; the sample variance's relative error is ~sqrt(2/N)
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=4 * math.sqrt(2 / counts.size))
    with pytest.raises(ValueError, match="dose"):
        clean.poisson_noise(-1.0, rng)


def test_image_mean_is_dose_times_pixel_area():
    scene = build_scene(SMOKE_SIM, "CdSe", (0.7, 1.0), np.random.default_rng(2))
    sw = simulate_scene(scene, SMOKE_SIM, 1.6, np.random.default_rng(3))
    clean = image_intensities(sw.waves, torch.tensor([sw.zero_defocus_A - 100.0]), SMOKE_SIM)
    # elastic scattering conserves the beam; only the band limit and envelope remove a little
    assert float(clean.array.mean()) == pytest.approx(1.0, abs=0.02)
    dose = 300.0
    counts = clean.poisson_noise(dose, np.random.default_rng(4)).array.double()
    expected = dose * SMOKE_SIM.pixel_A**2 * clean.array.double()
    assert abs(float(counts.mean() - expected.mean())) < 4 * math.sqrt(
        float(expected.sum()) / counts.numel() ** 2
    )


def _particle_discs(scene, sim):
    """Signed distance [Å] of every output pixel centre to each particle's projected disc."""
    c = (np.arange(sim.image_px) + 0.5) * sim.pixel_A
    x, y = np.meshgrid(c, c)
    return np.stack(
        [np.hypot(x - p["center_A"][0], y - p["center_A"][1]) - p["radius_A"] for p in scene.info]
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_cdse_labels_match_the_projected_particles(seed):
    """IoU of the mask with each particle's disc, in the pixels nearest that particle."""
    scene = build_scene(LAPTOP_SIM, "CdSe", (1.5, 2.5), np.random.default_rng(seed))
    blur = LATTICES["CdSe"].label_blur_A
    mask = label_mask(particle_wave(scene.particles, LAPTOP_SIM), LAPTOP_SIM, blur).numpy() > 0
    d = _particle_discs(scene, LAPTOP_SIM)
    owner = d.argmin(0)
    for i in range(len(scene.info)):
        region, disc = owner == i, d[i] <= 0
        iou = (mask & disc & region).sum() / ((mask | disc) & region).sum()
        assert iou > 0.85


@pytest.mark.parametrize("lattice", sorted(LATTICES))
def test_labels_cover_each_particle_and_stay_near_it(lattice):
    """Every lattice: the mask holds the particle's disc shrunk by 2 Å (one pixel + the outer
    atoms' shell) and lies within the disc grown by the blur's reach (1.645 σ at the 0.05
    level) plus an atomic potential radius of 1.5 Å."""
    sim = replace(SMOKE_SIM, particles_per_image=(1, 1))
    scene = build_scene(sim, lattice, (1.0, 1.2), np.random.default_rng(5))
    blur = LATTICES[lattice].label_blur_A
    mask = label_mask(particle_wave(scene.particles, sim), sim, blur).numpy() > 0
    d = _particle_discs(scene, sim).min(0)
    assert mask[d <= -2.0].all()
    assert not mask[d > 1.645 * blur + 1.5].any()


def test_scene_simulation_is_deterministic():
    def run():
        rng = np.random.default_rng(7)
        scene = build_scene(SMOKE_SIM, "Cu", (0.6, 0.8), rng)
        return simulate_scene(scene, replace(SMOKE_SIM, n_phonons=2), 1.6, rng)

    a, b = run(), run()
    assert torch.equal(a.waves.array, b.waves.array) and torch.equal(a.mask, b.mask)
    assert a.zero_defocus_A == b.zero_defocus_A
    assert a.waves.array.shape == (2, 2 * SMOKE_SIM.image_px, 2 * SMOKE_SIM.image_px)
    # two phonon configurations differ
    assert not torch.equal(a.waves.array[0], a.waves.array[1])


def test_fourier_resampling_keeps_the_vacuum_amplitude():
    w = Waves(torch.ones(1, 64, 64, dtype=torch.complex64), 0.2, 300e3)
    for gpts in (32, 128):
        r = w.resample(gpts)
        assert r.sampling_A == pytest.approx(0.2 * 64 / gpts)
        assert torch.allclose(r.array, torch.ones_like(r.array), atol=1e-5)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    atoms = _test_atoms()
    waves = [
        multislice(
            Potential.from_atoms([atoms], sampling_A=0.1, slice_thickness_A=2.0, device=d), 300e3
        )
        .array[0]
        .cpu()
        for d in ("cpu", "cuda")
    ]
    assert (waves[0] - waves[1]).norm() / waves[0].norm() < 1e-5


def test_phonon_images_average_intensities_not_waves():
    rng = np.random.default_rng(0)
    gpts, sampling = 64, 0.25
    sim = replace(SMOKE_SIM, field_nm=gpts * sampling / 10, sampling_A=sampling, pixel_A=0.5)
    waves = Waves(
        torch.exp(1j * torch.as_tensor(rng.normal(0, 0.3, (2, gpts, gpts)))).to(torch.complex64),
        sampling,
        300e3,
    )
    both = image_intensities(waves, torch.tensor([-100.0]), sim).array
    each = [
        image_intensities(
            Waves(waves.array[i : i + 1], sampling, 300e3), torch.tensor([-100.0]), sim
        ).array
        for i in range(2)
    ]
    torch.testing.assert_close(both, (each[0] + each[1]) / 2)
    mean_wave = Waves(waves.array.mean(0, keepdim=True), sampling, 300e3)
    coherent = image_intensities(mean_wave, torch.tensor([-100.0]), sim).array
    assert (both - coherent).abs().max() > 0.01


def test_zero_defocus_refocuses_on_the_object():
    """A thin carbon layer 10 nm above the exit plane has its minimum contrast 10 nm (100 Å)
    further underfocus than the same layer at the exit plane: CTF(Δf) undoes a free propagation
    of Δf, the sign convention of abTEM (defocus = −C10)."""
    sim = SMOKE_SIM
    side, height = sim.field_nm * 10, 104.0
    rng = np.random.default_rng(3)
    layer = rng.uniform(0, [side, side, 1.0], (150, 3))
    zeros = []
    for z in (height - 2.0, height - 102.0):  # at the exit plane, 100 Å above it
        atoms = ase.Atoms("C150", positions=layer + [0, 0, z], cell=[side, side, height])
        wave = particle_wave(atoms, sim).resample(2 * sim.image_px)
        zeros.append(minimum_contrast_defocus(wave, sim))
    print("zero defocus [Å] at the exit plane, 100 Å above:", zeros)
    assert zeros[1] - zeros[0] == pytest.approx(100.0, abs=5.0)
