"""The three dataset series of the study: generation, storage (xarray/netCDF) and loading.

* ``defocus``: CdSe scenes imaged at every defocus of ``DataConfig.defoci_nm`` (dose
  ``defocus_series_dose``);
* ``dose``: the same CdSe scenes at ``dose_series_defocus_nm`` and every dose of ``doses``;
* ``structure``: for every lattice × size ("<lattice>-<small|large>") its own scenes at
  ``structure_series_defocus_nm`` and ``structure_series_dose``.

The defocus and dose series reuse the same exit waves: one pass simulates each CdSe scene once
(all frozen phonons) and applies every defocus and dose of both series to it, writing both
series' chunks. The exit waves are not stored (at paper scale they would take 67 GB); the
images of both series are. Image ``i`` of the train split shows the same structure in every
domain of these two series; defocus jitter and noise are drawn per image.

Reproducibility: every random draw comes from ``np.random.SeedSequence((seed, group, domain,
split, index, stream))``, so an image does not depend on which chunk or process made it, and
the scenes of the three splits never coincide (different ``split`` entropy): ``train`` (the
optimiser), ``val`` (the plateau rule and the kept epoch) and ``test`` (scoring only).
Generation is cached by ``series_hash``; work is written in chunks
(``<root>/.chunks/<series>-<hash>/``, atomic renames), so an interrupted run continues with the
first missing chunk. Finished series live in ``<root>/<series>-<hash>.nc`` with the layout of
docs/ARCHITECTURE.md ("Dataset series").

Every image carries a content checksum (``checksum``: BLAKE2b-64 of its image and mask bytes as
written). A series small enough to be read whole is checked image by image whenever it is opened
(:func:`series_problem`), and :func:`domain_tensors` checks every image it returns, so a byte
changed on disk after the file was written is found before a model trains on it.

    hrtem-book simulate --series defocus --profile smoke
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from . import __version__
from .config import DataConfig, config_hash, stable_json
from .layout import (
    atomic_write,
    chunk_dir,
    chunks_root,
    file_lock,
    move_aside,
    series_file,
    simulation_lock,
)
from .series import SERIES, get_series, scene_group

GENERATOR_VERSION = 5  # bump when the images change for an unchanged config (even by rounding)
CHUNK_SCENES = 8  # scenes per chunk file
SPLITS = tuple(DataConfig().split_sizes)  # ("train", "val", "test")
SIZES = ("small", "large")
# a series file below this size is checked whole when opened (and read into memory once per
# training process, see runs.open_series); a larger one image by image as it is read
SMALL_SERIES_BYTES = 2 * 2**30


class DamagedSeries(ValueError):
    """An image of a series file differs from the checksum written with it."""


def image_checksums(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """BLAKE2b-64 of each sample's image (float32) and mask (uint8) bytes, as uint64 ``[n]``."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    masks = np.ascontiguousarray(masks, dtype=np.uint8)
    out = np.empty(len(images), np.uint64)
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        digest = hashlib.blake2b(image.tobytes(), digest_size=8)
        digest.update(mask.tobytes())
        out[i] = int.from_bytes(digest.digest(), "little")
    return out


def _checksum_mismatch(ds: xr.Dataset, positions: np.ndarray, images, masks) -> int | None:
    """The first position in ``positions`` whose image or mask differs from its checksum."""
    bad = np.flatnonzero(image_checksums(images, masks) != ds["checksum"].values[positions])
    return int(positions[bad[0]]) if bad.size else None


def series_hash(series: str, data: DataConfig) -> str:
    """Content hash of one series of ``data`` (also covers the generator version)."""
    _check_series(series)
    return config_hash({"series": series, "data": data, "generator": GENERATOR_VERSION})


def series_path(series: str, data: DataConfig, root: str | Path) -> Path:
    """Path of the finished series in the data folder ``root``: ``<series>-<hash>.nc``."""
    return series_file(root, series, series_hash(series, data))


def _check_series(series: str) -> None:
    get_series(series)


