"""Chapter "Generalization without transfer" (the companion study of Sytwu et al.).

``confusion_matrices`` draws, for each series of the ``generalization-<series>`` databases, the
table of a metric for every (training domain, test domain) pair of models trained without
transfer: the number in each cell is the metric, its colour the deviation from the in-domain
ideal — the models trained on the test domain itself, the diagonal — as in the companion
study's figures. Red is worse than the ideal, blue better, white equal.

``training_curves`` draws the same models' training dynamics: for each training domain, the
metric per epoch on its own domain's validation images and, averaged, on the other domains' —
how a model's learning at home runs beside its learning away from home (findings D1, D2 read
the first epoch).

``heldout_bars`` draws the synthetic → experimental-like study: for each synthetic training
variant, the metric on the experimental-like test images before transfer, after transfer
on a few of them, and after transfer on as many images of small particles only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from ..analysis import deviation_from_ideal, generalization_matrix
from ..database import metric_var, on_domain
from ..metrics import get_metric
from ..series import GENERALIZATION_SERIES, get_series, match_index
from ..studies.generalization import EARLY_EPOCH, generalization_gaps
from ..studies.heldout import HELDOUT_CASES, HELDOUT_TEST, heldout_table
from ._common import (
    check_metric,
    check_reduce,
    clean_select,
    domain_label,
    metric_title,
    new_figure,
    reduce_da,
    selected,
    worse,
)

DEVIATION_CMAP = "RdBu"  # red: below the in-domain ideal, blue: above it


def _series_order(dbs: Mapping[str, xr.Dataset], series: Sequence[str] | None) -> list[str]:
    names = list(series) if series is not None else [s for s in GENERALIZATION_SERIES if s in dbs]
    unknown = [s for s in names if s not in dbs]
    if unknown:
        raise ValueError(f"series {unknown} have no database here; allowed: {', '.join(dbs)}")
    if not names:
        raise ValueError("no series selected; choose at least one")
    return names


def _clean(ds: xr.Dataset, select: Mapping[str, Any] | None) -> dict:
    """The part of ``select`` that names axes of ``ds`` (seeds apply to every series)."""
    out = {}
    for axis, values in (select or {}).items():
        if axis in ds.dims:
            values = list(values) if isinstance(values, list | tuple) else [values]
            if not values:
                raise ValueError(f"select {axis}=[] leaves nothing to plot")
            out[axis] = values
    return out


def _panels(n: int, width: tuple[float, float], height: tuple[float, float]):
    """A figure of ``n`` panels, three to a row: ``(figure, axes [rows, cols])``; ``width`` and
    ``height`` are (per panel, margin) in inches."""
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = new_figure(width[0] * cols + width[1], height[0] * rows + height[1])
    return fig, fig.subplots(rows, cols, squeeze=False)


def matrices(
    dbs: Mapping[str, xr.Dataset],
    *,
    series: Sequence[str] | None = None,
    select: Mapping[str, Any] | None = None,
    reduce: str = "median",
    metric: str = "dice",
) -> dict[str, tuple[xr.DataArray, xr.DataArray]]:
    """``{series: (matrix, deviation)}``: the metric by (train_domain, test_domain) and its
    deviation from the in-domain ideal, oriented so that negative is worse for every metric."""
    check_reduce(reduce)
    check_metric(metric)
    out = {}
    for name in _series_order(dbs, series):
        ds = dbs[name]
        m = generalization_matrix(ds, metric, _clean(ds, select), reduce)
        dev = deviation_from_ideal(m)
        out[name] = (m, -worse(dev, 0.0, metric))
    return out


def confusion_matrices(
    dbs: Mapping[str, xr.Dataset],
    *,
    series: Sequence[str] | None = None,
    select: Mapping[str, Any] | None = None,
    reduce: str = "median",
    metric: str = "dice",
) -> Figure:
    """One panel per series: the metric of each (training, test) pair, coloured by its
    deviation from the in-domain ideal on one symmetric colour scale for all panels."""
    tables = matrices(dbs, series=series, select=select, reduce=reduce, metric=metric)
    devs = np.concatenate([np.asarray(d.values, float).ravel() for _, d in tables.values()])
    devs = devs[np.isfinite(devs)]
    lim = float(np.abs(devs).max()) if devs.size and np.abs(devs).max() > 0 else 0.05
    n = len(tables)
    fig, axes = _panels(n, (4.2, 0.8), (3.9, 0.0))
    cmap = matplotlib.colormaps[DEVIATION_CMAP].with_extremes(bad="0.85")
    im = None
    for ax, (name, (m, dev)) in zip(axes.ravel(), tables.items(), strict=False):
        spec = get_series(name)
        im = ax.imshow(
            np.ma.masked_invalid(np.asarray(dev.values, float)),
            cmap=cmap,
            vmin=-lim,
            vmax=lim,
            aspect="auto",
            interpolation="nearest",
        )
        ax.set_yticks(range(m.sizes["train_domain"]), [domain_label(v) for v in
                      m["train_domain"].values.tolist()])  # fmt: skip
        ax.set_xticks(range(m.sizes["test_domain"]), [domain_label(v) for v in
                      m["test_domain"].values.tolist()])  # fmt: skip
        ax.tick_params(axis="x", labelrotation=30 if not spec.numeric else 0)
        ax.set_ylabel(spec.title("training"))
        ax.set_xlabel(spec.title("test"))
        ax.set_title(name)
        values = np.asarray(m.values, float)
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                d = float(dev.values[i, j])
                strong = np.isfinite(d) and abs(d) > 0.6 * lim
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if strong else "black")  # fmt: skip
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    if im is not None:
        bar = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.85)
        bar.set_label(f"{metric_title(metric)}: deviation from the in-domain ideal")
    fig.suptitle(
        f"Trained on one domain, tested on every one, no transfer ({reduce} over seeds; "
        f"numbers: {metric_title(metric)})",
        fontsize=10,
    )
    return fig


def curves(
    ds: xr.Dataset, metric: str, select: Mapping[str, Any] | None, reduce: str
) -> tuple[xr.DataArray, xr.DataArray]:
    """The per-epoch ``metric`` of a ``generalization-<series>`` database's models on the
    validation images: ``(home, away)``, by (train_domain, epoch), ``reduce`` over the
    selected seeds — home on the training domain itself, away the mean over the other
    evaluation domains. Epochs after a model stopped are NaN (its curve ends there)."""
    history = ds[metric_var(metric, "history")].sel(stage="pretrain", drop=True)
    history = history.sel(_clean(ds, select))
    home = on_domain(history, "train_domain")
    ev = history["eval_domain"].values
    is_home = xr.DataArray(
        [[match_index(ev, t) == j for j in range(len(ev))] for t in ds["train_domain"].values],
        dims=("train_domain", "eval_domain"),
        coords={"train_domain": ds["train_domain"]},
    )
    away = history.where(~is_home).mean("eval_domain", skipna=True)
    keep = ["train_domain", "epoch"]
    return (reduce_da(home.rename("home"), reduce, keep),
            reduce_da(away.rename("away"), reduce, keep))  # fmt: skip


def training_curves(
    dbs: Mapping[str, xr.Dataset],
    *,
    series: Sequence[str] | None = None,
    select: Mapping[str, Any] | None = None,
    reduce: str = "median",
    metric: str = "dice",
) -> Figure:
    """One panel per series: for each training domain (a colour), the metric per epoch on its
    own domain's validation images (solid) and on the other domains' (dashed, their mean),
    ``reduce`` over the selected seeds; the grey line marks the first epoch, which findings D1
    and D2 relate to the kept models' scores."""
    check_reduce(reduce)
    check_metric(metric)
    names = _series_order(dbs, series)
    n = len(names)
    fig, axes = _panels(n, (4.2, 0.4), (3.4, 0.4))
    for ax, name in zip(axes.ravel(), names, strict=False):
        home, away = curves(dbs[name], metric, select, reduce)
        trains = home["train_domain"].values.tolist()
        colours = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, max(len(trains), 1)))
        epochs = home["epoch"].values
        for colour, t in zip(colours, trains, strict=False):
            label = domain_label(t)
            ax.plot(epochs, home.sel(train_domain=t).values, "-", color=colour, lw=1.4,
                    label=f"{label} at home")  # fmt: skip
            ax.plot(epochs, away.sel(train_domain=t).values, "--", color=colour, lw=1.1,
                    label=f"{label} away")  # fmt: skip
        ax.axvline(EARLY_EPOCH, color="0.6", lw=0.8, zorder=0)
        last = [e for e in epochs if np.isfinite(home.sel(epoch=e).values).any()]
        if last:
            ax.set_xlim(0.5, max(last) + 0.5)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{metric_title(metric)} (validation)")
        ax.set_title(get_series(name).title("trained on"), fontsize=9)
        ax.legend(fontsize=6, ncols=2, frameon=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    fig.suptitle(
        f"Training without transfer: at home (solid) and away (dashed, mean of the other "
        f"domains), {reduce} over seeds",
        fontsize=10,
    )
    return fig


def companion_numbers(
    dbs: Mapping[str, xr.Dataset], metric: str = "dice"
) -> dict[str, dict[str, float]]:
    """Per series: the mean gap to the in-domain ideal, the worst pair and the seed spread, on
    the metric's own scale (negative = below the ideal)."""
    out = {}
    for name in _series_order(dbs, None):
        g = generalization_gaps(dbs[name], metric)
        if not g["gaps"]:
            continue
        sign = -1.0 if get_metric(metric).higher_is_better else 1.0  # gaps are errors
        worst = max(g["gaps"], key=g["gaps"].get)
        out[name] = {
            "mean_deviation": sign * g["mean_gap"],
            "worst_pair": worst,
            "worst_deviation": sign * g["gaps"][worst],
            "seed_sd": g["seed_sd"],
            "ideal": g["ideal"],
        }
    return out


HELDOUT_LABELS = {
    "before": "before transfer",
    "after": "after transfer",
    "after-biased": "after transfer on small particles only",
}
HELDOUT_COLOURS = {"before": "0.6", "after": "tab:blue", "after-biased": "tab:orange"}


def heldout_bars(
    ds: xr.Dataset,
    *,
    select: Mapping[str, Any] | None = None,
    reduce: str = "median",
    metric: str = "dice",
) -> Figure:
    """One group of bars per synthetic training variant: the metric on the experimental-like
    validation images (:func:`~hrtem_book.studies.heldout.heldout_table`) before transfer, after
    transfer on a few experimental-like images and after transfer on as many images of small
    particles only; bars ``reduce`` over the selected seeds, dots the seeds."""
    check_reduce(reduce)
    check_metric(metric)
    sel = clean_select(ds, select)
    table = selected(
        heldout_table(ds, metric).to_dataset(name="value"),
        "value",
        {a: v for a, v in sel.items() if a in ("pretrain_domain", "seed")},
    )
    bars = reduce_da(table, reduce, keep=["pretrain_domain", "case"])
    variants = table["pretrain_domain"].values.tolist()
    cases = [c for c, _, _ in HELDOUT_CASES if c in table["case"].values.tolist()]
    fig = new_figure(1.6 * len(variants) + 2.4, 3.8)
    ax = fig.subplots()
    width = 0.8 / len(cases)
    for k, case in enumerate(cases):
        x = np.arange(len(variants)) + (k - (len(cases) - 1) / 2) * width
        heights = [float(bars.sel(pretrain_domain=v, case=case)) for v in variants]
        ax.bar(x, heights, width * 0.92, color=HELDOUT_COLOURS[case], label=HELDOUT_LABELS[case])
        for i, v in enumerate(variants):
            dots = np.asarray(table.sel(pretrain_domain=v, case=case).values, float)
            ax.plot(np.full(dots.shape, x[i]), dots, "k.", ms=4)
    ax.set_xticks(range(len(variants)), [str(v) for v in variants])
    ax.set_xlabel("synthetic training variant")
    ax.set_ylabel(f"{metric_title(metric)} on {HELDOUT_TEST}-like images")
    finite = np.asarray(table.values, float)
    finite = finite[np.isfinite(finite)]
    if finite.size:  # room above the bars for the legend
        lo, hi = float(finite.min()), float(finite.max())
        top = hi + 0.25 * (hi - lo) + 0.02
        if math.isinf(upper := get_metric(metric).upper):
            ax.set_ylim(0.0, top)
        else:
            ax.set_ylim(max(0.0, lo - 0.05), min(upper, top))
    ax.legend(fontsize=8, loc="upper center", ncols=len(cases), frameon=False)
    ax.set_title(
        f"Synthetic → experimental-like ({reduce} over {table.sizes['seed']} seeds; dots: seeds)",
        fontsize=10,
    )
    return fig
