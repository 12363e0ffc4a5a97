"""Projected atomic potentials on a grid: the Lobato & Van Dyck (2014) parametrization.

Physics. The electron scattering factor of a neutral atom is parametrized as

    f_e(g) = Σ_i a_i (2 + b_i g²) / (1 + b_i g²)²        [Å], g = 1/d [Å⁻¹]

(I. Lobato and D. Van Dyck, Acta Cryst. A70, 636–649 (2014), doi:10.1107/S205327331401643X; the
parameters are package data in ``data/lobato.json`` with that citation). The potential is the 3D
Fourier transform of f_e scaled by h²/(2π m₀ e) (Kirkland, *Advanced Computing in Electron
Microscopy*, 2nd ed., Eq. 5.17), so the potential projected along z over all space (the
"infinite projection") has the 2D Fourier transform

    V_z(q) = h²/(2π m₀ e) · f_e(|q|)                    [V·Å³], q in cycles/Å.

Numerics (the hybrid real/reciprocal scheme of Van den Broek et al., Ultramicroscopy 158, 89
(2015), also used by abTEM with ``projection="infinite"``): every atom of a slice is deposited
as a unit delta spread bilinearly over its four neighbouring grid points, each element's
deposit is Fourier transformed, multiplied by its V_z(q) and the sum transformed back. The
bilinear deposit blurs the deltas; like abTEM we divide by the isotropic compensation
sin(q·Δ)/(q·Δ) (q in cycles/Å, Δ the sampling), which keeps our potentials equal to abTEM's to
float32 precision (it changes V_z(q) by < 2 % inside the 2/3 band limit).

Slices follow abTEM: a cell of height H is cut into n = ceil(H/Δz) slices of equal thickness
H/n, and an atom belongs to the slice containing its z (atoms outside [0, H) go to the first or
last slice). The slice count comes from the full cell height, never from the occupied part.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

import numpy as np
import scipy.constants as const
import torch
from ase.data import chemical_symbols

# h²/(2π m₀ e) in V·Å² (= 2π a₀ e = 47.878 V·Å² in Kirkland's units); CODATA via scipy.
PROJECTION_PREFACTOR_V_A2 = const.h**2 / (2 * math.pi * const.m_e * const.e) * 1e20


@lru_cache(maxsize=1)
def lobato_parameters() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Lobato & Van Dyck (2014) parameters per element symbol: (a [Å], b [Å²]), 5 terms each."""
    text = resources.files("hrtem_book").joinpath("data/lobato.json").read_text()
    table = json.loads(text)["parameters"]
    return {s: (np.asarray(p["a"], float), np.asarray(p["b"], float)) for s, p in table.items()}


def _symbol(element: str | int) -> str:
    symbol = chemical_symbols[element] if isinstance(element, int | np.integer) else element
    params = lobato_parameters()
    if symbol not in params:
        raise ValueError(
            f"element {element!r} has no Lobato parameters; allowed: {', '.join(params)}"
        )
    return symbol


def scattering_factor(element: str | int, g2_per_A2: np.ndarray | float) -> np.ndarray:
    """Electron scattering factor f_e [Å] of a neutral atom at squared frequency g² [Å⁻²]."""
    a, b = lobato_parameters()[_symbol(element)]
    bg2 = b[:, None] * np.asarray(g2_per_A2, float).reshape(1, -1)
    f = (a[:, None] * (2 + bg2) / (1 + bg2) ** 2).sum(0)
    return f.reshape(np.shape(g2_per_A2))


def spatial_frequencies(gpts: int, sampling_A: float) -> np.ndarray:
    """FFT-ordered spatial frequencies [cycles/Å] of a periodic grid."""
    return np.fft.fftfreq(gpts, d=sampling_A)