def validate(series: str, data: DataConfig) -> None:
    """Raise a one-line ValueError for a value the generator cannot honour."""
    from .structures import get_lattice

    _check_series(series)
    sim = data.sim
    for lat in data.lattices:
        get_lattice(lat)
    for size in data.sizes:
        if size not in SIZES:
            raise ValueError(f"unknown particle size {size!r}; allowed: {', '.join(SIZES)}")
    if sim.image_px < 16:
        raise ValueError(
            f"pixel_A={sim.pixel_A} Å leaves {sim.image_px} pixels across the "
            f"{sim.field_nm} nm field; allowed: at least 16"
        )
    spec = get_series(series)
    if not data.domains(series):
        raise ValueError(
            f"the {series} series has no domains in this profile: {spec.description}; "
            "allowed: a profile that has what it needs"
        )
    doms = data.domains(series)[:1] if spec.shared_scenes else data.domains(series)
    scene_sims = {sim} | {spec.scene_sim(data, None if spec.shared_scenes else d) for d in doms}
    for s in scene_sims:
        field_A = s.field_nm * 10
        for name, step in (("sampling_A", s.sampling_A), ("pixel_A", s.pixel_A)):
            if abs(field_A / step - round(field_A / step)) > 1e-6:
                raise ValueError(
                    f"{name}={step} Å does not divide the {s.field_nm} nm field; "
                    "allowed: a step that fits a whole number of times"
                )
    for lo, hi in dict.fromkeys(spec.scene(data, d)[1] for d in doms):
        if not 0 < lo <= hi <= sim.field_nm / 2:
            raise ValueError(
                f"particle radius range ({lo}, {hi}) nm is not allowed for the {sim.field_nm} nm "
                f"field: need 0 < lo <= hi <= {sim.field_nm / 2}"
            )


# --- work units ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Unit:
    """One chunk of scenes of one source (:meth:`~hrtem_book.series.SeriesSpec.scene_source`):
    ``domain`` is the source's key, None for scenes shared by every domain of the group."""

    group: str  # the scene group (hrtem_book.series.SeriesSpec.scene_group)
    domain: str | float | None
    split: str
    start: int
    stop: int

    @property
    def source(self) -> tuple:
        return self.group, self.domain

    @property
    def name(self) -> str:
        source = self.group if self.domain is None else f"{self.group}-{self.domain}"
        return f"{source}_{self.split}_{self.start:05d}"


def _units(series: str, data: DataConfig) -> list[_Unit]:
    """The chunks of scenes that the domains of ``series`` show, each source once."""
    spec = get_series(series)
    sources: dict[tuple, dict[str, int]] = {}
    for d in data.domains(series):  # a source's first domain sizes it (they agree)
        sources.setdefault(spec.scene_source(data, d), spec.split_sizes(data, d))
    out = []
    for (group, key), sizes in sources.items():
        for split, n in sizes.items():
            for s in range(0, n, CHUNK_SCENES):
                out.append(_Unit(group, key, split, s, min(s + CHUNK_SCENES, n)))
    return out


def _home(group: str) -> str:
    """The series that owns the scenes of ``group`` (defines their lattice, sizes, support)."""
    return next(s for s in SERIES if get_series(s).scene_group == group)


def _users(unit: _Unit, data: DataConfig, targets) -> dict[str, tuple]:
    """Every series of ``targets`` with the domains of it that show the scenes of ``unit``."""
    out = {}
    for series in targets:
        spec = get_series(series)
        doms = tuple(d for d in data.domains(series) if spec.scene_source(data, d) == unit.source)
        if doms:
            out[series] = doms
    return out


def _code(text: str) -> int:
    return zlib.crc32(text.encode())  # stable across processes, unlike hash()


