"""Chapter 6 (hyperparameters): target-domain loss by transfer setting, and the compute it costs.

The distributions hold one value per configuration (every grid cell but the seed): the
target-domain loss after transfer, the seeds reduced with the Reduction mode. A grey "no
transfer" box shows the same cells before transfer (the pretrained model on the target domain).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from ..database import on_domain
from ._common import (
    axis_label,
    check_reduce,
    clean_select,
    format_value,
    metric_title,
    new_figure,
    reduce_da,
    selected,
)
from .generalization import per_configuration, stage_losses


def target_losses(
    ds: xr.Dataset, stage: str, select: Mapping[str, Any] | None = None, metric: str = "loss"
) -> xr.DataArray:
    """``metric`` on each cell's target domain after ``stage`` (grid dims, unreduced)."""
    return on_domain(stage_losses(ds, stage, select, metric), "target_domain")


def _group_label(values: tuple) -> str:
    return " / ".join(format_value(v) for v in values)


def grouped_losses(
    ds: xr.Dataset,
    by: Sequence[str],
    *,
    select: Mapping[str, Any] | None = None,
    reduce: str = "median",
    metric: str = "loss",
) -> dict[str, np.ndarray]:
    """``{group label: per-configuration target values after transfer}`` grouped by ``by``.

    Groups follow the coordinate order of the ``by`` axes; a group the filters remove is absent.
    The first entry, ``"no transfer"``, holds the same cells before transfer.
    """
    check_reduce(reduce)
    by = list(by)
    for axis in by:
        if axis not in ds.dims:
            raise ValueError(f"cannot group by {axis!r}: not an axis of this database")
    sel = clean_select(ds, select)
    after = target_losses(ds, "transfer", sel, metric)
    before = target_losses(ds, "pretrain", sel, metric)
    groups = {"no transfer": per_configuration(before.where(np.isfinite(after)), reduce)}
    for values in np.ndindex(*(after.sizes[a] for a in by)):
        part = after.isel(dict(zip(by, values, strict=True)))
        labels = tuple(after[a].values[i].item() for a, i in zip(by, values, strict=True))
        groups[_group_label(labels)] = per_configuration(part, reduce)
    return groups


def loss_distributions(
    ds: xr.Dataset,
    *,
    by: Sequence[str],
    select: Mapping[str, Any] | None = None,
    reduce: str = "median",
    metric: str = "loss",
) -> Figure:
    """Box plots, every configuration a dot, of the target-domain ``metric`` grouped by ``by``
    (seaborn: a box per group, the configurations as a strip with fixed jitter)."""
    import pandas as pd
    import seaborn as sns

    groups = grouped_losses(ds, by, select=select, reduce=reduce, metric=metric)
    labels = [k for k, v in groups.items() if v.size]
    if len(labels) < 2:
        raise ValueError("the selection leaves no finished transfer run")
    fig = new_figure(1.6 + 1.25 * len(labels), 3.8)
    ax = fig.subplots()
    frame = pd.DataFrame(
        [(label, float(v)) for label in labels for v in groups[label]], columns=["group", "value"]
    )
    palette = {label: "0.85" if label == "no transfer" else "C0" for label in labels}
    sns.boxplot(
        data=frame, x="group", y="value", order=labels, hue="group", hue_order=labels,
        palette=palette, showfliers=False, boxprops={"alpha": 0.6}, legend=False, ax=ax,
    )  # fmt: skip
    with fixed_jitter():
        sns.stripplot(
            data=frame, x="group", y="value", order=labels, color="k", size=2.5, alpha=0.5,
            jitter=0.15, ax=ax,
        )  # fmt: skip
    ax.set_xlabel(" / ".join(axis_label(ds, a) for a in by))
    ax.set_ylabel(f"{metric_title(metric)} on the target domain")
    if len(labels) > 6:
        ax.tick_params(axis="x", labelrotation=45)
    ax.set_title(
        f"Target-domain {metric_title(metric)} after transfer; {reduce} over seeds of each "
        "configuration"
    )
    return fig


@contextlib.contextmanager
def fixed_jitter(seed: int = 0):
    """seaborn's strip jitter draws from NumPy's global generator: seed it for the duration,
    then restore it, so that a figure is the same image every time it is drawn."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def loss_by_transfer_size(ds: xr.Dataset, **kwargs) -> Figure:
    """Target-domain loss by transfer dataset size (``n_transfer``)."""
    return loss_distributions(ds, by=["n_transfer"], **kwargs)


def loss_by_freeze(ds: xr.Dataset, **kwargs) -> Figure:
    """Target-domain loss by frozen part (none, encoder, decoder)."""
    return loss_distributions(ds, by=["freeze"], **kwargs)


def loss_by_lr_pair(ds: xr.Dataset, **kwargs) -> Figure:
    """Target-domain loss by (pretraining LR, transfer LR) pair."""
    return loss_distributions(ds, by=["pretrain_lr", "transfer_lr"], **kwargs)


def cost_by_freeze(
    ds: xr.Dataset, *, select: Mapping[str, Any] | None = None, reduce: str = "median"
) -> dict[str, dict[str, float]]:
    """Per freeze option: trainable parameters and measured transfer time (``reduce`` over the
    filtered runs), in seconds per stage and per training image per epoch.

    The per-image time divides the stage's training time by ``n_transfer`` (the axis, or the
    study's fixed setting in ``ds.attrs``) and by the epochs it trained (``epochs_run``).
    """
    check_reduce(reduce)
    sel = {**clean_select(ds, select), "stage": ["transfer"]}
    out: dict[str, dict[str, float]] = {}
    for option in sel.get("freeze", ds["freeze"].values.tolist()):
        s = {**sel, "freeze": [option]}
        time = selected(ds, "train_time_s", s)
        params = reduce_da(selected(ds, "trainable_params", s), "max", keep=[])
        entry = {
            "trainable_params": float(params.values),
            "time_s": float(reduce_da(time, reduce, keep=[]).values),
        }
        n_images = time["n_transfer"] if "n_transfer" in time.dims else ds.attrs.get("n_transfer")
        if n_images is not None:
            per_image = time / (n_images * selected(ds, "epochs_run", s))
            entry["time_per_image_s"] = float(reduce_da(per_image, reduce, keep=[]).values)
        out[str(option)] = entry
    return out


def compute_cost(
    ds: xr.Dataset, *, select: Mapping[str, Any] | None = None, reduce: str = "median"
) -> Figure:
    """Trainable parameters and measured wall time of the transfer stage per freeze option."""
    cost = cost_by_freeze(ds, select=select, reduce=reduce)
    options = list(cost)
    fig = new_figure(9.0, 3.4)
    ax1, ax2 = fig.subplots(1, 2)
    x = np.arange(len(options))
    params = np.array([cost[o]["trainable_params"] for o in options])
    ax1.bar(x, params / 1e6, color="C0")
    ax1.set_xticks(x, options)
    ax1.set_xlabel("frozen part")
    ax1.set_ylabel("trainable parameters [millions]")
    ax1.set_title("(a) parameters updated by transfer")
    key = "time_per_image_s" if all("time_per_image_s" in cost[o] for o in options) else "time_s"
    times = np.array([cost[o][key] for o in options])
    ax2.bar(x, times * (1e3 if key == "time_per_image_s" else 1.0), color="C1")
    ax2.set_xticks(x, options)
    ax2.set_xlabel("frozen part")
    ax2.set_ylabel(
        "transfer time per image and epoch [ms]"
        if key == "time_per_image_s"
        else "transfer stage wall time [s]"
    )
    ax2.set_title(f"(b) measured time, {reduce} over the filtered runs")
    return fig
