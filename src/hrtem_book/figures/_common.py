"""Helpers shared by the figure functions: selections, per-role losses, heatmaps, labels.

Every figure function has the signature ``fn(ds, *, select=None, reduce="median", ...)`` and
returns a :class:`matplotlib.figure.Figure` built without pyplot (no global state, nothing
shown as a side effect). ``select`` maps grid axes to the values kept (the widgets' filters);
``reduce`` is the Reduction mode applied over every model that passes the filters and shares a
cell of the figure (NaN-aware: failed, missing and excluded runs are skipped).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from ..results import check_reduction, query
from ..series import get_series, match_index

CMAP = "viridis_r"  # low loss = bright: the eye goes to the good transfers
MISSING_COLOUR = "0.85"  # excluded (target = pretraining domain) and all-NaN cells


def check_reduce(reduce: str) -> str:
    return check_reduction(reduce)


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


def loss_on(da: xr.DataArray, axis: str) -> xr.DataArray:
    """The loss evaluated on the domain named by ``axis`` (e.g. each cell's target domain).

    ``da`` has an ``eval_domain`` dim; the result drops it and holds, for every value ``v`` of
    ``axis``, the loss at ``eval_domain == v`` (NaN where ``v`` is not an evaluation domain).
    The role of each value comes from the axis, never from sorting domain values.
    """
    ev = da["eval_domain"].values
    idx = np.array([match_index(ev, v) for v in da[axis].values])
    take = xr.DataArray(np.clip(idx, 0, None), dims=axis)
    out = da.isel(eval_domain=take).drop_vars("eval_domain", errors="ignore")
    return out.where(xr.DataArray(idx >= 0, dims=axis))


def selected(ds: xr.Dataset, var: str, select: Mapping[str, list]) -> xr.DataArray:
    """``ds[var]`` restricted to ``select`` (no reduction)."""
    return query(ds, var, select, reduce=None)


def format_value(value: Any) -> str:
    """A short label for a coordinate value (learning rates in e-notation, floats trimmed)."""
    if isinstance(value, float | np.floating):
        value = float(value)
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
            mantissa, exponent = f"{value:.6e}".split("e")  # 2.5e-4, 1e-3: no digits lost
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
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
):
    """Draw a 2-D DataArray (rows = first dim) as a heatmap with value labels; NaN cells grey."""
    values = np.asarray(da.values, dtype=float)
    cmap = matplotlib.colormaps[CMAP].with_extremes(bad=MISSING_COLOUR)
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
                colour = "black" if v < mid else "white"  # viridis_r: low values are light
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=colour)
    return im


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")
