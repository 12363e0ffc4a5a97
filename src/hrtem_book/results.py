"""The results database: one labelled ``xr.Dataset`` per study, stored as netCDF.

Schema (``SCHEMA_VERSION``), for a study with grid axes ``A`` (``studies.STUDIES[study].axes``,
``seed`` included) and every metric ``m`` of :data:`hrtem_book.metrics.METRICS` (``loss``,
``dice``, ``iou``):

==================  ==========================================  ==============================
variable            dims                                        meaning
==================  ==========================================  ==============================
final_<m>           A + (stage, eval_domain)                    the model the stage keeps (its
                                                                best in-domain validation
                                                                epoch) on the test images
history_<m>         A + (stage, eval_domain, epoch)             value after every epoch on the
                                                                validation images
image_loss          A + (stage, eval_domain, test_image)        the kept model's loss on each
                                                                test image
image_counts        A + (stage, eval_domain, test_image,        its particle-pixel counts (TP,
                    count)                                      FP, FN) on each test image
epochs_run          A + (stage,)                                epochs the stage trained
best_epoch          A + (stage,)                                the epoch it kept
stop_reason         A + (stage,)                                "plateau" | "max_epochs" | ""
train_time_s        A + (stage,)                                training wall time [s]
eval_time_s         A + (stage,)                                per-epoch evaluation time [s]
trainable_params    A + (stage,)                                parameters updated by the stage
status              A                                           "ok" | "failed" | "missing" |
                                                                "excluded"
config_hash         A                                           run id ("" if no run)
==================  ==========================================  ==============================

Splits: every ``final_<m>`` is measured on each domain's test images, which no selection reads;
``image_loss`` and ``image_counts`` hold the same scores image by image (``final_loss`` is the
mean of ``image_loss`` over a domain's images, ``final_dice`` / ``final_iou`` those of the
summed counts), so that an analysis can take the test images as a sampling unit
(:mod:`hrtem_book.findings`); a domain with fewer test images than ``test_image`` has NaN after
its last;
``history_<m>`` on its validation images, which the plateau rule and the choice of the kept
epoch read (a variable's ``split`` attr says which). ``stage`` is ``("pretrain", "transfer")``
for transfer studies (the pretraining values of a cell
are those of the checkpoint its transfer started from) and ``("mixture",)`` for the baseline.
Losses are mean cross-entropy of the 2-class logits, Dice and IoU those of the particle class
(:mod:`hrtem_book.metrics`), stored to 1e-4 (histories as float32, see :func:`storage_encoding`);
NaN where a run failed, is missing, or the cell is excluded (target =
pretraining domain), so every reduction skips them. ``epoch`` counts from 1; a stage that stopped
early has NaN after its last epoch. Attrs: ``study``, ``series``, ``profile``,
``package_version``, ``git_commit``, ``created`` (ISO 8601, UTC), ``schema_version``, the
stopping rule of every stage (``<stage>_stopping_rule``, ``<stage>_patience``, ...) and its
arithmetic (``<stage>_precision``: fp32 or bf16), ``trained_on`` (the devices, CPU capabilities
and torch versions its records were computed with) and the study's fixed settings.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from . import __version__
from .database import (
    COUNTS,
    IMAGE_VARS,
    METRIC_KINDS,
    METRIC_SPLITS,
    METRIC_VARS,
    REQUIRED_ATTRS,
    SCHEMA_VERSION,
    STATUS_VALUES,
    STOP_REASONS,
    STRING_VARS,
    metric_var,
    var_dims,
)
from .layout import Layout, atomic_write, database_file, git_commit, move_aside
from .metrics import METRIC, METRICS
from .profiles import Profile
from .records import read_record
from .series import get_series
from .studies import STUDIES, STUDY_GROUPS, build_grid, get_study


def empty_database(
    study: str,
    coords: Mapping[str, Iterable],
    eval_domains: Iterable,
    n_epochs: int,
    *,
    profile: str,
    fixed: Mapping[str, Any] | None = None,
    n_test_images: int = 1,
) -> xr.Dataset:
    """A database of the study's schema with every cell ``missing`` and every value NaN;
    ``n_test_images``: the length of the per-image variables (the most test images of a
    domain)."""
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
    all_coords["test_image"] = np.arange(max(1, int(n_test_images)))
    all_coords["count"] = list(COUNTS)
    sizes = {name: len(values) for name, values in all_coords.items()}
    data_vars = {}
    for var, dims in var_dims(spec.axes).items():
        shape = tuple(sizes[d] for d in dims)
        if var == "status":
            values = np.full(shape, "missing", dtype=object)
        elif var in STRING_VARS:
            values = np.full(shape, "", dtype=object)
        else:
            values = np.full(shape, np.nan)
        data_vars[var] = (dims, values)
    ds = xr.Dataset(data_vars, coords=all_coords)
    for m in METRICS:
        units, title = METRIC[m].unit, METRIC[m].title
        ds[f"final_{m}"].attrs.update(
            long_name=f"{title} of the kept model on the test images", units=units,
            split=METRIC_SPLITS["final"],
        )  # fmt: skip
        ds[f"history_{m}"].attrs.update(
            long_name=f"{title} per epoch on the validation images", units=units,
            split=METRIC_SPLITS["history"],
        )  # fmt: skip
    ds["image_loss"].attrs.update(
        long_name="cross-entropy loss of the kept model on each test image",
        units="cross-entropy", split=METRIC_SPLITS["final"],
    )  # fmt: skip
    ds["image_counts"].attrs.update(
        long_name="particle-pixel counts (TP, FP, FN) of the kept model on each test image",
        units="pixels", split=METRIC_SPLITS["final"],
    )  # fmt: skip
    ds["epochs_run"].attrs.update(long_name="epochs the stage trained")
    ds["best_epoch"].attrs.update(long_name="epoch whose weights the stage kept")
    ds["stop_reason"].attrs.update(long_name="why the stage stopped")
    ds["train_time_s"].attrs.update(long_name="training wall time of the stage", units="s")
    ds["eval_time_s"].attrs.update(long_name="evaluation wall time of the stage", units="s")
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
# metrics are stored to 1e-4 (far below the seed-to-seed spread, ~1e-2), histories as float32,
# zlib-compressed: the gpu profile's defocus database shrinks from ~180 MB to ~25 MB
METRIC_DIGITS = 4


def storage_encoding(ds: xr.Dataset) -> dict[str, dict]:
    """netCDF encoding of a database: every float variable compressed; the metrics quantized
    to ``METRIC_DIGITS`` decimals (netCDF4's ``least_significant_digit``), their per-epoch
    histories in float32."""
    enc: dict[str, dict] = {}
    for var in ds.data_vars:
        if ds[var].dtype.kind != "f":
            continue
        enc[var] = {"zlib": True, "complevel": 4, "shuffle": True}
        if var in METRIC_VARS:
            enc[var]["least_significant_digit"] = METRIC_DIGITS
        if var.startswith("history_") or var in IMAGE_VARS:
            enc[var]["dtype"] = "float32"  # counts of a 64² image are exact in float32
        if var == "image_loss":
            enc[var]["least_significant_digit"] = METRIC_DIGITS
    return enc


def save_database(ds: xr.Dataset, path: str | Path) -> Path:
    """Validate and write ``ds`` to netCDF atomically (temporary file, then rename), compressed
    and with its metrics stored to 1e-4 (:func:`storage_encoding`)."""
    validate_database(ds, source="dataset to save")
    enc = storage_encoding(ds)
    return atomic_write(path, lambda tmp: ds.to_netcdf(tmp, engine="netcdf4", encoding=enc))


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
        path = database_file(path, study)
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
    expected_dims = set(spec.axes) | {"stage", "eval_domain", "epoch", "test_image", "count"}
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
    if tuple(ds["count"].values.tolist()) != COUNTS:
        fail(f"count values {ds['count'].values.tolist()}, expected {list(COUNTS)}")
    for var, dims in var_dims(spec.axes).items():
        if var not in ds.data_vars:
            fail(f"variable {var!r} missing")
        if set(ds[var].dims) != set(dims):
            fail(f"variable {var!r} has dims {list(ds[var].dims)}, expected {list(dims)}")
        if var in STRING_VARS:
            if ds[var].dtype.kind not in "OUS":
                fail(f"variable {var!r} must hold strings, found dtype {ds[var].dtype}")
        elif ds[var].dtype.kind != "f":
            fail(f"variable {var!r} must be floating point, found dtype {ds[var].dtype}")
    bad = sorted(set(np.unique(ds["status"].values.astype(str)).tolist()) - set(STATUS_VALUES))
    if bad:
        fail(f"status values {bad} are not allowed; allowed: {', '.join(STATUS_VALUES)}")
    for m in METRICS:
        hi = METRIC[m].upper  # cross-entropy >= 0; Dice and IoU in [0, 1]
        for var in (metric_var(m, kind) for kind in METRIC_KINDS):
            values = ds[var].values
            # non-finite values are stored as NaN, never as ±inf
            with np.errstate(invalid="ignore"):
                bad_values = np.isinf(values).any() or (values < 0).any() or (values > hi).any()
            if bad_values:
                allowed = METRIC[m].allowed
                fail(f"variable {var!r} holds values outside the metric's range; allowed: "
                     f"{allowed} or NaN")  # fmt: skip
    for var in IMAGE_VARS:
        with np.errstate(invalid="ignore"):
            if np.isinf(ds[var].values).any() or (ds[var].values < 0).any():
                fail(f"variable {var!r} holds values outside its range; allowed: >= 0 or NaN")
    bad = sorted(set(np.unique(ds["stop_reason"].values.astype(str)).tolist()) - set(STOP_REASONS))
    if bad:
        fail(f"stop_reason values {bad} are not allowed; allowed: plateau, max_epochs, ''")


def load_databases(
    results_dir: str | Path, studies: Iterable[str] | None = None
) -> dict[str, xr.Dataset]:
    """Every database of ``studies`` (default: all) present in ``results_dir``, by study."""
    return {
        study: load_database(results_dir, study)
        for study in (STUDIES if studies is None else studies)
        if database_file(results_dir, study).is_file()
    }


def generalization_databases(results_dir: str | Path) -> dict[str, xr.Dataset]:
    """``{series: database}`` of every ``generalization-<series>`` study found in
    ``results_dir``; a FileNotFoundError saying how to make them when there is none."""
    studies = STUDY_GROUPS["generalization"]
    out = {STUDIES[s].series: ds for s, ds in load_databases(results_dir, studies).items()}
    if not out:
        raise FileNotFoundError(
            f"no generalization databases in {results_dir}; create them with `hrtem-book sweep "
            "--study generalization --profile NAME` then `hrtem-book collect --profile NAME`"
        )
    return out


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
            at = idx + (s,)
            for var in ("epochs_run", "best_epoch", "train_time_s", "eval_time_s"):
                ds[var].values[at] = _finite(srec.get(var))
            ds["trainable_params"].values[at] = _stage_params(record, stage, srec)
            ds["stop_reason"].values[at] = srec.get("stop_reason", "")
            for m in METRICS:
                target = ds[f"final_{m}"].values
                for dom, value in srec.get(f"test_{m}", {}).items():  # the test images
                    if dom in index:
                        target[at + (index[dom],)] = _finite(value)
                hist = ds[f"history_{m}"].values
                for dom, curve in srec.get(f"val_{m}", {}).items():
                    if dom in index:
                        values = [_finite(v) for v in curve[:n_epochs]]
                        hist[at + (index[dom], slice(0, len(values)))] = values
            losses, counts = ds["image_loss"].values, ds["image_counts"].values
            for dom, values in srec.get("test_image_loss", {}).items():
                if dom in index:
                    losses[at + (index[dom], slice(0, len(values)))] = [_finite(v) for v in values]
            for dom, rows in srec.get("test_image_counts", {}).items():
                if dom in index and rows:
                    counts[at + (index[dom], slice(0, len(rows)))] = np.asarray(rows, float)


def _finite(value) -> float:
    value = np.nan if value is None else float(value)
    return value if np.isfinite(value) else np.nan


def stopping_attrs(stage, prefix: str = "") -> dict[str, Any]:
    """The stopping rule of a stage config as database attrs (netCDF has no None), each key
    prefixed with ``prefix`` (the database stage it trained, e.g. ``"transfer_"``)."""
    patience = "none" if stage.patience is None else stage.patience
    rule = (
        f"in-domain validation loss; from epoch {stage.min_epochs} on, stop after "
        f"{stage.patience} epochs without a relative improvement of {stage.min_delta:g}, at "
        f"most {stage.max_epochs} epochs; keep the best epoch"
        if stage.patience is not None
        else f"{stage.max_epochs} epochs; keep the epoch of lowest in-domain validation loss"
    )
    attrs = {
        "max_epochs": stage.max_epochs,
        "patience": patience,
        "min_delta": stage.min_delta,
        "min_epochs": stage.min_epochs,
        "stopping_rule": rule,
        "augment": stage.augment,
        "precision": stage.precision,
        "recalibrate_bn": int(stage.recalibrate_bn),  # netCDF has no booleans
        "recalibrate_images": stage.recalibrate_images or 0,  # 0: every training image
    }
    return {f"{prefix}{k}": v for k, v in attrs.items()}


def build_database(study: str, profile: Profile, root: str | Path = ".") -> xr.Dataset:
    """The database of ``study`` for ``profile`` from the records under ``root/results``."""
    grid = build_grid(study, profile)
    layout = Layout.of(root, profile)
    records = {}
    for h in grid.runs:
        rec = read_record(layout.record_path(study, h))
        if rec is not None:
            records[h] = rec
    n_epochs = max(profile.stage.max_epochs, profile.transfer.max_epochs)
    n_images = profile.data.n_test
    for rec in records.values():
        for srec in rec.get("stages", {}).values():
            for curve in srec.get("val_loss", {}).values():
                n_epochs = max(n_epochs, len(curve))
            for losses in srec.get("test_image_loss", {}).values():
                n_images = max(n_images, len(losses))
    ds = empty_database(
        study, grid.coords, grid.eval_domains, n_epochs, profile=profile.name, fixed=grid.fixed,
        n_test_images=n_images,
    )  # fmt: skip
    for stage in grid.spec.stages:  # transfer stages may follow a rule of their own
        config = profile.transfer if stage == "transfer" else profile.stage
        ds.attrs.update(stopping_attrs(config, prefix=f"{stage}_"))
    ds.attrs["n_pretrain"] = profile.n_pretrain
    ds.attrs["n_records"] = len(records)
    ds.attrs["trained_on"] = trained_on(records.values())
    fill_from_records(ds, grid, records)
    return ds


def trained_on(records: Iterable[dict]) -> str:
    """Where the records' runs computed, each distinct machine once: ``"cpu (AVX2), torch
    2.13.0+cpu"``, several joined by ``"; "`` (records of older code: ``"unrecorded"``)."""
    seen = set()
    for rec in records:
        c = rec.get("compute")
        seen.add(
            f"{c['device']} ({c['cpu_capability']}), torch {c['torch']}" if c else "unrecorded"
        )
    return "; ".join(sorted(seen))


def collect(
    profile: Profile,
    root: str | Path = ".",
    studies: Iterable[str] | None = None,
    attrs: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Write ``results/<profile>/<study>.nc`` for every study with records, with ``attrs``
    added (the rule-set stamp: :func:`hrtem_book.findings.collect`); return the paths. A
    database already there that is damaged or foreign is named, moved aside and written anew."""
    layout = Layout.of(root, profile)
    out = {}
    for study in studies or STUDIES:
        ds = build_database(study, profile, root)
        if ds.attrs["n_records"] == 0:
            continue
        ds.attrs.update(attrs or {})
        path = layout.database_path(study)
        if path.is_file() and (old := load_or_set_aside(path, study, log, "collect")) is not None:
            old.close()
        out[study] = save_database(ds, path)
    return out


def load_or_set_aside(
    path: Path, study: str, log: Callable[[str], None], who: str, then: str = ""
) -> xr.Dataset | None:
    """The database at ``path``, or None when it is damaged or foreign (another schema): then
    it is named in one line (``"<who>: <reason>; moved aside to <name><then>"``) and moved
    aside, never deleted."""
    try:
        return load_database(path, study)
    except ValueError as exc:
        aside = move_aside(path)
        log(f"{who}: {str(exc).splitlines()[0]}; moved aside to {aside.name}{then}")
        return None
