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
    kernels = [_form_factor(_symbol(e), int(gpts), float(sampling_A)) for e in elements]
    kernels = np.stack(kernels) if kernels else np.zeros((0, gpts, gpts))
    return torch.as_tensor(kernels, dtype=torch.float32, device=device)


@lru_cache(maxsize=64)
def _form_factor(symbol: str, gpts: int, sampling_A: float) -> np.ndarray:
    """One element's kernel of :func:`projected_form_factors` (float64, read-only). Cached: every
    scene of a dataset shares the grid, and the kernel costs ~2 ms per element at 320²."""
    q = spatial_frequencies(gpts, sampling_A)
    q2 = q[:, None] ** 2 + q[None, :] ** 2
    arg = np.sqrt(q2) * sampling_A
    compensation = np.where(arg > 0, np.sin(arg) / np.where(arg > 0, arg, 1.0), 1.0)
    kernel = PROJECTION_PREFACTOR_V_A2 * scattering_factor(symbol, q2)
    kernel /= compensation * sampling_A**2
    kernel.flags.writeable = False
    return kernel


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
        self._kernels = _scaled_kernels(
            tuple(self.elements), self.gpts, self.sampling_A, self.device
        )
        self.n_configs = len(positions)
        n = self.gpts
        # Per atom: configuration, slice, element, bilinear weights and grid indices, computed
        # once here (not per slice block), with the atoms stably sorted by (element, slice):
        # a block's atoms of one element are then a contiguous range, found from a table of
        # offsets instead of boolean masks. The stable sort keeps the atoms of one slice in
        # their input order, so the deposits accumulate in the same order (same float bits).
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

        def cat(v, dtype=None):
            return np.concatenate(v).astype(dtype) if v else np.zeros(0, dtype)

        key = cat(el, np.int64) * self.n_slices + cat(sl, np.int64)
        order = np.argsort(key, kind="stable")
        counts = np.bincount(key, minlength=len(self.elements) * self.n_slices)
        # _counts[e, s]: atoms of element e in slice s; _offsets[e, s]: first of them
        self._counts = counts.reshape(len(self.elements), self.n_slices)
        self._offsets = (np.cumsum(counts) - counts).reshape(self._counts.shape)

        def dev(v, dtype):
            return torch.as_tensor(v[order], dtype=dtype).to(self.device)

        self._conf = dev(cat(conf, np.int64), torch.int64)
        self._slice = dev(cat(sl, np.int64), torch.int64)
        # float64 pixel coordinates: float32 would lose ~1e-4 px at 1000 px
        y, x = dev(cat(y, float), torch.float64), dev(cat(x, float), torch.float64)
        y0, x0 = torch.floor(y), torch.floor(x)
        fy, fx = (y - y0).float(), (x - x0).float()
        y0, x0 = y0.long(), x0.long()
        # the four neighbours in the order (dy, dx) = (0, 0), (1, 0), (0, 1), (1, 1): [4, atoms]
        self._weights = torch.stack(
            [(1 - fy) * (1 - fx), fy * (1 - fx), (1 - fy) * fx, fy * fx]
        ).contiguous()
        self._pixels = torch.stack(
            [((y0 + dy) % n) * n + (x0 + dx) % n for dy, dx in ((0, 0), (1, 0), (0, 1), (1, 1))]
        ).contiguous()
        self._buffers: dict[str, torch.Tensor] = {}

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
        return self._counts.sum(0) > 0

    def slices(self, start: int, stop: int) -> torch.Tensor:
        """Projected potential of slices ``start:stop`` [V·Å], float32 ``[configs, k, N, N]``."""
        n, k = self.gpts, stop - start
        both = torch.view_as_real(self.packed_slices(start, stop))  # [configs, pairs, n, n, 2]
        return both.permute(0, 1, 4, 2, 3).reshape(self.n_configs, -1, n, n)[:, :k]

    def packed_slices(self, start: int, stop: int) -> torch.Tensor:
        """Slices ``start:stop`` two to a complex number: complex64 ``[configs, ceil(k/2), N, N]``
        whose real part is slice ``start + 2j`` and imaginary part slice ``start + 2j + 1`` [V·Å]
        (zero past ``stop``).

        Two slices share one complex FFT (the deposit of slice 2j as the real part, of 2j+1 as
        the imaginary part): the kernels are real and even, so the two potentials come back as
        the real and imaginary parts. On CPU this costs 0.33 ms per 320² slice against 0.8 ms
        for a real FFT pair (torch's rfft2/irfft2). Each element is transformed only over the
        slice pairs that hold it (a carbon slab and the particles above it share few slices).
        Work buffers are reused between calls: fresh multi-MB tensors cost page faults on CPU.
        """
        n, k, c = self.gpts, stop - start, self.n_configs
        pairs = (k + 1) // 2
        spectrum = self._buffer("spectrum", (c, pairs, n, n), torch.complex64)
        written = np.zeros(pairs, bool)  # pairs of the spectrum holding a contribution
        for e in range(len(self.elements)):
            held = np.flatnonzero(self._counts[e, start:stop])
            if not len(held):
                continue
            lo, hi = int(held[0]) // 2, int(held[-1]) // 2 + 1
            m = hi - lo
            first = int(self._offsets[e, start])
            atoms = slice(first, first + int(self._counts[e, start:stop].sum()))
            sl = self._slice[atoms] - start
            # index into the float view of a complex [configs, m, n, n] array
            base = (self._conf[atoms] * m + sl // 2 - lo) * (n * n)
            flat = ((base + self._pixels[:, atoms]) * 2 + sl % 2).reshape(-1)
            # the deposit buffer is all zeros between calls: after the FFT only the touched
            # points are reset, O(atoms) instead of O(grid)
            deposit = self._buffer("deposit", (c * m * n * n * 2,), torch.float32, zeros=True)
            # one index_add_ over the four neighbours, in the order of four separate calls
            deposit.index_add_(0, flat, self._weights[:, atoms].reshape(-1))
            try:
                # (no out=: torch's CPU FFT writes out= through a copy of a fresh result)
                packed = torch.view_as_complex(deposit.view(c, m, n, n, 2))
                transformed = torch.fft.fft2(packed)
            finally:
                deposit.index_fill_(0, flat, 0.0)
            # real and imaginary parts times the real kernel: what complex × real computes,
            # without promoting the kernel to a complex copy on every call
            torch.view_as_real(transformed).mul_(self._kernels[e])
            # the first contribution to a pair is copied, later ones added: no zeroing pass
            for i0, i1, seen in _runs(written[lo:hi]):
                target, part = spectrum[:, lo + i0 : lo + i1], transformed[:, i0:i1]
                target.add_(part) if seen else target.copy_(part)
            written[lo:hi] = True
        for i0, i1, seen in _runs(written):
            if not seen:  # slice pairs without atoms
                spectrum[:, i0:i1].zero_()
        return torch.fft.ifft2(spectrum, norm="forward")

    def _buffer(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, zeros: bool = False
    ) -> torch.Tensor:
        """A reusable tensor of ``shape`` (a view of a buffer grown to the largest request);
        ``zeros``: created zero-filled (the caller keeps it so)."""
        size = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < size:
            new = torch.zeros if zeros else torch.empty
            buf = self._buffers[name] = new(size, dtype=dtype, device=self.device)
        return buf[:size].view(shape)


def _runs(flags: np.ndarray) -> list[tuple[int, int, bool]]:
    """Runs of equal values in a 1D bool array: (start, stop, value) each."""
    edges = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), len(flags)]
    return [
        (i0, i1, bool(flags[i0])) for i0, i1 in zip(bounds[:-1], bounds[1:], strict=True) if i1 > i0
    ]


@lru_cache(maxsize=16)
def _scaled_kernels(
    elements: tuple[int, ...], gpts: int, sampling_A: float, device
) -> torch.Tensor:
    """:func:`projected_form_factors` / N² (the unnormalised inverse FFT's factor), each value
    twice along a last axis, ``[elements, N, N, 2]``, to scale the real and imaginary parts of
    a complex spectrum in one contiguous pass (a broadcast size-1 axis is ~10× slower on CPU).
    Cached per grid and species; read-only (shared by every potential of a dataset)."""
    kernels = projected_form_factors(elements, gpts, sampling_A, device) / gpts**2
    return kernels[..., None].expand(*kernels.shape, 2).contiguous()