def projected_form_factors(
    elements: Sequence[str | int], gpts: int, sampling_A: float, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Kernels that turn a bilinear atom deposit into projected potential on an FFT grid.

    Returns a float32 tensor ``[len(elements), gpts, gpts]``: V_z(q) / (pixel area · deposit
    compensation) [V·Å], to multiply with ``torch.fft.fft2`` of the deposit. The kernels are
    real and even, so they map real deposits to real potentials.
    """
    q = spatial_frequencies(gpts, sampling_A)
    q2 = q[:, None] ** 2 + q[None, :] ** 2
    arg = np.sqrt(q2) * sampling_A
    compensation = np.where(arg > 0, np.sin(arg) / np.where(arg > 0, arg, 1.0), 1.0)
    kernels = [
        PROJECTION_PREFACTOR_V_A2 * scattering_factor(e, q2) / (compensation * sampling_A**2)
        for e in elements
    ]
    kernels = np.stack(kernels) if kernels else np.zeros((0,) + q2.shape)
    return torch.as_tensor(kernels, dtype=torch.float32, device=device)


def slicing(height_A: float, slice_thickness_A: float) -> tuple[int, float]:
    """Number of slices and their common thickness [Å] for a cell of height ``height_A`` [Å]."""
    if not height_A > 0:
        raise ValueError(f"cell height {height_A!r} Å is not allowed: it must be > 0")
    n = max(1, math.ceil(height_A / slice_thickness_A - 1e-9))
    return n, height_A / n


class Potential:
    """Projected potential slices of a batch of atom configurations on a common square grid.

    All configurations share the cell (square in x, y; height H along z, the beam direction)
    and the grid; they differ in positions (e.g. frozen phonons). Slices are built lazily,
    a block at a time, so a 1280² grid with 70 slices never sits in memory at once.

    Parameters
    ----------
    positions : sequence of [n_atoms, 3] arrays of atom positions [Å], one per configuration.
    numbers : [n_atoms] atomic numbers (shared by all configurations).
    extent_A : side of the square field [Å]; height_A : cell height along the beam [Å].
    sampling_A : grid sampling [Å]; slice_thickness_A : nominal slice thickness [Å].
    """

    def __init__(
        self,
        positions: Sequence[np.ndarray],
        numbers: np.ndarray,
        *,
        extent_A: float,
        height_A: float,
        sampling_A: float,
        slice_thickness_A: float,
        device: str | torch.device = "cpu",
    ) -> None:
        self.extent_A = float(extent_A)
        self.gpts = int(round(extent_A / sampling_A))
        self.sampling_A = self.extent_A / self.gpts
        self.n_slices, self.slice_thickness_A = slicing(height_A, slice_thickness_A)
        self.device = torch.device(device)
        numbers = np.asarray(numbers)
        self.elements = [int(z) for z in np.unique(numbers)]
        # 1/N² of the inverse FFT folded into the kernels (slices() runs it unnormalised)
        kernels = projected_form_factors(self.elements, self.gpts, self.sampling_A, device)
        self._kernels = kernels / self.gpts**2
        self.n_configs = len(positions)
        # Per atom: configuration, slice, element and the four bilinear weights/indices.
        # Kept on the device as flat arrays; a block of slices selects its atoms with a mask.
        elem_index = np.searchsorted(self.elements, numbers)
        conf, sl, el, y, x = [], [], [], [], []
        for c, pos in enumerate(positions):
            pos = np.asarray(pos, float)
            conf.append(np.full(len(pos), c))
            s = np.floor(pos[:, 2] / self.slice_thickness_A).astype(np.int64)
            sl.append(np.clip(s, 0, self.n_slices - 1))
            el.append(elem_index)
            y.append(pos[:, 1] / self.sampling_A)
            x.append(pos[:, 0] / self.sampling_A)

        def cat(v, dtype):
            return torch.as_tensor(np.concatenate(v) if v else np.zeros(0), dtype=dtype)

        self._conf = cat(conf, torch.int64).to(self.device)
        self._slice = cat(sl, torch.int64).to(self.device)
        self._elem = cat(el, torch.int64).to(self.device)
        # float64 pixel coordinates: float32 would lose ~1e-4 px at 1000 px
        self._y = cat(y, torch.float64).to(self.device)
        self._x = cat(x, torch.float64).to(self.device)

    @classmethod
    def from_atoms(
        cls, configurations, *, sampling_A: float, slice_thickness_A: float, device="cpu"
    ):
        """A potential of one or more ``ase.Atoms`` with the same cell and species order."""
        configurations = list(configurations)
        cell = configurations[0].cell.lengths()
        if not math.isclose(cell[0], cell[1], rel_tol=1e-9):
            raise ValueError(
                f"cell {tuple(cell[:2])} Å is not square; allowed: equal x and y sides"
            )
        return cls(
            [a.positions for a in configurations],
            configurations[0].numbers,
            extent_A=cell[0],
            height_A=cell[2],
            sampling_A=sampling_A,
            slice_thickness_A=slice_thickness_A,
            device=device,
        )

    @property
    def occupied(self) -> np.ndarray:
        """Bool ``[n_slices]``: slices holding at least one atom (in any configuration)."""
        occ = np.zeros(self.n_slices, bool)
        occ[np.unique(self._slice.cpu().numpy())] = True
        return occ

    def slices(self, start: int, stop: int) -> torch.Tensor:
        """Projected potential of slices ``start:stop`` [V·Å], float32 ``[configs, k, N, N]``.

        Two slices share one complex FFT (the deposit of slice 2j as the real part, of 2j+1 as
        the imaginary part): the kernels are real and even, so the two potentials come back as
        the real and imaginary parts. On CPU this costs 0.33 ms per 320² slice against 0.8 ms
        for a real FFT pair (torch's rfft2/irfft2). Each element is transformed only over the
        slice pairs that hold it (a carbon slab and the particles above it share few slices).
        """
        n, k = self.gpts, stop - start
        pairs = (k + 1) // 2
        shape = (self.n_configs, pairs, n, n)
        spectrum = torch.zeros(shape, dtype=torch.complex64, device=self.device)
        in_block = (self._slice >= start) & (self._slice < stop)
        for e in range(len(self.elements)):
            keep = in_block & (self._elem == e)
            if not bool(keep.any()):
                continue
            sl = self._slice[keep] - start
            lo, hi = int(sl.min()) // 2, int(sl.max()) // 2 + 1
            m = hi - lo
            # float view of a complex [configs, m, n, n] array: index (c, pair, y, x, re/im)
            size = self.n_configs * m * n * n * 2
            deposit = torch.zeros(size, dtype=torch.float32, device=self.device)
            y, x = self._y[keep], self._x[keep]
            y0, x0 = torch.floor(y), torch.floor(x)
            fy, fx = (y - y0).float(), (x - x0).float()
            y0, x0 = y0.long(), x0.long()
            base = (self._conf[keep] * m + sl // 2 - lo) * n
            part = sl % 2
            for dy, dx, w in (
                (0, 0, (1 - fy) * (1 - fx)),
                (1, 0, fy * (1 - fx)),
                (0, 1, (1 - fy) * fx),
                (1, 1, fy * fx),
            ):
                flat = ((base + (y0 + dy) % n) * n + (x0 + dx) % n) * 2 + part
                deposit.index_add_(0, flat, w)
            packed = torch.view_as_complex(deposit.view(self.n_configs, m, n, n, 2))
            spectrum[:, lo:hi] += torch.fft.fft2(packed).mul_(self._kernels[e])
        both = torch.view_as_real(
            torch.fft.ifft2(spectrum, norm="forward")
        )  # [configs, pairs, n, n, re/im]
        return both.permute(0, 1, 4, 2, 3).reshape(self.n_configs, 2 * pairs, n, n)[:, :k]