def _rng(data: DataConfig, *keys) -> np.random.Generator:
    words = [data.seed] + [_code(k) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


def _chunk_dir(series: str, data: DataConfig, root: Path) -> Path:
    return chunk_dir(root, series, series_hash(series, data))


def _chunk_file(series: str, data: DataConfig, root: Path, unit: _Unit) -> Path:
    return _chunk_dir(series, data, root) / f"{unit.name}.nc"


def _run_unit(unit: _Unit, data: DataConfig, root: Path, device: str, targets) -> None:
    """Simulate the scenes of ``unit`` and write one chunk file per series of ``targets`` that
    shows them (:func:`_users`)."""
    from .simulate import noisy_images, simulate_scene, view_mask
    from .structures import build_scene, get_lattice

    out_px = data.sim.image_px
    plan = {}  # series -> (domains, defocus offsets [nm], doses [e⁻/Å²], pixels [Å], imaging)
    for series, doms in _users(unit, data, targets).items():
        spec = get_series(series)
        optics = [spec.optics(data, d) for d in doms]
        pixels = [spec.pixel(data, d) for d in doms]
        imaging = [spec.imaging(data, d) for d in doms]
        plan[series] = (doms, [o[0] for o in optics], [o[1] for o in optics], pixels, imaging)
    home = get_series(_home(unit.group))  # the scenes are the owner's, whoever shows them
    lattice, radii = home.scene(data, unit.domain)
    sim = home.scene_sim(data, unit.domain)
    blur = get_lattice(lattice).label_blur_A
    parts: dict[str, list[xr.Dataset]] = {s: [] for s in plan}
    for index in range(unit.start, unit.stop):
        scene_rng = _rng(data, unit.group, unit.domain or "", unit.split, index, "scene")
        scene = build_scene(sim, lattice, radii, scene_rng)
        sw = simulate_scene(scene, sim, blur, scene_rng, device)
        for series, (doms, defoci, doses, pixels, imaging) in plan.items():
            # one generator per image: its defocus jitter (and the unrecorded focus offset of an
            # experimental-like recording), then its noise
            rngs = [_rng(data, series, str(dom), unit.split, index, "optics") for dom in doms]
            used = [
                defocus + rng.normal(0.0, sim.defocus_jitter_nm) + _focus_offset(m, rng)
                for defocus, rng, m in zip(defoci, rngs, imaging, strict=True)
            ]
            imgs = noisy_images(sw, used, doses, sim, rngs, pixels, out_px, imaging)
            masks = [view_mask(sw.mask, sim.pixel_A, p, out_px).cpu().numpy() for p in pixels]
            parts[series].append(_samples(series, doms, unit.split, index, imgs, masks, used, sw))
    for series, samples in parts.items():
        _atomic_netcdf(xr.concat(samples, "sample"), _chunk_file(series, data, root, unit))


def _focus_offset(measured, rng: np.random.Generator) -> float:
    """An experimental-like image's unrecorded focus offset [nm]: uniform within ±
    ``measured.defocus_range_nm`` (config.MeasuredImaging); 0 and no draw for the ideal
    recording (None), so every training image keeps its random stream."""
    if measured is None or measured.defocus_range_nm <= 0:
        return 0.0
    return float(rng.uniform(-measured.defocus_range_nm, measured.defocus_range_nm))


def _samples(series, doms, split, index, imgs, masks, used, sw) -> xr.Dataset:
    k = len(doms)
    spec = get_series(series)
    dom = np.array(doms, dtype=spec.dtype())
    if not spec.numeric:
        dom = dom.astype(str)
    return xr.Dataset(
        {
            "image": (("sample", "y", "x"), np.stack(imgs).astype(np.float32)),
            "mask": (("sample", "y", "x"), np.stack(masks).astype(np.uint8)),
            "zero_defocus_nm": ("sample", np.full(k, sw.zero_defocus_A / 10, np.float32)),
        },
        coords={
            "domain": ("sample", dom),
            "split": ("sample", np.array([split] * k)),
            "index": ("sample", np.full(k, index, np.int64)),
            "defocus_nm": ("sample", np.array(used, np.float64)),
        },
    )


def _atomic_netcdf(ds: xr.Dataset, path: Path) -> None:
    atomic_write(path, ds.to_netcdf)


# --- generation and loading ---------------------------------------------------------------------


def generate(
    series: str,
    data: DataConfig,
    root: str | Path,
    *,
    device: str = "cpu",
    workers: int = 1,
    progress: bool = True,
    with_series: tuple[str, ...] = (),
) -> Path:
    """Generate (or finish generating) ``series``, every series sharing its scene group and
    those of ``with_series``: each scene is simulated once for all of them.

    Returns the path of the finished series. Chunks already on disk are kept and skipped;
    ``workers`` > 1 simulates chunks in that many processes (CPU only).
    """
    wanted = tuple(dict.fromkeys(s for x in (series, *with_series) for s in scene_group(x)))
    for s in wanted:
        validate(s, data)
    root = Path(root)
    # one simulation per data folder at a time: a second sweep waits, then finds the series
    with file_lock(simulation_lock(root)):
        _generate(wanted, data, root, device, workers, progress)
    return series_path(series, data, root)


def _generate(wanted, data: DataConfig, root: Path, device, workers: int, progress: bool) -> None:
    for s in wanted:
        discard_damaged(s, data, root)
    targets = tuple(s for s in wanted if not series_path(s, data, root).exists())
    units = list(dict.fromkeys(u for s in targets for u in _units(s, data)))
    todo = [
        u
        for u in units
        if not all(_chunk_file(s, data, root, u).exists() for s in _users(u, data, targets))
    ]
    if targets:
        bar = tqdm(
            total=sum(u.stop - u.start for u in units),
            initial=sum(u.stop - u.start for u in units if u not in todo),
            desc=f"simulate {', '.join(targets)}",
            unit="scene",
            disable=not progress,
        )
        with bar:
            for unit in _execute(todo, data, root, device, workers, targets):
                bar.update(unit.stop - unit.start)
    for s in targets:
        _merge(s, data, root, _units(s, data))  # writes the series file or raises
        shutil.rmtree(_chunk_dir(s, data, root), ignore_errors=True)
    try:
        chunks_root(root).rmdir()  # only when no other series is half done
    except OSError:
        pass


def _execute(todo, data, root, device, workers, targets) -> Iterator[_Unit]:
    if workers <= 1 or str(device) != "cpu":
        for unit in todo:
            _run_unit(unit, data, root, device, targets)
            yield unit
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fork after torch initialised can deadlock
    with cf.ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),)
    ) as pool:
        futures = {pool.submit(_run_unit, u, data, root, device, targets): u for u in todo}
        for fut in cf.as_completed(futures):
            fut.result()
            yield futures[fut]


