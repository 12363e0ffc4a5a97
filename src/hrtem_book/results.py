"""The results database: one labelled ``xr.Dataset`` per study, stored as netCDF.

Schema (``SCHEMA_VERSION``), for a study with grid axes ``A`` (``studies.STUDIES[study].axes``,
``seed`` included):

==================  ==========================================  ==============================
variable            dims                                        meaning
==================  ==========================================  ==============================
best_loss           A + (stage, eval_domain)                    lowest validation loss
final_loss          A + (stage, eval_domain)                    validation loss after the last
                                                                epoch
history             A + (stage, eval_domain, epoch)             validation loss per epoch
train_time_s        A + (stage,)                                wall time of the stage [s]
trainable_params    A + (stage,)                                parameters updated by the stage
status              A                                           "ok" | "failed" | "missing" |
                                                                "excluded"
config_hash         A                                           run id ("" if no run)
==================  ==========================================  ==============================

``stage`` is ``("pretrain", "transfer")`` for transfer studies (the pretraining values of a cell
are those of the checkpoint its transfer started from) and ``("mixture",)`` for the baseline.
Losses are mean cross-entropy of the 2-class logits; NaN where a run failed, is missing, or the
cell is excluded (target = pretraining domain), so every reduction skips them. ``epoch`` counts
from 1. Attrs: ``study``, ``series``, ``profile``, ``package_version``, ``git_commit``,
``created`` (ISO 8601, UTC), ``schema_version`` and the study's fixed settings.
"""

from __future__ import annotations

import datetime as _dt
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from . import __version__
from .layout import Layout, atomic_write, git_commit
from .profiles import Profile, get_profile
from .records import read_record
from .series import get_series, match_mask
from .studies import STUDIES, build_grid, get_study

SCHEMA_VERSION = 1
STATUS_VALUES = ("ok", "failed", "missing", "excluded")
LOSS_VARS = ("best_loss", "final_loss")
REDUCTIONS = ("min", "mean", "median", "max")
REQUIRED_ATTRS = ("study", "series", "profile", "package_version", "git_commit", "created")


