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
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from . import __version__
from .layout import Layout, atomic_write, database_file, git_commit, move_aside
from .metrics import METRIC, METRICS
from .profiles import Profile
from .records import read_record
from .series import get_series, match_index, match_mask
from .studies import STUDIES, build_grid, get_study

SCHEMA_VERSION = 4  # 3: final_<m> on test images apart from selection; 4: + per test image
STATUS_VALUES = ("ok", "failed", "missing", "excluded")
STOP_REASONS = ("plateau", "max_epochs", "")
REDUCTIONS = ("min", "mean", "median", "max")
REQUIRED_ATTRS = ("study", "series", "profile", "package_version", "git_commit", "created")
STRING_VARS = ("status", "config_hash", "stop_reason")
STAGE_VARS = ("epochs_run", "best_epoch", "train_time_s", "eval_time_s", "trainable_params")
IMAGE_VARS = ("image_loss", "image_counts")  # the final scores per test image
COUNTS = ("tp", "fp", "fn")  # the particle-pixel counts of image_counts
METRIC_KINDS = ("final", "history")
METRIC_VARS = tuple(f"{kind}_{m}" for kind in METRIC_KINDS for m in METRICS)
# which images each kind of metric variable is measured on (its ``split`` attr)
METRIC_SPLITS = {"final": "test", "history": "validation"}


def metric_var(metric: str, kind: str = "final") -> str:
    """The variable of ``metric`` (loss, dice, iou): ``final_dice``, ``history_loss``, ..."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; allowed: {', '.join(METRICS)}")
    if kind not in METRIC_KINDS:
        raise ValueError(f"kind={kind!r}; allowed: {', '.join(METRIC_KINDS)}")
    return f"{kind}_{metric}"


def _var_dims(axes: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    per_domain = axes + ("stage", "eval_domain")
    dims = {}
    for m in METRICS:
        dims[f"final_{m}"] = per_domain
        dims[f"history_{m}"] = per_domain + ("epoch",)
    for var in (*STAGE_VARS, "stop_reason"):
        dims[var] = axes + ("stage",)
    dims["image_loss"] = per_domain + ("test_image",)
    dims["image_counts"] = per_domain + ("test_image", "count")
    dims["status"] = axes
    dims["config_hash"] = axes
    return dims


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
    for var, dims in _var_dims(spec.axes).items():
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
    for var, dims in _var_dims(spec.axes).items():
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

    >>> query(ds, "final_loss", {"stage": "transfer", "freeze": "none"}, "mean",
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


def on_domain(da: xr.DataArray, axis: str) -> xr.DataArray:
    """The value evaluated on the domain named by ``axis`` (e.g. each cell's target domain).

    ``da`` has an ``eval_domain`` dim; the result drops it and holds, for every value ``v`` of
    ``axis``, the value at ``eval_domain == v`` (NaN where ``v`` is not an evaluation domain).
    The role of each value comes from the axis, never from sorting domain values.
    """
    ev = da["eval_domain"].values
    idx = np.array([match_index(ev, v) for v in da[axis].values])
    take = xr.DataArray(np.clip(idx, 0, None), dims=axis)
    out = da.isel(eval_domain=take).drop_vars("eval_domain", errors="ignore")
    return out.where(xr.DataArray(idx >= 0, dims=axis))


def generalization_matrix(
    ds: xr.Dataset,
    metric: str = "dice",
    select: Mapping[str, Any] | None = None,
    reduce: str = "median",
) -> xr.DataArray:
    """The (train_domain, test_domain) table of a ``generalization-<series>`` database: the
    ``metric`` of the model each pretraining kept, trained on the row's domain and evaluated on
    the column's, reduced (``reduce``) over the seeds and any other selected cells. Its diagonal
    — trained and tested on one domain — is the in-domain ideal of the companion study."""
    if "train_domain" not in ds.dims:
        raise ValueError(
            f"study {ds.attrs.get('study')!r} has no train_domain axis; allowed: the "
            "generalization-<series> databases"
        )
    da = query(
        ds,
        metric_var(metric, "final"),
        {**dict(select or {}), "stage": "pretrain"},
        reduce,
        keep=["train_domain", "eval_domain"],
    )
    return da.rename(eval_domain="test_domain")


HELDOUT_TEST = "experimental"  # the held-out domain every case is measured on
# (case, stage, transfer target): before transfer, after transfer on a few unbiased images,
# after transfer on as many images of small particles only
HELDOUT_CASES = (
    ("before", "pretrain", "experimental"),
    ("after", "transfer", "experimental"),
    ("after-biased", "transfer", "experimental-small"),
)


def heldout_table(ds: xr.Dataset, metric: str = "dice") -> xr.DataArray:
    """``metric`` on the experimental-like validation images of the ``heldout`` database, by
    synthetic variant (``pretrain_domain``), seed and case: ``before`` transfer (the model the
    pretraining kept), ``after`` transfer on a few experimental-like images and
    ``after-biased`` transfer on as many images of small particles only."""
    if ds.attrs.get("study") != "heldout":
        raise ValueError(
            f"study {ds.attrs.get('study')!r} is not the held-out study; allowed: heldout"
        )
    var = ds[metric_var(metric, "final")]
    test = _match_indices(ds["eval_domain"], [HELDOUT_TEST])
    if not test:
        raise ValueError(f"the heldout database has no {HELDOUT_TEST!r} evaluation domain")
    parts = []
    for case, stage, target in HELDOUT_CASES:
        hit = _match_indices(ds["target_domain"], [target])
        if not hit:
            continue
        da = var.isel(target_domain=hit[0], eval_domain=test[0]).sel(stage=stage, drop=True)
        parts.append(da.drop_vars(["target_domain", "eval_domain"]).expand_dims(case=[case]))
    table = xr.concat(parts, "case").transpose("pretrain_domain", "seed", "case")
    return table.rename(f"{metric} on {HELDOUT_TEST}")


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
    studies = [study for study, spec in STUDIES.items() if spec.kind == "pretrain"]
    out = {STUDIES[s].series: ds for s, ds in load_databases(results_dir, studies).items()}
    if not out:
        raise FileNotFoundError(
            f"no generalization databases in {results_dir}; create them with `hrtem-book sweep "
            "--study generalization --profile NAME` then `hrtem-book collect --profile NAME`"
        )
    return out


def deviation_from_ideal(matrix: xr.DataArray) -> xr.DataArray:
    """Each cell of a :func:`generalization_matrix` minus the cell on its column's diagonal
    (the model trained on the test domain itself); NaN for a test domain no model trained on.
    For Dice a negative deviation is a loss of overlap against the ideal."""
    trains = matrix["train_domain"].values
    ideal = np.array(
        [
            matrix.values[i, j] if (i := match_index(trains, t)) >= 0 else np.nan
            for j, t in enumerate(matrix["test_domain"].values.tolist())
        ]
    )
    return matrix - xr.DataArray(ideal, dims="test_domain")


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
