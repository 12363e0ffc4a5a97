"""The results database as read: its variables, their names and dims, and queries over them.

The schema itself is documented in :mod:`hrtem_book.results`, which writes the databases; this
module is what every reader (the studies' views and rules, the figures, the widgets) needs of it,
and nothing here knows a study.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ._lazy import LazyModule
from .metrics import METRICS
from .series import match_index, match_mask

xr = LazyModule("xarray")  # imported on first use (hrtem_book._lazy)

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


def var_dims(axes: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
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


# --- query ------------------------------------------------------------------------------------
def match_indices(coord: xr.DataArray, wanted: Iterable) -> list[int]:
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
        da = da.isel({dim: match_indices(ds[dim], wanted)})
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