def _var_dims(axes: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    return {
        "best_loss": axes + ("stage", "eval_domain"),
        "final_loss": axes + ("stage", "eval_domain"),
        "history": axes + ("stage", "eval_domain", "epoch"),
        "train_time_s": axes + ("stage",),
        "trainable_params": axes + ("stage",),
        "status": axes,
        "config_hash": axes,
    }


def check_reduction(
    reduce: str | None, *, name: str = "reduce", allow_none: bool = False
) -> str | None:
    """``reduce`` if it is one of :data:`REDUCTIONS` (or None where allowed); otherwise a
    ValueError naming the argument ``name``, the value and what is allowed."""
    if reduce is None and allow_none:
        return None
    if reduce not in REDUCTIONS:
        allowed = ", ".join(REDUCTIONS) + (", None" if allow_none else "")
        raise ValueError(f"{name}={reduce!r}: unknown reduction {reduce!r}; allowed: {allowed}")
    return reduce


def empty_database(
    study: str,
    coords: Mapping[str, Iterable],
    eval_domains: Iterable,
    n_epochs: int,
    *,
    profile: str,
    fixed: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """A database of the study's schema with every cell ``missing`` and every value NaN."""
    spec = get_study(study)
    unknown = set(coords) - set(spec.axes)
    lacking = [a for a in spec.axes if a not in coords]
    if unknown or lacking:
        raise ValueError(
            f"study {study!r} needs coords for exactly {list(spec.axes)}; "
            f"missing {lacking}, unknown {sorted(unknown)}"
        )
    if n_epochs < 1:
        raise ValueError(f"n_epochs={n_epochs} must be >= 1")
    all_coords: dict[str, Any] = {a: list(coords[a]) for a in spec.axes}
    all_coords["stage"] = list(spec.stages)
    all_coords["eval_domain"] = list(eval_domains)
    all_coords["epoch"] = np.arange(1, n_epochs + 1)
    sizes = {name: len(values) for name, values in all_coords.items()}
    data_vars = {}
    for var, dims in _var_dims(spec.axes).items():
        shape = tuple(sizes[d] for d in dims)
        if var == "status":
            values = np.full(shape, "missing", dtype=object)
        elif var == "config_hash":
            values = np.full(shape, "", dtype=object)
        else:
            values = np.full(shape, np.nan)
        data_vars[var] = (dims, values)
    ds = xr.Dataset(data_vars, coords=all_coords)
    ds["best_loss"].attrs.update(long_name="best validation loss", units="cross-entropy")
    ds["final_loss"].attrs.update(long_name="final validation loss", units="cross-entropy")
    ds["history"].attrs.update(long_name="validation loss per epoch", units="cross-entropy")
    ds["train_time_s"].attrs.update(long_name="training wall time of the stage", units="s")
    ds["trainable_params"].attrs.update(long_name="trainable parameters of the stage")
    ds.attrs.update(
        study=study,
        series=spec.series,
        profile=profile,
        package_version=__version__,
        git_commit=git_commit(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        schema_version=SCHEMA_VERSION,
    )
    for key, value in (fixed or {}).items():
        ds.attrs[key] = value
    return ds


# --- storage --------------------------------------------------------------------------------
def save_database(ds: xr.Dataset, path: str | Path) -> Path:
    """Validate and write ``ds`` to netCDF atomically (temporary file, then rename)."""
    validate_database(ds, source="dataset to save")
    return atomic_write(path, lambda tmp: ds.to_netcdf(tmp, engine="netcdf4"))


def load_database(path: str | Path, study: str | None = None) -> xr.Dataset:
    """Load and validate a results database.

    ``path`` is a ``<study>.nc`` file, or a ``results/<profile>`` folder together with ``study``.
    A missing file raises FileNotFoundError saying how to create it; a corrupt, truncated or
    mismatched one raises ValueError naming the file and the problem.
    """
    path = Path(path)
    if study is not None:
        get_study(study)
    if path.is_dir():
        if study is None:
            raise ValueError(
                f"{path} is a folder: name the study too; allowed: {', '.join(STUDIES)}"
            )
        path = path / f"{study}.nc"
    if not path.is_file():
        profile = path.parent.name or "NAME"
        which = study or path.stem
        raise FileNotFoundError(
            f"results database {path} not found; create it with `hrtem-book sweep --study "
            f"{which} --profile {profile}` then `hrtem-book collect --profile {profile}`"
        )
    try:
        with xr.open_dataset(path, engine="netcdf4") as raw:
            ds = raw.load()
    except Exception as exc:  # netCDF/HDF5 raise many types for damaged files
        raise ValueError(
            f"{path} is not a readable results database (corrupt or truncated netCDF): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    validate_database(ds, source=str(path), study=study)
    return ds


def validate_database(ds: xr.Dataset, source: str = "dataset", study: str | None = None) -> None:
    """Raise ValueError naming ``source`` unless ``ds`` follows the schema of its study."""

    def fail(msg: str) -> None:
        raise ValueError(f"{source}: {msg}")

    lacking = [a for a in REQUIRED_ATTRS if a not in ds.attrs]
    if lacking:
        fail(f"not a results database: attrs {lacking} missing")
    name = ds.attrs["study"]
    if name not in STUDIES:
        fail(f"attr study={name!r} is unknown; allowed: {', '.join(STUDIES)}")
    if study is not None and name != study:
        fail(f"holds study {name!r}, expected {study!r}")
    version = int(ds.attrs.get("schema_version", -1))
    if version != SCHEMA_VERSION:
        fail(f"schema_version={version}, this code reads {SCHEMA_VERSION}; re-run collect")
    spec = STUDIES[name]
    expected_dims = set(spec.axes) | {"stage", "eval_domain", "epoch"}
    if set(ds.dims) != expected_dims:
        fail(
            f"dims {sorted(ds.dims)} do not match study {name!r}: expected {sorted(expected_dims)}"
        )
    for dim in expected_dims:
        if dim not in ds.coords:
            fail(f"dim {dim!r} has no coordinate values")
        if ds.sizes[dim] == 0:
            fail(f"dim {dim!r} is empty")
    if tuple(ds["stage"].values.tolist()) != spec.stages:
        fail(f"stage values {ds['stage'].values.tolist()}, expected {list(spec.stages)}")
    for var, dims in _var_dims(spec.axes).items():
        if var not in ds.data_vars:
            fail(f"variable {var!r} missing")
        if set(ds[var].dims) != set(dims):
            fail(f"variable {var!r} has dims {list(ds[var].dims)}, expected {list(dims)}")
        if var in ("status", "config_hash"):
            if ds[var].dtype.kind not in "OUS":
                fail(f"variable {var!r} must hold strings, found dtype {ds[var].dtype}")
        elif ds[var].dtype.kind != "f":
            fail(f"variable {var!r} must be floating point, found dtype {ds[var].dtype}")
    bad = sorted(set(np.unique(ds["status"].values.astype(str)).tolist()) - set(STATUS_VALUES))
    if bad:
        fail(f"status values {bad} are not allowed; allowed: {', '.join(STATUS_VALUES)}")
    for var in ("best_loss", "final_loss", "history"):
        values = ds[var].values
        # cross-entropy is >= 0; non-finite values are stored as NaN, never as ±inf
        if np.isinf(values).any() or (values < 0).any():
            fail(f"variable {var!r} holds negative or infinite losses; allowed: >= 0 or NaN")


# --- query ------------------------------------------------------------------------------------
def _match_indices(coord: xr.DataArray, wanted: Iterable) -> list[int]:
    values = coord.values
    out = []
    for w in wanted:
        hits = np.flatnonzero(match_mask(values, w))
        if hits.size == 0:
            raise ValueError(
                f"{coord.name}={w!r} is not in the database; allowed: {values.tolist()}"
            )
        out.append(int(hits[0]))
    return out


def query(
    ds: xr.Dataset,
    var: str,
    select: Mapping[str, Any] | None = None,
    reduce: str | None = "min",
    keep: Iterable[str] = (),
) -> xr.DataArray:
    """Select cells by axis values, then reduce every other dim except ``keep``.

    ``select`` maps a dim to one value or a list of values (floats match to 1e-9 relative).
    ``reduce`` is one of min / mean / median / max (NaN-aware: failed and missing runs are
    skipped; an all-NaN group gives NaN) or None to return the selection unreduced. The result
    has the ``keep`` dims, in that order.

    >>> query(ds, "best_loss", {"stage": "transfer", "freeze": "none"}, "mean",
    ...       keep=["pretrain_domain", "eval_domain"])  # doctest: +SKIP
    """
    if var not in ds.data_vars:
        raise ValueError(f"unknown variable {var!r}; allowed: {', '.join(ds.data_vars)}")
    da = ds[var]
    keep = list(keep)
    for dim in list(select or {}) + keep:
        if dim not in da.dims:
            raise ValueError(f"{var} has no axis {dim!r}; allowed: {', '.join(da.dims)}")
    if len(set(keep)) != len(keep):
        raise ValueError(f"keep={keep} repeats an axis")
    check_reduction(reduce, allow_none=True)
    for dim, wanted in (select or {}).items():
        if isinstance(wanted, str) or not isinstance(wanted, Iterable):
            wanted = [wanted]
        da = da.isel({dim: _match_indices(ds[dim], wanted)})
    if reduce is None:
        return da
    if da.dtype.kind != "f":
        raise ValueError(f"{var} holds {da.dtype} values; reduce applies to numeric variables")
    dims = [d for d in da.dims if d not in keep]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN groups → NaN, by design
        out = getattr(da, reduce)(dim=dims, skipna=True) if dims else da
    return out.transpose(*keep)


# --- records → database -----------------------------------------------------------------------
def _domain_index(series: str, eval_domains: Iterable) -> dict[str, int]:
    """Record keys are ``str(domain)``; numeric keys are matched by value ("-10" = "-10.0")."""
    spec = get_series(series)
    out = {}
    for i, d in enumerate(eval_domains):
        out[str(d)] = i
        out[spec.key(d)] = i
    return out


def _stage_params(record: Mapping[str, Any], stage: str, stage_rec: Mapping[str, Any]) -> float:
    if "trainable_params" in stage_rec:
        return float(stage_rec["trainable_params"])
    # pretraining updates every parameter; the last stage's count is the record's own
    key = "total_params" if stage == "pretrain" else "trainable_params"
    value = record.get(key)
    return np.nan if value is None else float(value)


def fill_from_records(ds: xr.Dataset, grid, records: Mapping[str, Mapping[str, Any]]) -> None:
    """Write the records (by config hash) into the cells of ``grid`` (a studies.StudyGrid)."""
    spec = grid.spec
    index = _domain_index(spec.series, ds["eval_domain"].values.tolist())
    pos = {a: {v: i for i, v in enumerate(grid.coords[a])} for a in spec.axes}
    status, hashes = ds["status"].values, ds["config_hash"].values
    best, final, hist = ds["best_loss"].values, ds["final_loss"].values, ds["history"].values
    times, params = ds["train_time_s"].values, ds["trainable_params"].values
    n_epochs = ds.sizes["epoch"]
    status[...] = "excluded"
    for cell in grid.cells:
        idx = tuple(pos[a][v] for a, v in zip(spec.axes, cell, strict=True))
        h = grid.hashes[cell]
        hashes[idx] = h
        record = records.get(h)
        if record is None:
            status[idx] = "missing"
            continue
        status[idx] = record["status"]
        if record["status"] != "ok":
            continue
        for s, stage in enumerate(spec.stages):
            srec = record.get("stages", {}).get(stage)
            if srec is None:
                continue
            times[idx + (s,)] = float(srec.get("train_time_s", np.nan))
            params[idx + (s,)] = _stage_params(record, stage, srec)
            for key, target in (("best_loss", best), ("final_loss", final)):
                for dom, value in srec.get(key, {}).items():
                    if dom in index:
                        target[idx + (s, index[dom])] = _finite(value)
            for dom, curve in srec.get("val_loss", {}).items():
                if dom in index:
                    values = [_finite(v) for v in curve[:n_epochs]]
                    hist[idx + (s, index[dom], slice(0, len(values)))] = values


def _finite(value) -> float:
    value = np.nan if value is None else float(value)
    return value if np.isfinite(value) else np.nan


def build_database(study: str, profile: Profile, root: str | Path = ".") -> xr.Dataset:
    """The database of ``study`` for ``profile`` from the records under ``root/results``."""
    grid = build_grid(study, profile)
    layout = Layout(root, profile.name)
    records = {}
    for h in grid.runs:
        rec = read_record(layout.record_path(study, h))
        if rec is not None:
            records[h] = rec
    n_epochs = profile.stage.epochs
    for rec in records.values():
        for srec in rec.get("stages", {}).values():
            for curve in srec.get("val_loss", {}).values():
                n_epochs = max(n_epochs, len(curve))
    ds = empty_database(
        study, grid.coords, grid.eval_domains, n_epochs, profile=profile.name, fixed=grid.fixed
    )
    ds.attrs["n_pretrain"] = profile.n_pretrain
    ds.attrs["n_records"] = len(records)
    fill_from_records(ds, grid, records)
    return ds


def collect(profile: Profile, root: str | Path = ".", studies: Iterable[str] | None = None) -> dict:
    """Write ``results/<profile>/<study>.nc`` for every study with records; return the paths."""
    layout = Layout(root, profile.name)
    out = {}
    for study in studies or STUDIES:
        ds = build_database(study, profile, root)
        if ds.attrs["n_records"] == 0:
            continue
        out[study] = save_database(ds, layout.database_path(study))
    return out


def _cli(args) -> int:
    profile = get_profile(args.profile)
    paths = collect(profile, args.root)
    if not paths:
        raise FileNotFoundError(
            f"no records under {Layout(args.root, profile.name).records_root}; run "
            f"`hrtem-book sweep --study all --profile {profile.name}` first"
        )
    for study, path in paths.items():
        ds = load_database(path, study)
        counts = {s: int((ds["status"] == s).sum()) for s in STATUS_VALUES}
        print(f"{path}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "collect", help="gather sweep records into results/<profile>/<study>.nc databases"
    )
    p.add_argument("--profile", required=True, help="profile name, e.g. smoke, laptop, paper")
    p.add_argument("--root", default=".", help="project folder holding results/")
    p.set_defaults(func=_cli)