def _worker_init(parent: int) -> None:
    """A simulation worker: one thread, and it ends with its parent — a sweep killed with
    SIGKILL leaves no worker simulating on (Linux: ``PR_SET_PDEATHSIG``)."""
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _merge(series: str, data: DataConfig, root: Path, units: list[_Unit]) -> None:
    files = [_chunk_file(series, data, root, u) for u in units]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"chunks missing for {series}: {', '.join(missing[:3])}")
    parts = [_objects(xr.load_dataset(f)) for f in files]
    ds = xr.concat(parts, "sample")
    order = {d: i for i, d in enumerate(data.domains(series))}
    key = np.lexsort(
        (
            ds["index"].values,
            [SPLITS.index(s) for s in ds["split"].values],
            [order[get_series(series).normalize(d)] for d in ds["domain"].values],
        )
    )
    ds = ds.isel(sample=key)
    sim, spec = data.sim, get_series(series)
    pixel = {d: spec.pixel(data, d) for d in data.domains(series)}
    # x, y in Å where every domain has one pixel size; in pixels where the domains differ
    step, unit = (sim.pixel_A, "Å") if len(set(pixel.values())) == 1 else (1.0, "px")
    ds = ds.assign_coords(
        y=("y", (np.arange(sim.image_px) + 0.5) * step),
        x=("x", (np.arange(sim.image_px) + 0.5) * step),
        pixel_A=("sample", np.array([pixel[spec.normalize(d)] for d in ds["domain"].values])),
    )
    ds["checksum"] = ("sample", image_checksums(ds["image"].values, ds["mask"].values))
    ds["checksum"].attrs.update(
        long_name="BLAKE2b-64 of the sample's image (float32) and mask (uint8) bytes"
    )
    ds["pixel_A"].attrs.update(units="Å", long_name="pixel size of the image")
    ds["image"].attrs.update(units="electrons per pixel", long_name="HRTEM image after dose")
    ds["mask"].attrs.update(long_name="particle mask (1 = particle)")
    ds["zero_defocus_nm"].attrs.update(
        long_name="minimum-contrast defocus of the particles in vacuum (abTEM sign)", units="nm"
    )
    ds["defocus_nm"].attrs.update(
        units="nm", long_name="jittered defocus from the calibrated zero (positive = underfocus)"
    )
    ds["x"].attrs.update(units=unit)
    ds["y"].attrs.update(units=unit)
    ds.attrs.update(
        series=series,
        config=stable_json(data),
        config_hash=series_hash(series, data),
        package_version=__version__,
        seed=data.seed,
        generator_version=GENERATOR_VERSION,
        pixel_A=sim.pixel_A,
        domain_units=get_series(series).unit or "name",
    )
    _atomic_netcdf(ds, series_path(series, data, root))


def _objects(ds: xr.Dataset) -> xr.Dataset:
    """String coordinates as Python objects: concatenating fixed-width numpy strings of different
    widths truncates them ('train' after 'val' became 'tra')."""
    for name in ("split", "domain"):
        if ds[name].dtype.kind == "U":
            ds = ds.assign_coords({name: ("sample", ds[name].values.astype(object))})
    return ds


def load_series(
    series: str,
    data_config: DataConfig,
    root: str | Path,
    device: str = "cpu",
    *,
    workers: int = 1,
    progress: bool = True,
) -> xr.Dataset:
    """The series as an ``xr.Dataset``, generated first when missing.

    Opened lazily: coordinates are read at once, images when selected (a paper-scale defocus
    series holds 14 GB of images), so :func:`domain_tensors` reads only what it returns.
    """
    path = series_path(series, data_config, root)
    if not path.exists() or discard_damaged(series, data_config, root):
        generate(series, data_config, root, device=device, workers=workers, progress=progress)
    return xr.open_dataset(path)


