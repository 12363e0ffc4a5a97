"""HRTEM image simulation in PyTorch: multislice exit waves, then optics, noise and labels.

Shaped like abTEM: nouns hold a physical step (:class:`~hrtem_book.potentials.Potential`,
:class:`Waves`, :class:`CTF`, :class:`Images`); verbs return new objects (:func:`multislice`,
:meth:`Waves.apply_ctf`, :meth:`Waves.intensity`, :meth:`Images.poisson_noise`).
Every tensor may live on any torch device; waves are complex64 and carry leading batch axes
(frozen phonons, defoci) in front of the two grid axes, which are ``[y, x]`` (rows = y).

Physics and conventions
-----------------------
* Relativistic wavelength λ and interaction constant σ = 2π m e λ / h² (m the relativistic mass)
  from CODATA constants (Kirkland, *Advanced Computing in Electron Microscopy*, 2nd ed., Eqs.
  2.5 and 5.6); at 300 kV λ = 0.01969 Å and σ = 6.526e-4 rad/(V·Å).
* Multislice (Cowley & Moodie 1957; Kirkland ch. 6): for each slice, transmit through
  t = exp(iσV_z) and propagate its thickness with the Fresnel propagator exp(−iπλΔz q²). Both t
  and the propagator are multiplied by the 2/3 band-limit aperture (cutoff 2/3 of the Nyquist
  frequency with abTEM's 0.01/Δ cosine taper); without it on t the exit wave differs from abTEM
  by 0.4–2.7 %.
* Defocus sign: **defocus = −C10, positive = underfocus**, exactly abTEM's ``defocus``. The
  aberration phase is χ(q) = π λ q² C10 + (π/2) C_s λ³ q⁴ and the transfer function
  exp(−iχ). The paper's −10 nm is therefore 10 nm overfocus from the calibrated zero.
* Zero defocus is calibrated per scene: the defocus of minimum contrast (smallest image variance)
  of the particles-in-vacuum exit wave, found by a coarse then a fine grid search
  (:func:`minimum_contrast_defocus`). Domain defoci are offsets from it.
* Focal spread Δ (``SimulationConfig.focal_spread_A``) is the 1/e half-width of a Gaussian
  defocus distribution (σ = Δ/√2), applied as the quasi-coherent temporal envelope
  E(q) = exp(−(π λ Δ q² / 2)²) on the wave — the same definition as abTEM's ``focal_spread``.
* Frozen phonons: every configuration's atoms are displaced by independent Gaussians of σ =
  ``phonon_sigma_A`` per axis. The CTF is applied to each configuration's exit wave and the
  **intensities** are averaged (incoherent sum); averaging exit waves first would be wrong (it
  damps the diffuse scattering into an absorption-like loss).
* Output images: the exit wave is Fourier resampled to twice the output pixel density, the CTF
  is applied there, the intensity is formed and 2×2-binned to ``pixel_A`` (a detector integrates
  over its pixel, and at half the pixel the intensity of the band-limited wave does not alias).
  Intensities are in units of the incident beam (vacuum = 1); dose scales them to electrons per
  pixel (dose [e⁻/Å²] × pixel area [Å²]) before Poisson sampling.

Labels (:func:`label_mask`): the phase of the particles-in-vacuum exit wave is thresholded at
``label_phase_threshold_rad`` (π/16) on the **raw** phase at the simulation sampling, then the
binary mask is blurred with a Gaussian of the lattice's ``label_blur_A`` and kept where > 0.05,
then area-averaged to the output pixels (majority vote). Thresholding first matters: on atomic
columns the phase wraps to ±π, and the mean phase inside a 4 nm CdSe particle is only ~0.19 rad,
so blurring the phase first loses most of the particle; the blur fills the wrapped columns and
the gaps between columns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import scipy.constants as const
import torch

from .config import DEVICE_NAMES, SimulationConfig, check_device_name
from .potentials import Potential

ANTIALIAS_CUTOFF = 2.0 / 3.0  # fraction of the Nyquist frequency kept (abTEM's 0.6666666)
ANTIALIAS_TAPER = 0.01  # cosine taper width × sampling [dimensionless], as abTEM
LABEL_BLUR_KEEP = 0.05  # blurred-mask level kept as particle
# zero-defocus search: coarse grid [nm] (first, last, step), then ± one coarse step at fine steps
CALIBRATION_COARSE_NM = (-20.0, 20.0, 1.0)
CALIBRATION_FINE_STEP_NM = 0.1
# memory of one block of potential slices: on CPU a block that stays in cache is 1.7× faster
# than one large batch (measured at 320²: 16 MB → 0.18 s, 256 MB → 0.31 s per exit wave); a
# GPU wants large batches
_BLOCK_BYTES = {"cpu": 16 * 2**20, "cuda": 256 * 2**20}
_OPTICS_CHUNK_POINTS = 2**17  # complex points per batch of CTF images (1 MB: stays in cache)


def check_device(device: str) -> str:
    """``device`` if torch can compute on it here, else a one-line ValueError saying what is."""
    check_device_name(device)  # the spelling; torch may still refuse e.g. "cuda:007"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device; allowed: {DEVICE_NAMES}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: no CUDA device here; allowed: cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


def wavelength_A(energy_eV: float) -> float:
    """Relativistic electron wavelength λ [Å] at kinetic energy ``energy_eV`` [eV]."""
    e = energy_eV * const.e
    return const.h * const.c / math.sqrt(e * (2 * const.m_e * const.c**2 + e)) * 1e10


def interaction_constant(energy_eV: float) -> float:
    """σ = 2π m e λ / h² [rad/(V·Å)] with the relativistic mass m = γ m₀ (Kirkland Eq. 5.6)."""
    m = const.m_e + energy_eV * const.e / const.c**2
    lam_m = wavelength_A(energy_eV) * 1e-10
    return 2 * math.pi * m * const.e * lam_m / const.h**2 * 1e-10


def _frequencies2(gpts: int, sampling_A: float, device) -> torch.Tensor:
    """|q|² [Å⁻²] on the FFT grid (float32, ``[gpts, gpts]``)."""
    q = torch.fft.fftfreq(gpts, d=sampling_A, device=device, dtype=torch.float64)
    return (q[:, None] ** 2 + q[None, :] ** 2).float()


def antialias_aperture(gpts: int, sampling_A: float, device="cpu") -> torch.Tensor:
    """2/3 band-limit aperture (1 inside, 0 outside, cosine taper), float32 ``[gpts, gpts]``."""
    q = _frequencies2(gpts, sampling_A, device).sqrt()
    cutoff = ANTIALIAS_CUTOFF / sampling_A / 2
    taper = ANTIALIAS_TAPER / sampling_A
    edge = 0.5 * (1 + torch.cos(math.pi * (q - cutoff + taper) / taper))
    return torch.where(q > cutoff - taper, torch.where(q > cutoff, 0.0, edge), 1.0)


def fresnel_propagator(gpts: int, sampling_A: float, thickness_A: float, energy_eV: float, device):
    """Band-limited Fresnel propagator exp(−iπλΔz q²) over ``thickness_A`` [Å], complex64."""
    phase = (
        -math.pi * wavelength_A(energy_eV) * thickness_A * _frequencies2(gpts, sampling_A, device)
    )
    return torch.polar(antialias_aperture(gpts, sampling_A, device), phase)


@dataclass(frozen=True)
class CTF:
    """Contrast transfer function of the objective lens (no aperture).

    ``defocus_A`` [Å] is −C10 (positive = underfocus, as abTEM); a float or a 1D tensor of
    defoci (one transfer function each). ``cs_A`` [Å] spherical aberration C30; ``focal_spread_A``
    [Å] the 1/e half-width of the defocus spread (temporal envelope, see module docstring);
    ``astigmatism_A`` [Å] the two-fold astigmatism |C12| at azimuth ``astigmatism_angle_rad``,
    adding π λ q² |C12| cos 2(φ − φ12) to χ (abTEM's polar C12, phi12).
    """

    energy_eV: float
    defocus_A: float | torch.Tensor
    cs_A: float = 0.0
    focal_spread_A: float = 0.0
    astigmatism_A: float = 0.0
    astigmatism_angle_rad: float = 0.0

    def evaluate(self, gpts: int, sampling_A: float, device="cpu") -> torch.Tensor:
        """Complex64 ``[gpts, gpts]`` (float defocus) or ``[n_defoci, gpts, gpts]``."""
        return self._transfer(self._terms(gpts, sampling_A, device), self.defocus_A)

    def _terms(self, gpts: int, sampling_A: float, device) -> tuple[torch.Tensor, ...]:
        """The defocus-independent parts of :meth:`evaluate`: (π λ q², the C_s phase, E(q))."""
        key = (self.energy_eV, self.cs_A, self.focal_spread_A, gpts, sampling_A, device,
               self.astigmatism_A, self.astigmatism_angle_rad)  # fmt: skip
        return _ctf_terms(*key)

    @staticmethod
    def _transfer(terms: tuple[torch.Tensor, ...], defocus_A) -> torch.Tensor:
        """exp(−iχ) E(q) for ``defocus_A`` (a float or a 1D tensor) from :meth:`_terms`."""
        defocus_term, cs_term, envelope = terms
        defocus = torch.as_tensor(defocus_A, dtype=torch.float32, device=envelope.device)
        c10 = -defocus.reshape(defocus.shape + (1, 1))
        chi = defocus_term * c10 + cs_term
        return torch.polar(envelope.expand_as(chi).contiguous(), -chi)

    def zero_crossings(self, n: int = 3) -> np.ndarray:
        """Spatial frequencies [Å⁻¹] of the first ``n`` zeros of sin χ (scalar defocus, Cs ≠ 0 or
        defocus ≠ 0), from the analytic quartic in q²: χ(q) = mπ."""
        lam = wavelength_A(self.energy_eV)
        a, b = 0.5 * math.pi * self.cs_A * lam**3, -math.pi * lam * float(self.defocus_A)
        roots = []
        for m in range(-4 * n, 4 * n + 1):
            for u in np.roots([a, b, -m * math.pi]) if a else [m * math.pi / b]:
                if abs(np.imag(u)) < 1e-12 and np.real(u) > 0:
                    roots.append(math.sqrt(np.real(u)))
        return np.sort(np.array(roots))[:n]


@lru_cache(maxsize=8)
def _ctf_terms(
    energy_eV, cs_A, focal_spread_A, gpts, sampling_A, device, astig_A=0.0, astig_rad=0.0
):
    """:meth:`CTF._terms`, cached per lens and grid (read-only): every image of a series shares
    them, and at 320² they cost as much as the two FFTs of applying the CTF."""
    lam = wavelength_A(energy_eV)
    q2 = _frequencies2(gpts, sampling_A, device)
    defocus_term = math.pi * lam * q2
    cs_term = 0.5 * math.pi * cs_A * lam**3 * q2**2
    if astig_A:
        # q² cos 2(φ − φ12) = (qx² − qy²) cos 2φ12 + 2 qx qy sin 2φ12 (rows = y)
        q = torch.fft.fftfreq(gpts, d=sampling_A, device=device, dtype=torch.float64)
        qy, qx = q[:, None], q[None, :]
        c2, s2 = math.cos(2 * astig_rad), math.sin(2 * astig_rad)
        cs_term = (
            cs_term + (math.pi * lam * astig_A * ((qx**2 - qy**2) * c2 + 2 * qx * qy * s2)).float()
        )
    envelope = torch.exp(-((0.5 * math.pi * lam * focal_spread_A * q2) ** 2))
    return defocus_term, cs_term, envelope


@dataclass(frozen=True)
class Images:
    """Real images ``[..., n, n]`` (float32) with pixel size ``sampling_A`` [Å]."""

    array: torch.Tensor
    sampling_A: float

    def bin(self, factor: int) -> Images:
        """Mean over ``factor × factor`` blocks, as a detector pixel integrates (beam units)."""
        if factor == 1:
            return self
        a = self.array
        n = a.shape[-1] // factor
        a = a[..., : n * factor, : n * factor].reshape(*a.shape[:-2], n, factor, n, factor)
        return Images(a.mean((-3, -1)), self.sampling_A * factor)

    def poisson_noise(self, dose_per_A2: float, rng: np.random.Generator) -> Images:
        """Counts per pixel: Poisson(intensity × dose × pixel area); intensity in beam units."""
        if not dose_per_A2 > 0:
            raise ValueError(f"dose {dose_per_A2!r} e⁻/Å² is not allowed: it must be > 0")
        mean = self.array.detach().cpu().double().clamp_min(0).numpy()
        counts = rng.poisson(mean * dose_per_A2 * self.sampling_A**2).astype(np.float32)
        return Images(torch.from_numpy(counts).to(self.array.device), self.sampling_A)


@dataclass(frozen=True)
class Waves:
    """Complex wave functions ``[..., N, N]`` (complex64) on a square grid of ``sampling_A``."""

    array: torch.Tensor
    sampling_A: float
    energy_eV: float

    @property
    def gpts(self) -> int:
        return self.array.shape[-1]

    def resample(self, gpts: int) -> Waves:
        """Fourier crop (or zero-pad) to ``gpts`` points over the same field; amplitude kept."""
        n = self.gpts
        if gpts == n:
            return self
        spec = torch.fft.fftshift(torch.fft.fft2(self.array), dim=(-2, -1))
        lo = (max(n, gpts) - min(n, gpts)) // 2
        if gpts < n:
            spec = spec[..., lo : lo + gpts, lo : lo + gpts]
        else:
            pad = (lo, gpts - n - lo, lo, gpts - n - lo)
            spec = torch.nn.functional.pad(spec, pad)
        out = torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1))) * (gpts**2 / n**2)
        return Waves(out, self.sampling_A * n / gpts, self.energy_eV)

    def apply_ctf(self, ctf: CTF) -> Waves:
        """Waves imaged through ``ctf``; a CTF with D defoci adds a leading axis of size D
        *after* the existing batch axes' broadcast: ``[D, ..., N, N]``."""
        h = ctf.evaluate(self.gpts, self.sampling_A, self.array.device)
        spec = torch.fft.fft2(self.array)
        if h.dim() == 3:
            h = h.reshape(h.shape[:1] + (1,) * (self.array.dim() - 2) + h.shape[1:])
        return Waves(torch.fft.ifft2(spec * h), self.sampling_A, self.energy_eV)

    def intensity(self) -> Images:
        return Images(self.array.abs().square(), self.sampling_A)

    def phase(self) -> torch.Tensor:
        return self.array.angle()


def multislice(potential: Potential, energy_eV: float) -> Waves:
    """Exit waves of a unit plane wave through ``potential``: complex64 ``[configs, N, N]``."""
    n, dev = potential.gpts, potential.device
    sigma = interaction_constant(energy_eV)
    dz = potential.slice_thickness_A
    aperture = _scaled_aperture(n, potential.sampling_A, dev)
    # (not cached: the slice thickness, cell height / slice count, differs from scene to scene)
    prop = fresnel_propagator(n, potential.sampling_A, dz, energy_eV, dev) / n**2
    c = potential.n_configs
    psi = torch.ones((c, n, n), dtype=torch.complex64, device=dev)
    per_slice = c * n * n * 4 * 8
    # an even number of slices per block: the potential comes two slices to a complex number
    # (Potential.packed_slices), and an odd block wastes half an FFT per block (20 % more
    # potential FFTs at 5 slices per block)
    block = 2 * max(1, _BLOCK_BYTES.get(dev.type, _BLOCK_BYTES["cuda"]) // per_slice // 2)
    occupied = potential.occupied
    start, fresh = 0, True  # fresh: psi is still the incident plane wave
    t_buf = cos_buf = sin_buf = None  # buffers of one block, reused (see below)
    while start < potential.n_slices:
        stop = start + 1
        while stop < potential.n_slices and occupied[stop] == occupied[start]:
            stop += 1
        if not occupied[start]:
            # empty slices: t = 1, so the run is one free propagation over its total
            # thickness (exact for the Fresnel propagator); a plane wave is left unchanged
            if not fresh:
                thick = (stop - start) * potential.slice_thickness_A
                far = fresnel_propagator(n, potential.sampling_A, thick, energy_eV, dev)
                psi = torch.fft.ifft2(torch.fft.fft2(psi) * far / n**2, norm="forward")
            start = stop
            continue
        if t_buf is None:
            # preallocated buffers: fresh multi-MB tensors cost page faults on CPU (a cos
            # into a new tensor took 2.8× as long as into a reused one); room for whole
            # slice pairs, as the potential comes two slices to a complex number
            pairs = (block + 1) // 2
            t_buf = torch.empty((c, 2 * pairs, n, n), dtype=torch.complex64, device=dev)
            cos_buf = torch.empty((c, pairs, n, n, 2), device=dev)
            sin_buf = torch.empty_like(cos_buf)
        for b0 in range(start, stop, block):
            k = min(block, stop - b0)
            pairs = (k + 1) // 2
            # σV of slices b0 + 2j (real) and b0 + 2j + 1 (imaginary part): [c, pairs, n, n, 2]
            phase = torch.view_as_real(potential.packed_slices(b0, b0 + k)).mul_(sigma)
            cos = torch.cos(phase, out=cos_buf[:, :pairs])
            sin = torch.sin(phase, out=sin_buf[:, :pairs])
            # exp(iσV) unpacked to one slice per index: cos/sin build it 3× faster than
            # torch.polar on CPU, and the strided read replaces a separate reordering copy
            pair_view = t_buf[:, : 2 * pairs].unflatten(1, (pairs, 2))
            torch.complex(cos.permute(0, 1, 4, 2, 3), sin.permute(0, 1, 4, 2, 3), out=pair_view)
            for j in range(k):
                # band-limited transmission function, one slice at a time: it stays in cache
                # for the step below (a block-wide FFT of the transmission functions made
                # the multislice ~9 % slower on CPU)
                spec = torch.fft.fft2(t_buf[:, j])
                torch.view_as_real(spec).mul_(aperture)  # [N, N, 2]: see _scaled_aperture
                t = torch.fft.ifft2(spec, norm="forward")
                # in place, and without out=: torch's CPU FFT writes out= through a copy
                # (6 % slower per step); the freed result's memory is reused by the next FFT
                psi = torch.fft.fft2(psi.mul_(t))
                psi = torch.fft.ifft2(psi.mul_(prop), norm="forward")
        fresh, start = False, stop
    return Waves(psi, potential.sampling_A, energy_eV)


@lru_cache(maxsize=8)
def _scaled_aperture(gpts: int, sampling_A: float, device) -> torch.Tensor:
    """The band-limit aperture of :func:`multislice` / N², cached per grid (read-only).

    The 1/N² of every inverse FFT is folded into the aperture and the propagator, and the
    inverse FFTs run unnormalised (``norm="forward"``): one pass over the grid less per FFT.
    The real aperture is stored twice along a last axis, ``[N, N, 2]``, to scale a complex
    spectrum's real and imaginary parts in one contiguous pass: the same products as
    complex × real, without promoting the aperture to a complex copy on every call.
    """
    aperture = antialias_aperture(gpts, sampling_A, device) / gpts**2
    return aperture[..., None].expand(gpts, gpts, 2).contiguous()


# --- scene-level steps used by the dataset series ---------------------------------------------


def _optics_gpts(sim: SimulationConfig) -> int:
    """Grid of the optics step: twice the output pixel density (see module docstring)."""
    return 2 * sim.image_px


def exit_waves(atoms, sim: SimulationConfig, rng: np.random.Generator, device="cpu") -> Waves:
    """Frozen-phonon exit waves of ``atoms`` (``sim.n_phonons`` configurations), resampled to the
    optics grid: complex64 ``[n_phonons, 2·image_px, 2·image_px]``."""
    pos = atoms.positions
    configs = [pos + rng.normal(0.0, sim.phonon_sigma_A, pos.shape) for _ in range(sim.n_phonons)]
    return _static_waves(atoms, configs, sim, device).resample(_optics_gpts(sim))


def _static_waves(atoms, configs, sim: SimulationConfig, device) -> Waves:
    cell = atoms.cell.lengths()
    pot = Potential(
        configs,
        atoms.numbers,
        extent_A=cell[0],
        height_A=cell[2],
        sampling_A=sim.sampling_A,
        slice_thickness_A=sim.slice_thickness_A,
        device=device,
    )
    if pot.gpts != sim.gpts:
        raise ValueError(f"cell side {cell[0]} Å does not match field_nm={sim.field_nm}")
    return multislice(pot, sim.energy_eV)


def particle_wave(particles, sim: SimulationConfig, device="cpu") -> Waves:
    """Static exit wave of the particles in vacuum at the simulation sampling, ``[1, N, N]``."""
    return _static_waves(particles, [particles.positions], sim, device)


def image_intensities(
    waves: Waves, defocus_A: torch.Tensor, sim: SimulationConfig, measured=None
) -> Images:
    """Noise-free images ``[n_defoci, image_px, image_px]`` in beam units: the CTF applied to each
    phonon's wave (optics grid) and the intensities averaged over phonons, then 2×2-binned.
    With ``measured`` (:class:`~hrtem_book.config.MeasuredImaging`) the lens is its C_s and
    astigmatism instead of ``sim.cs_A``."""
    defocus_A = torch.as_tensor(defocus_A, dtype=torch.float32).reshape(-1)
    # the waves' spectrum and the defocus-independent CTF terms once for all defoci (the
    # zero-defocus calibration images 62 of them), then the operations of Waves.apply_ctf
    lens = (sim.cs_A, 0.0, 0.0)
    if measured is not None:
        lens = (measured.cs_A, measured.astigmatism_A, math.radians(measured.astigmatism_angle_deg))
    terms = CTF(sim.energy_eV, 0.0, lens[0], sim.focal_spread_A, lens[1], lens[2])._terms(
        waves.gpts, waves.sampling_A, waves.array.device
    )
    spec = torch.fft.fft2(waves.array)  # [phonons, M, M]
    # defoci in chunks of ~2¹⁷ complex points (8 at a time on the laptop's 128² optics grid;
    # larger batches leave the cache and were slower), one at a time at paper scale
    chunk = max(1, _OPTICS_CHUNK_POINTS // spec.numel())
    out = []
    for d in torch.split(defocus_A, chunk):
        h = CTF._transfer(terms, d)[:, None]  # [chunk, 1, M, M]
        out.append(torch.fft.ifft2(spec * h).abs().square().mean(1))
    factor = round(sim.pixel_A / waves.sampling_A)
    return Images(torch.cat(out), waves.sampling_A).bin(factor)


def minimum_contrast_defocus(wave: Waves, sim: SimulationConfig) -> float:
    """Defocus [Å] (abTEM convention) of minimum variance of the output image of ``wave``
    (``[1, M, M]`` on the optics grid): a coarse grid search, then a fine one around its best.

    The variance is taken on the binned output pixels, the contrast a user of the images sees.
    """

    def best(defoci_nm: np.ndarray) -> float:
        img = image_intensities(wave, torch.as_tensor(defoci_nm * 10.0), sim).array
        return float(defoci_nm[int(torch.argmin(img.var(dim=(-2, -1))))])

    lo, hi, step = CALIBRATION_COARSE_NM
    coarse = best(np.arange(lo, hi + step / 2, step))
    fine = coarse + np.arange(-step, step + CALIBRATION_FINE_STEP_NM / 2, CALIBRATION_FINE_STEP_NM)
    return best(fine) * 10.0


def label_mask(wave: Waves, sim: SimulationConfig, blur_A: float) -> torch.Tensor:
    """Particle mask uint8 ``[image_px, image_px]`` from a particles-in-vacuum exit wave
    ``[1, N, N]`` at the simulation sampling (recipe in the module docstring)."""
    raw = (wave.phase()[0] > sim.label_phase_threshold_rad).float()
    q2 = _frequencies2(wave.gpts, wave.sampling_A, raw.device)
    gauss = torch.exp(-2 * math.pi**2 * blur_A**2 * q2)
    blurred = torch.fft.ifft2(torch.fft.fft2(raw) * gauss).real > LABEL_BLUR_KEEP
    pooled = torch.nn.functional.adaptive_avg_pool2d(blurred[None, None].float(), sim.image_px)
    return (pooled[0, 0] > 0.5).to(torch.uint8)


@dataclass
class SceneWaves:
    """Everything the optics needs from one scene: phonon waves, label, calibrated zero."""

    waves: Waves  # [n_phonons, M, M] on the optics grid
    mask: torch.Tensor  # uint8 [image_px, image_px]
    zero_defocus_A: float  # minimum-contrast defocus of the particles in vacuum [Å]


def simulate_scene(scene, sim: SimulationConfig, blur_A: float, rng, device="cpu") -> SceneWaves:
    """Exit waves, label and zero-defocus calibration of a ``structures.Scene``."""
    waves = exit_waves(scene.atoms, sim, rng, device)
    vac = particle_wave(scene.particles, sim, device)
    mask = label_mask(vac, sim, blur_A)
    zero = minimum_contrast_defocus(vac.resample(_optics_gpts(sim)), sim)
    return SceneWaves(waves, mask, zero)


def view(images: Images, pixel_A: float, out_px: int) -> Images:
    """The central ``out_px``² pixels of size ``pixel_A`` [Å] of ``images``: a window of
    ``out_px · pixel_A`` Å cut from the middle of the field and binned to ``pixel_A`` (a whole
    multiple of ``images.sampling_A``), as a camera at a lower magnification sees it. The
    identity when the pixel and the size are the images' own."""
    ratio = pixel_A / images.sampling_A
    factor = round(ratio)
    n_in = images.array.shape[-1]
    if factor < 1 or abs(ratio - factor) > 1e-6 or out_px * factor > n_in:
        raise ValueError(
            f"pixel_A={pixel_A} Å × {out_px} px is not a view of {n_in} px of "
            f"{images.sampling_A} Å; allowed: whole multiples of the pixel that fit the field"
        )
    lo = (n_in - out_px * factor) // 2
    window = images.array[..., lo : lo + out_px * factor, lo : lo + out_px * factor]
    return Images(window, images.sampling_A).bin(factor)


def view_mask(mask: torch.Tensor, sampling_A: float, pixel_A: float, out_px: int) -> torch.Tensor:
    """The label of :func:`view`: a pixel is particle if most of its area is (uint8)."""
    frac = view(Images(mask.float(), sampling_A), pixel_A, out_px).array
    return (frac > 0.5).to(torch.uint8)


def measured_counts(
    intensity: Images, dose_per_A2: float, measured, rng: np.random.Generator
) -> Images:
    """A recording of ``intensity`` (``[n, n]``, beam units) by the imperfect instrument of
    ``measured`` (:class:`~hrtem_book.config.MeasuredImaging`, steps and sources there): a
    smooth background with a random gradient, the drift blur, shot noise at ``dose_per_A2``
    [e⁻/Å²], a gamma-distributed gain per electron, the detector MTF and read noise. In
    electrons per pixel (the mean signal of one electron is 1)."""
    m = measured
    a = intensity.array.detach().cpu().double().numpy()
    n, pixel = a.shape[-1], intensity.sampling_A
    r = (np.arange(n) + 0.5 - n / 2) / (n / 2)  # -1..1 across the field
    theta, slope = rng.uniform(0, 2 * math.pi), rng.uniform(-1, 1) * m.background_gradient
    ramp = (math.cos(theta) * r[None, :] + math.sin(theta) * r[:, None]) / (
        abs(math.cos(theta)) + abs(math.sin(theta))
    )  # within ±1
    a = a + m.background_fraction * (1 + slope * ramp)
    drift = drift_transfer(n, pixel, m.drift_A, m.drift_angle_deg)
    a = np.clip(np.fft.ifft2(np.fft.fft2(a) * drift).real, 0, None)
    counts = rng.poisson(a * dose_per_A2 * pixel**2)
    # the sum of c gamma(k, 1/k) gains is gamma(c k, 1/k) (0 for no electron)
    signal = rng.gamma(counts * m.gain_shape, 1 / m.gain_shape)
    signal = np.fft.ifft2(np.fft.fft2(signal) * detector_mtf(n, pixel, m.mtf_at_nyquist)).real
    signal = signal + rng.normal(0.0, m.read_noise_e, signal.shape)
    out = torch.from_numpy(signal.astype(np.float32)).to(intensity.array.device)
    return Images(out, pixel)


def _q(n: int, pixel_A: float) -> tuple[np.ndarray, np.ndarray]:
    q = np.fft.fftfreq(n, d=pixel_A)
    return q[:, None], q[None, :]  # qy (rows), qx [Å⁻¹]


def drift_transfer(n: int, pixel_A: float, drift_A: float, angle_deg: float) -> np.ndarray:
    """Transfer function ``[n, n]`` of a uniform linear drift of ``drift_A`` [Å] along
    ``angle_deg`` during the exposure: the image averaged over the line, sinc(L q·u)."""
    qy, qx = _q(n, pixel_A)
    phi = math.radians(angle_deg)
    return np.sinc(drift_A * (qx * math.cos(phi) + qy * math.sin(phi)))


def detector_mtf(n: int, pixel_A: float, at_nyquist: float) -> np.ndarray:
    """A Gaussian detector MTF ``[n, n]`` equal to ``at_nyquist`` at the pixel's Nyquist
    frequency 1/(2 pixel) along each axis."""
    qy, qx = _q(n, pixel_A)
    nyquist = 1 / (2 * pixel_A)
    return np.exp(math.log(at_nyquist) * (qx**2 + qy**2) / nyquist**2)


def noisy_images(
    scene_waves: SceneWaves,
    defocus_nm: np.ndarray,
    dose_per_A2: np.ndarray,
    sim: SimulationConfig,
    rngs: Sequence[np.random.Generator],
    pixels_A: Sequence[float] | None = None,
    out_px: int | None = None,
    measured: Sequence | None = None,
) -> np.ndarray:
    """Counts ``[k, out_px, out_px]`` float32 for k (defocus offset [nm], dose) pairs, the
    noise of image i drawn from ``rngs[i]``; the noise-free images come from one
    :func:`image_intensities` call (one FFT of the waves for all k). Image i is the
    :func:`view` at ``pixels_A[i]`` (default: ``sim.pixel_A``, ``sim.image_px``), its dose
    counted over that pixel's area. Where ``measured[i]`` is a
    :class:`~hrtem_book.config.MeasuredImaging`, image i is taken through its lens and
    recorded by :func:`measured_counts` instead of an ideal counting detector."""
    defocus_A = scene_waves.zero_defocus_A + 10.0 * np.asarray(defocus_nm, float)
    doses = np.asarray(dose_per_A2, float)
    pixels = [sim.pixel_A] * len(doses) if pixels_A is None else list(pixels_A)
    kinds = [None] * len(doses) if measured is None else list(measured)
    out_px = sim.image_px if out_px is None else out_px
    clean = {}  # the noise-free images, one image_intensities call per lens
    for m in dict.fromkeys(kinds):
        idx = [i for i, k in enumerate(kinds) if k == m]
        imgs = image_intensities(scene_waves.waves, torch.as_tensor(defocus_A[idx]), sim, m)
        clean.update({i: replace(imgs, array=imgs.array[j]) for j, i in enumerate(idx)})
    out = []
    for i, (d, p, m, rng) in enumerate(zip(doses, pixels, kinds, rngs, strict=True)):
        seen = view(clean[i], p, out_px)
        if m is None:
            out.append(seen.poisson_noise(float(d), rng).array)
        else:
            out.append(measured_counts(seen, float(d), m, rng).array)
    return torch.stack(out).cpu().numpy()
