"""Helpers shared by the figure functions: selections, per-role losses, heatmaps, labels.

Every figure function has the signature ``fn(ds, *, select=None, reduce="median", metric="loss",
...)`` and returns a :class:`matplotlib.figure.Figure` built without pyplot (no global state,
nothing shown as a side effect). ``select`` maps grid axes to the values kept (the widgets'
filters); ``reduce`` is the Reduction mode applied over every model that passes the filters and
shares a cell of the figure (NaN-aware: failed, missing and excluded runs are skipped);
``metric`` is ``"loss"``, ``"dice"`` or ``"iou"`` of the model each stage kept (the database's
``final_<metric>``). For the loss lower is better, for Dice and IoU higher: :func:`worse` orients
every difference so that a positive gap always means "worse".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from ..database import check_reduction, metric_var, query
from ..metrics import get_metric
from ..series import get_series

# bright = good (low loss, high Dice): the eye goes to the good transfers
CMAPS = {False: "viridis_r", True: "viridis"}
MISSING_COLOUR = "0.85"  # excluded (target = pretraining domain) and all-NaN cells


def check_reduce(reduce: str) -> str:
    return check_reduction(reduce)


def check_metric(metric: str) -> str:
    return get_metric(metric).name


def var_of(metric: str) -> str:
    """The database variable a figure shows for ``metric``: the kept model's value."""
    return metric_var(check_metric(metric), "final")


def metric_title(metric: str) -> str:
    """``"cross-entropy loss"``, ``"Dice score"``, ``"IoU"``."""
    return get_metric(metric).title


def worse(a, b, metric: str):
    """``a`` minus ``b`` oriented so that positive means ``a`` is worse than ``b``."""
    return get_metric(metric).worse(a, b)


def best_of(values, metric: str) -> int:
    """Flat index of the best finite value (lowest loss, highest Dice)."""
    arr = np.asarray(values, dtype=float)
    return int(np.nanargmax(arr) if get_metric(metric).higher_is_better else np.nanargmin(arr))


def worst_of(values, metric: str) -> int:
    """Flat index of the worst finite value (highest loss, lowest Dice)."""
    return best_of(-np.asarray(values, dtype=float), metric)


def as_list(values: Any) -> list:
    if isinstance(values, str) or not isinstance(values, Sequence | np.ndarray):
        return [values]
    return list(values)


def clean_select(ds: xr.Dataset, select: Mapping[str, Any] | None) -> dict[str, list]:
    """``select`` with every value a list; an axis that the Dataset lacks is a ValueError."""
    out = {}
    for axis, values in (select or {}).items():
        if axis not in ds.dims:
            raise ValueError(
                f"select names {axis!r}, not an axis of this database: {list(ds.dims)}"
            )
        values = as_list(values)
        if not values:
            raise ValueError(f"select {axis}=[] leaves nothing to plot; choose at least one value")
        out[axis] = values
    return out


def reduce_da(da: xr.DataArray, reduce: str, keep: Sequence[str]) -> xr.DataArray:
    """Reduce ``da`` over every dim except ``keep`` with :func:`hrtem_book.results.query`."""
    name = da.name or "value"
    return query(da.to_dataset(name=name), name, None, check_reduce(reduce), keep=keep)


def selected(ds: xr.Dataset, var: str, select: Mapping[str, list]) -> xr.DataArray:
    """``ds[var]`` restricted to ``select`` (no reduction)."""
    return query(ds, var, select, reduce=None)


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def format_value(value: Any) -> str:
    """A short label for a coordinate value: small and large numbers (learning rates) as powers
    of ten as the text writes them (10⁻³, 2.5×10⁻⁴), other floats trimmed."""
    if isinstance(value, float | np.floating):
        value = float(value)
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
            mantissa, exponent = f"{value:.6e}".split("e")  # no digits lost
            mantissa = mantissa.rstrip("0").rstrip(".")
            power = "10" + str(int(exponent)).translate(_SUPERSCRIPT)
            return power if mantissa == "1" else f"{mantissa}×{power}"
        return f"{value:g}"
    return str(value)


def domain_unit(series: str) -> str:
    return get_series(series).unit


def domain_label(value: Any) -> str:
    """A compact tick label for a domain value (defocus [nm], dose [e⁻/Å²] or structure)."""
    if isinstance(value, float | np.floating):
        return f"{float(value):g}"
    return str(value)


def axis_title(ds: xr.Dataset, what: str) -> str:
    """``"pretraining defocus [nm]"`` etc. from the database's series."""
    return get_series(str(ds.attrs["series"])).title(what)


# grid axes in words (with units); domain axes name the database's series
AXIS_LABELS = {
    "n_transfer": "transfer images",
    "pretrain_lr": "pretraining learning rate",
    "transfer_lr": "transfer learning rate",
    "lr": "learning rate",
    "freeze": "frozen part",
    "mix": "mixture (images of a : b)",
    "seed": "seed (replicate)",
}
DOMAIN_AXIS_WORDS = {
    "pretrain_domain": "pretraining",
    "target_domain": "target",
    "domain_a": "domain a:",
    "domain_b": "domain b:",
    "train_domain": "training",
    "test_domain": "test",
}


def axis_label(ds: xr.Dataset, axis: str) -> str:
    """A grid axis in words, with its unit: ``"pretraining defocus [nm]"``, ``"frozen part"``."""
    if axis in DOMAIN_AXIS_WORDS:
        return axis_title(ds, DOMAIN_AXIS_WORDS[axis])
    return AXIS_LABELS.get(axis, axis.replace("_", " "))


def value_range(*arrays: xr.DataArray) -> tuple[float, float]:
    """Finite (min, max) over several arrays; (0, 1) when none is finite."""
    vals = np.concatenate([np.asarray(a.values, dtype=float).ravel() for a in arrays])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = float(vals.min()), float(vals.max())
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def draw_heatmap(
    ax,
    da: xr.DataArray,
    *,
    vlim: tuple[float, float],
    row_title: str,
    col_title: str,
    title: str,
    annotate: bool = True,
    label_fn: Callable[[Any], str] = domain_label,
    metric: str = "loss",
):
    """Draw a 2-D DataArray (rows = first dim) as a heatmap with value labels; NaN cells grey;
    good values bright whatever the metric's direction."""
    values = np.asarray(da.values, dtype=float)
    higher = get_metric(metric).higher_is_better
    cmap = matplotlib.colormaps[CMAPS[higher]].with_extremes(bad=MISSING_COLOUR)
    im = ax.imshow(
        np.ma.masked_invalid(values),
        cmap=cmap,
        vmin=vlim[0],
        vmax=vlim[1],
        aspect="auto",
        interpolation="nearest",
    )
    rows, cols = da.dims
    ax.set_yticks(range(da.sizes[rows]), [label_fn(v) for v in da[rows].values.tolist()])
    ax.set_xticks(range(da.sizes[cols]), [label_fn(v) for v in da[cols].values.tolist()])
    ax.tick_params(axis="x", labelrotation=90 if da.sizes[cols] > 6 else 0)
    ax.set_ylabel(row_title)
    ax.set_xlabel(col_title)
    ax.set_title(title)
    if annotate and values.size <= 160:
        mid = 0.5 * (vlim[0] + vlim[1])
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                light = v > mid if higher else v < mid  # the bright end of the colour map
                colour = "black" if light else "white"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=colour)
    return im


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")