def series_problem(series: str, data: DataConfig, root: str | Path) -> str | None:
    """Why the finished series file is unusable (None when it is fine or absent).

    A cheap check: the file opens, holds the config hash of ``data``, one image of the expected
    shape per (domain, split, index), and its last image can be read (a truncated file fails
    there).
    """
    path = series_path(series, data, root)
    if not path.exists():
        return None
    spec = get_series(series)
    expected = sum(sum(spec.split_sizes(data, d).values()) for d in data.domains(series))
    try:
        with xr.open_dataset(path) as ds:
            if ds.attrs.get("config_hash") != series_hash(series, data):
                return f"config hash {ds.attrs.get('config_hash')!r}, expected another"
            if ds.sizes.get("sample") != expected:
                return f"{ds.sizes.get('sample')} images, expected {expected}"
            px = data.sim.image_px
            if (ds.sizes.get("y"), ds.sizes.get("x")) != (px, px):
                return f"images of {ds.sizes.get('y')}×{ds.sizes.get('x')} pixels, expected {px}²"
            if "checksum" not in ds:
                return "no image checksums (written by an older version)"
            if path.stat().st_size < SMALL_SERIES_BYTES:  # every image: a few MB to read
                every = np.arange(ds.sizes["sample"])
                bad = _checksum_mismatch(ds, every, ds["image"].values, ds["mask"].values)
            else:  # the end of the file (a truncated file fails there); the rest as read
                last = np.array([ds.sizes["sample"] - 1])
                bad = _checksum_mismatch(ds, last, ds["image"].isel(sample=last).values,
                                         ds["mask"].isel(sample=last).values)  # fmt: skip
            if bad is not None:
                return f"image {bad} differs from its checksum"
    except Exception as exc:  # netCDF/HDF5 raise many types for a damaged file
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"unreadable ({type(exc).__name__}: {first})"
    return None


def discard_damaged(series: str, data: DataConfig, root: str | Path) -> bool:
    """Move a damaged series file aside (one line on stderr) so that it is simulated again;
    True if it was damaged. Series are derived data: regenerating loses nothing."""
    problem = series_problem(series, data, root)
    if problem is None:
        return False
    path = series_path(series, data, root)
    aside = move_aside(path)
    print(f"data: {path} is damaged ({problem}); moved aside to {aside.name}, simulating it again",
          file=sys.stderr)  # fmt: skip
    return True


def sample_positions(ds: xr.Dataset, domain, split: str) -> np.ndarray:
    """Positions along ``sample`` of one domain and split, in image-index order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    spec = get_series(ds.attrs["series"])
    values = ds["domain"].values
    hit = spec.matches(values, spec.normalize(domain))
    sel = np.flatnonzero(hit & (ds["split"].values == split))
    if sel.size == 0:
        allowed = ", ".join(str(v) for v in dict.fromkeys(values.tolist()))
        raise ValueError(
            f"domain {domain!r} is not in the {ds.attrs['series']} series; allowed: {allowed}"
        )
    return sel[np.argsort(ds["index"].values[sel], kind="stable")]


def domain_tensors(
    ds: xr.Dataset, domain, split: str, n: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images float32 ``[n, 1, H, W]`` and masks int64 ``[n, H, W]`` of one domain and split,
    in index order (the first ``n`` when given)."""
    sel = sample_positions(ds, domain, split)
    if n is not None:
        if not 1 <= n <= sel.size:
            raise ValueError(f"n={n} images requested; allowed: 1..{sel.size} for {domain!r}")
        sel = sel[:n]
    # isel reads only the selected images of a lazily opened file
    images = ds["image"].isel(sample=sel).values
    masks = ds["mask"].isel(sample=sel).values
    if "checksum" in ds and (bad := _checksum_mismatch(ds, sel, images, masks)) is not None:
        source = ds.encoding.get("source")
        where = f"series file {source}" if source else f"series {ds.attrs.get('series')!r}"
        moved = ""
        if source and Path(source).is_file():  # the next sweep simulates it again
            moved = f"; moved aside to {move_aside(Path(source)).name}"
        raise DamagedSeries(f"{where}: image {bad} differs from its checksum{moved}")
    return (
        torch.from_numpy(images.astype(np.float32))[:, None],
        torch.from_numpy(masks.astype(np.int64)),
    )
