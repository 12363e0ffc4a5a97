"""What a dataset series is, as data: its domains, their type and unit, parsing, matching, display.

A *series* is a family of dataset domains that differ in one condition: the ``defocus`` series
images the same CdSe scenes at several defoci [nm], ``dose`` at several electron doses [e⁻/Å²],
``structure`` shows other lattices and particle sizes (domain names ``"<lattice>-<size>"``),
``magnification`` the same scenes at several output pixel sizes [Å] on an image grid of fixed
size (so the field of view changes with the pixel), ``substrate`` CdSe particles on amorphous
carbon supports of several thicknesses [nm] (0 = none), ``heldout`` synthetic training variants
and simulated "experimental-like" recordings of scenes borrowed from the others.
Everything that depends on *which* series a value belongs to — is a domain a number or a name,
how is it written, how are two values compared, which optics image it — is answered here, once,
so no other module branches on a series' name.

Numeric domains are compared with a relative tolerance of 1e-9 (``-10`` and ``-10.0`` are one
domain; floats read back from netCDF or JSON match the config's values); named domains compare as
strings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

# defocus [nm], dose [e⁻/Å²], structure name "<lattice>-<size>", pixel size [Å] or support
# thickness [nm]
Domain = float | str
MATCH_RTOL = 1e-9  # relative tolerance of numeric domain matching


@dataclass(frozen=True)
class SeriesSpec:
    """One series: how its domains are typed, listed, written and imaged.

    ``domains(data)`` lists the domains of a :class:`~hrtem_book.config.DataConfig` in storage
    order; ``optics(data, domain)`` gives the (defocus [nm], dose [e⁻/Å²]) an image of the domain
    is taken at; ``scene(data, domain)`` the (lattice, particle radius range [nm]) of its scenes.
    Series with the same ``scene_group`` image the same scenes (their exit waves are simulated
    once); ``shared_scenes`` False means every domain has scenes of its own.

    ``scene_sim(data, domain)`` is the :class:`~hrtem_book.config.SimulationConfig` the scenes
    are built and simulated with (``domain`` None for shared scenes), ``pixel(data, domain)`` the
    pixel size [Å] of the domain's images: each image is the central ``data.sim.image_px``²
    pixels of that size, binned from the scene's images (a whole-number ratio). By default both
    are the profile's own: ``data.sim``, ``data.sim.pixel_A``.
    """

    name: str
    numeric: bool  # domain values are numbers (else names)
    unit: str  # unit of a numeric domain ("" for names)
    description: str
    domains: Callable[[Any], tuple]
    optics: Callable[[Any, Domain], tuple[float, float]]
    scene: Callable[[Any, Domain | None], tuple[str, tuple[float, float]]]
    scene_group: str
    shared_scenes: bool
    scene_sim: Callable[[Any, Domain | None], Any] = lambda data, domain: data.sim
    pixel: Callable[[Any, Domain], float] = lambda data, domain: data.sim.pixel_A
    # the imperfect recording of a domain (a config.MeasuredImaging), None: the ideal one
    imaging: Callable[[Any, Domain], Any] = lambda data, domain: None
    # where a domain's scenes come from when they are another series' (see scene_source)
    borrow: Callable[[Any, Domain], tuple[str, Domain | None]] | None = None

    def split_sizes(self, data, domain) -> dict[str, int]:
        """Images of ``domain`` in each split (train, val, test): the profile's, except the
        training split of an experimental-like domain, which holds its recordings
        (``MeasuredImaging.n_train``) when that is set."""
        sizes = dict(data.split_sizes)
        measured = self.imaging(data, domain)
        if measured is not None and measured.n_train is not None:
            sizes["train"] = measured.n_train
        return sizes

    def n_train(self, data, domain) -> int:
        """Training images of ``domain`` (:meth:`split_sizes`)."""
        return self.split_sizes(data, domain)["train"]

    def scene_source(self, data, domain) -> tuple[str, Domain | None]:
        """``(scene group, scene key)`` of the scenes a domain shows: key None for scenes
        shared by the whole group, else the domain of the group's own series whose scenes they
        are. A series that *borrows* scenes names another group's; images of one source show
        the same structures, so they are simulated once for every series that needs them."""
        if self.borrow is not None:
            return self.borrow(data, domain)
        return self.scene_group, (None if self.shared_scenes else self.normalize(domain))

    # --- values ------------------------------------------------------------------------------
    def normalize(self, value: Any) -> Domain:
        """The canonical value: a float for numeric series (so -10 and -10.0 hash alike)."""
        return float(value) if self.numeric else str(value)

    def parse(self, text: str) -> Domain:
        """A domain from its written form (command line); ValueError if it is not one."""
        return float(text) if self.numeric else str(text)

    def key(self, value: Any) -> str:
        """The key of a domain in records (``str`` of the canonical value, e.g. ``"-10.0"``)."""
        return str(self.normalize(value))

    def display(self, value: Any) -> str:
        """A compact label: ``-10`` (numbers trimmed), or the name."""
        return f"{float(value):g}" if self.numeric else str(value)

    def title(self, what: str = "") -> str:
        """An axis title such as ``"pretraining defocus [nm]"``."""
        text = f"{what} {self.name}".strip()
        return text + (f" [{self.unit}]" if self.unit else "")

    def dtype(self) -> Any:
        return np.float64 if self.numeric else object

    # --- matching ---------------------------------------------------------------------------
    def matches(self, values: Iterable, value: Any) -> np.ndarray:
        """Boolean mask of the entries of ``values`` equal to domain ``value``."""
        return match_mask(np.asarray(values), value)

    def index(self, values: Iterable, value: Any) -> int:
        """Position of ``value`` in ``values``, or -1."""
        return match_index(np.asarray(values), value)


def match_mask(values: np.ndarray, value: Any) -> np.ndarray:
    """Entries of ``values`` equal to ``value``: numbers to ``MATCH_RTOL``, otherwise as strings.

    Works for any coordinate (domains, learning rates, freezing options), whatever its dtype.
    """
    values = np.asarray(values)
    if values.dtype.kind in "fiu" and not isinstance(value, str):
        try:
            target = float(value)
        except (TypeError, ValueError):
            return np.zeros(values.shape, bool)
        return np.isclose(values.astype(float), target, rtol=MATCH_RTOL, atol=0.0)
    return values.astype(str) == str(value)


def match_index(values: np.ndarray, value: Any) -> int:
    """Position of the first entry of ``values`` equal to ``value`` (:func:`match_mask`), or -1."""
    hits = np.flatnonzero(match_mask(values, value))
    return int(hits[0]) if hits.size else -1


def split_structure_domain(name) -> tuple[str, str]:
    """``"CdSe-small"`` → ``("CdSe", "small")``: the lattice and particle size of a domain of
    the structure series (the one place that reads that name); a one-line ValueError for any
    other shape."""
    lattice, sep, size = str(name).rpartition("-")
    if not (sep and lattice and size):
        raise ValueError(f"structure domain {name!r} is not '<lattice>-<size>'")
    return lattice, size


def _structure_scene(data, domain):
    lattice, size = split_structure_domain(domain)
    return lattice, getattr(data, f"{size}_radius_nm")


def _magnification_sim(data, domain=None):
    """Scenes of the magnification series: the field of the coarsest pixel, output at the finest.

    The field is ``image_px`` × the largest pixel size, and the particle count per scene grows with
    its area, so that every domain's window holds as many particles per nm² as the other series.
    """
    sim = data.sim
    coarsest, finest = max(data.magnification_pixels_A), min(data.magnification_pixels_A)
    field_nm = sim.image_px * coarsest / 10
    area = (field_nm / sim.field_nm) ** 2
    lo, hi = sim.particles_per_image
    return replace(
        sim,
        field_nm=field_nm,
        pixel_A=finest,
        particles_per_image=(max(1, round(lo * area)), max(1, round(hi * area))),
    )


def _substrate_sim(data, domain):
    """Scenes of the substrate series: a support of exactly ``domain`` nm of amorphous carbon."""
    return replace(data.sim, carbon_thickness_nm=(float(domain), float(domain)))


# --- the held-out series: synthetic training variants and "experimental-like" targets --------
HELDOUT_SYNTHETIC = ("varied", "fixed-support", "small", "large")
HELDOUT_MEASURED = ("experimental", "experimental-small")
HELDOUT_LATTICE = "CdSe"


def fixed_support_nm(data) -> float:
    """The substrate thickness [nm] of the ``fixed-support`` variant: of the substrate series'
    thicknesses, the one nearest the middle of the range the other series draw from."""
    lo, hi = data.sim.carbon_thickness_nm
    return min(data.substrate_thickness_nm, key=lambda t: (abs(t - (lo + hi) / 2), t))


def _heldout_domains(data) -> tuple:
    have = HELDOUT_LATTICE in data.lattices and {"small", "large"} <= set(data.sizes)
    return HELDOUT_SYNTHETIC + HELDOUT_MEASURED if have else ()


def _heldout_borrow(data, domain) -> tuple[str, Domain | None]:
    """Scenes of the held-out series. The synthetic variants borrow theirs: CdSe of the
    defocus/dose series (mixed sizes, support of varied thickness), of the substrate series at
    one thickness, or of the structure series' small or large CdSe particles (varied support).
    The experimental-like domains have scenes of their own (:func:`_heldout_scene`), which no
    training series shows."""
    return {
        "varied": ("cdse", None),
        "fixed-support": ("substrate", float(fixed_support_nm(data))),
        "small": ("structure", f"{HELDOUT_LATTICE}-small"),
        "large": ("structure", f"{HELDOUT_LATTICE}-large"),
        "experimental": ("heldout", "experimental"),
        "experimental-small": ("heldout", "experimental-small"),
    }[str(domain)]


def _heldout_scene(data, domain) -> tuple[str, tuple[float, float]]:
    """The experimental-like scenes' particles (config.MeasuredImaging): CdSe with radii from
    the structure series' smallest to the defocus series' largest, a population no training
    variant has; ``experimental-small`` (the size-biased transfer set) the small ones alone.
    (The synthetic variants' scenes are borrowed: :func:`_heldout_borrow`.)"""
    lo, hi = data.small_radius_nm[0], data.series_radius_nm[1]
    if str(domain) == "experimental-small":
        hi = data.small_radius_nm[1]
    return HELDOUT_LATTICE, (lo, hi)


def _heldout_sim(data, domain):
    """The experimental-like scenes' support and contamination (config.MeasuredImaging)."""
    m = data.measured
    return replace(data.sim, carbon_thickness_nm=m.support_nm, contamination_nm=m.contamination_nm)


SERIES_SPECS: dict[str, SeriesSpec] = {
    "defocus": SeriesSpec(
        name="defocus",
        numeric=True,
        unit="nm",
        description="CdSe scenes at every defocus of DataConfig.defoci_nm (abTEM sign: positive "
        "= underfocus), dose DataConfig.defocus_series_dose",
        domains=lambda data: tuple(float(d) for d in data.defoci_nm),
        optics=lambda data, d: (float(d), data.defocus_series_dose),
        scene=lambda data, d: ("CdSe", data.series_radius_nm),
        scene_group="cdse",
        shared_scenes=True,
    ),
    "dose": SeriesSpec(
        name="dose",
        numeric=True,
        unit="e⁻/Å²",
        description="the defocus series' scenes at DataConfig.dose_series_defocus_nm and every "
        "dose of DataConfig.doses",
        domains=lambda data: tuple(float(d) for d in data.doses),
        optics=lambda data, d: (data.dose_series_defocus_nm, float(d)),
        scene=lambda data, d: ("CdSe", data.series_radius_nm),
        scene_group="cdse",
        shared_scenes=True,
    ),
    "structure": SeriesSpec(
        name="structure",
        numeric=False,
        unit="",
        description="scenes of their own for every lattice × particle size "
        "('<lattice>-<small|large>'), at the structure series' defocus and dose",
        domains=lambda data: tuple(f"{lat}-{size}" for lat in data.lattices for size in data.sizes),
        optics=lambda data, d: (data.structure_series_defocus_nm, data.structure_series_dose),
        scene=_structure_scene,
        scene_group="structure",
        shared_scenes=False,
    ),
    "magnification": SeriesSpec(
        name="magnification",
        numeric=True,
        unit="Å/px",
        description="the same CdSe scenes seen at every output pixel size of "
        "DataConfig.magnification_pixels_A on the same image grid (a finer pixel, a smaller "
        "field of view), at the structure series' defocus and dose",
        domains=lambda data: tuple(float(p) for p in data.magnification_pixels_A),
        optics=lambda data, d: (data.structure_series_defocus_nm, data.structure_series_dose),
        scene=lambda data, d: ("CdSe", data.series_radius_nm),
        scene_group="magnification",
        shared_scenes=True,
        scene_sim=_magnification_sim,
        pixel=lambda data, d: float(d),
    ),
    "substrate": SeriesSpec(
        name="substrate",
        numeric=True,
        unit="nm",
        description="CdSe scenes of their own on an amorphous carbon support of every thickness "
        "of DataConfig.substrate_thickness_nm (0: none), at the structure series' defocus and "
        "dose",
        domains=lambda data: tuple(float(t) for t in data.substrate_thickness_nm),
        optics=lambda data, d: (data.structure_series_defocus_nm, data.structure_series_dose),
        scene=lambda data, d: ("CdSe", data.series_radius_nm),
        scene_group="substrate",
        shared_scenes=False,
        scene_sim=_substrate_sim,
    ),
    "heldout": SeriesSpec(
        name="heldout",
        numeric=False,
        unit="",
        description="synthetic variants — CdSe of mixed sizes on supports of varied thickness "
        "('varied'), of one thickness ('fixed-support'), small or large particles only, "
        "scenes borrowed from the other series — and 'experimental'-like images of scenes of "
        "their own (another size range, a thinner support under a contamination layer, of "
        "all sizes or small only) recorded with an unrecorded focus offset, another lens, "
        "drift, background and an imperfect detector (config.MeasuredImaging), all at the "
        "structure series' defocus and dose",
        domains=_heldout_domains,
        optics=lambda data, d: (data.structure_series_defocus_nm, data.structure_series_dose),
        scene=_heldout_scene,
        scene_group="heldout",
        shared_scenes=False,
        scene_sim=_heldout_sim,
        imaging=lambda data, d: data.measured if str(d) in HELDOUT_MEASURED else None,
        borrow=_heldout_borrow,
    ),
}
SERIES = tuple(SERIES_SPECS)
# the series whose generalization the companion study (Sytwu et al.) measures, each the subject
# of a study "generalization-<series>" (hrtem_book.studies)
GENERALIZATION_SERIES = ("defocus", "dose", "structure", "magnification", "substrate")


def get_series(name: str) -> SeriesSpec:
    """The named series, or a one-line error listing the allowed names."""
    try:
        return SERIES_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown series {name!r}; allowed: {', '.join(SERIES)}") from None


def normalize_domain(series: str, value: Any) -> Domain:
    """Canonical domain value of ``series`` (floats for numeric series)."""
    return get_series(series).normalize(value)


def scene_group(series: str) -> tuple[str, ...]:
    """Every series that images the same scenes as ``series`` (itself included), in order."""
    group = get_series(series).scene_group
    return tuple(s for s, spec in SERIES_SPECS.items() if spec.scene_group == group)
