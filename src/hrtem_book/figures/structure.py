"""The structure figures of chapter 9 (noise and structure): lattice heatmaps at one particle
size, size histograms.

The dose heatmaps of the chapter are :func:`hrtem_book.figures.imaging_conditions.dose_heatmaps`.
Structure domains are named ``"<lattice>-<size>"`` (``size`` is ``small`` or ``large``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..series import split_structure_domain
from ._common import check_reduce, clean_select, metric_title, new_figure
from .generalization import per_configuration
from .hyperparameters import target_losses
from .imaging_conditions import transfer_heatmaps


def domains_of_size(ds: xr.Dataset, axis: str, size: str) -> list[str]:
    return [d for d in ds[axis].values.tolist() if split_structure_domain(d)[1] == size]


def lattice_heatmaps(
    ds: xr.Dataset,
    *,
    size: str = "small",
    select: Mapping[str, Any] | None = None,
    reduce: str = "median",
    vlim: tuple[float, float] | None = None,
    metric: str = "loss",
) -> Figure:
    """Pretraining × target lattice heatmaps for particles of one ``size``, before/after transfer.

    A filter on ``pretrain_domain`` or ``target_domain`` is intersected with the size.
    """
    sel = clean_select(ds, select)
    for axis in ("pretrain_domain", "target_domain"):
        of_size = domains_of_size(ds, axis, size)
        if not of_size:
            sizes = sorted({split_structure_domain(d)[1] for d in ds[axis].values.tolist()})
            raise ValueError(f"size={size!r} has no {axis} in this database; allowed: {sizes}")
        sel[axis] = [d for d in sel.get(axis, of_size) if d in of_size]
    return transfer_heatmaps(
        ds,
        select=sel,
        reduce=reduce,
        vlim=vlim,
        metric=metric,
        label_fn=lambda name: split_structure_domain(name)[0],
        row_title=f"pretraining lattice ({size} particles)",
        col_title=f"target lattice ({size} particles)",
    )


SIZE_PAIRS = ("small → small", "small → large", "large → small", "large → large")


def size_pair_losses(
    ds: xr.Dataset,
    *,
    select: Mapping[str, Any] | None = None,
    reduce: str = "median",
    metric: str = "loss",
) -> dict[str, dict[str, np.ndarray]]:
    """Per-configuration target-domain ``metric`` by (pretraining size → target size), before
    and after transfer: ``{"before": {pair: values}, "after": {pair: values}}``."""
    check_reduce(reduce)
    sel = clean_select(ds, select)
    after = target_losses(ds, "transfer", sel, metric)
    before = target_losses(ds, "pretrain", sel, metric).where(np.isfinite(after))
    out: dict[str, dict[str, np.ndarray]] = {"before": {}, "after": {}}
    pre_size = [split_structure_domain(d)[1] for d in after["pretrain_domain"].values.tolist()]
    tgt_size = [split_structure_domain(d)[1] for d in after["target_domain"].values.tolist()]
    for pair in SIZE_PAIRS:
        a, b = pair.split(" → ")
        pi = [i for i, s in enumerate(pre_size) if s == a]
        ti = [i for i, s in enumerate(tgt_size) if s == b]
        for key, da in (("before", before), ("after", after)):
            part = da.isel(pretrain_domain=pi, target_domain=ti)
            out[key][pair] = per_configuration(part, reduce)
    return out


def size_histograms(
    ds: xr.Dataset,
    *,
    select: Mapping[str, Any] | None = None,
    reduce: str = "median",
    metric: str = "loss",
) -> Figure:
    """Histograms of the target-domain ``metric`` by particle-size pairing, before and after
    transfer."""
    data = size_pair_losses(ds, select=select, reduce=reduce, metric=metric)
    values = np.concatenate([v for d in data.values() for v in d.values()])
    if values.size == 0:
        raise ValueError("the selection leaves no finished transfer run")
    bins = np.linspace(values.min(), values.max() + 1e-9, 25)
    fig = new_figure(10.0, 3.6)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    for ax, key, title in zip(
        axes, ("before", "after"), ("(a) before transfer", "(b) after transfer"), strict=True
    ):
        for i, pair in enumerate(SIZE_PAIRS):
            v = data[key][pair]
            if v.size:
                ax.hist(v, bins=bins, histtype="step", lw=1.6, color=f"C{i}", label=pair)
        ax.set_title(title)
        ax.set_xlabel(f"{metric_title(metric)} on the target structure")
    axes[0].set_ylabel("configurations")
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].legend(title="pretraining → target size", fontsize=8)
    fig.suptitle(f"Structure study by particle size; {reduce} over seeds of each configuration")
    return fig


def size_numbers(
    ds: xr.Dataset,
    *,
    select: Mapping[str, Any] | None = None,
    reduce: str = "median",
    metric: str = "loss",
) -> dict[str, dict[str, float]]:
    """Median target value per size pairing, before and after transfer (chapter 9's prose)."""
    data = size_pair_losses(ds, select=select, reduce=reduce, metric=metric)
    return {
        key: {p: float(np.median(v)) if v.size else float("nan") for p, v in d.items()}
        for key, d in data.items()
    }
