"""Generalization measures (chapter 4) and the out-of-distribution figures of chapter 8.

For a model :math:`m` last trained on domain :math:`t(m)` (its pretraining domain after stage 1,
its target domain after transfer) and its test loss :math:`L_d(m)` on each evaluation
domain :math:`d \\in D`:

- in-distribution loss (eq. ``eq-id-loss``):  :math:`L_\\mathrm{ID}(m) = L_{t(m)}(m)`;
- in-distribution gap (eq. ``eq-id-gap``): :math:`G_\\mathrm{ID}(m) = L_{t}(m) - L_{t}(m^*_t)`,
  the excess target-domain loss of a transferred model over the model pretrained on the target
  domain itself (same pretraining learning rate and seed): what sequential training costs on the
  domain the model ends on;
- OOD gap (eq. ``eq-ood-gap``): :math:`G_\\mathrm{OOD}(m) = \\frac{1}{|D|-1} \\sum_{d \\ne t}
  L_d(m) - L_t(m)`, the mean excess loss off the training domain;
- loss spread (eq. ``eq-spread``): :math:`S(m)`, the standard deviation of :math:`L_d(m)` over
  :math:`d \\in D`, and its shift through transfer :math:`\\Delta S = S(m_\\mathrm{transfer}) -
  S(m_\\mathrm{pretrain})`.

The measures are written for the loss; for Dice and IoU (``metric``) every difference is
oriented so that a positive gap still means "worse" (:func:`~._common.worse`). All functions are
NaN-aware: failed, missing and excluded runs give NaN and are skipped by the reductions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..database import on_domain
from ..series import match_mask
from ._common import (
    axis_title,
    check_reduce,
    clean_select,
    domain_label,
    metric_title,
    new_figure,
    reduce_da,
    selected,
    var_of,
    worse,
)

MAX_BAR_PAIRS = 6  # panels of the per-domain bar figure
TRAINED_ON = {"pretrain": "pretrain_domain", "transfer": "target_domain"}


# --- measures ---------------------------------------------------------------------------------
def stage_losses(
    ds: xr.Dataset, stage: str, select: Mapping[str, Any] | None = None, metric: str = "loss"
) -> xr.DataArray:
    """``metric`` of every selected model after ``stage``: grid dims + ``eval_domain``."""
    if stage not in TRAINED_ON:
        raise ValueError(f"stage={stage!r}; allowed: {', '.join(TRAINED_ON)}")
    da = selected(ds, var_of(metric), {**clean_select(ds, select), "stage": [stage]})
    return da.squeeze("stage", drop=True)


def id_loss(losses: xr.DataArray, trained_on: str) -> xr.DataArray:
    """Eq. (eq-id-loss): each model's loss on the domain it was last trained on."""
    return on_domain(losses, trained_on)


def _own_domain_mask(losses: xr.DataArray, trained_on: str) -> xr.DataArray:
    """True where the evaluation domain is the domain the model was trained on."""
    ev = losses["eval_domain"].values
    own = losses[trained_on].values
    mask = np.stack([match_mask(ev, v) for v in own], axis=-1)  # [eval_domain, trained_on]
    return xr.DataArray(mask, dims=("eval_domain", trained_on))


def ood_gap(losses: xr.DataArray, trained_on: str, metric: str = "loss") -> xr.DataArray:
    """Eq. (eq-ood-gap): mean loss on the other domains minus the loss on the trained domain
    (for Dice: the trained domain's minus the others', so positive is worse off-domain)."""
    others = losses.where(~_own_domain_mask(losses, trained_on))
    with np.errstate(all="ignore"):
        off = others.mean("eval_domain", skipna=True)
    return worse(off, id_loss(losses, trained_on), metric)


def loss_spread(losses: xr.DataArray) -> xr.DataArray:
    """Eq. (eq-spread): standard deviation of the loss over the evaluation domains (ddof 0).

    A model with a NaN loss on any domain gets NaN: a spread over a subset would not compare.
    """
    return losses.std("eval_domain", skipna=False)


def in_distribution_gap(
    ds: xr.Dataset, select: Mapping[str, Any] | None = None, metric: str = "loss"
) -> xr.DataArray:
    """Eq. (eq-id-gap) for every selected transfer cell (NaN where no model was pretrained on t).

    The reference :math:`m^*_t` is the pretraining of domain ``t`` with the cell's pretraining
    learning rate (when the study varies it) and seed.
    """
    sel = clean_select(ds, select)
    after = id_loss(stage_losses(ds, "transfer", sel, metric), "target_domain")
    # the reference is every pretraining of the database, whatever the filters on pretrain_domain
    ref_sel = {k: v for k, v in sel.items() if k in ("pretrain_lr", "seed")}
    pre = id_loss(stage_losses(ds, "pretrain", ref_sel, metric), "pretrain_domain")
    ref_keep = [d for d in ("pretrain_domain", "pretrain_lr", "seed") if d in pre.dims]
    # pretraining values repeat along the transfer axes: any NaN-skipping reduction recovers them
    ref = reduce_da(pre, "median", keep=ref_keep).rename(pretrain_domain="target_domain")
    ref = ref.reindex(target_domain=after["target_domain"].values)
    return worse(after, ref, metric)


# --- reductions over replicates ---------------------------------------------------------------
def per_configuration(da: xr.DataArray, reduce: str) -> np.ndarray:
    """Reduce over seeds (replicates), then the finite values of every configuration, flat."""
    keep = [d for d in da.dims if d != "seed"]
    out = reduce_da(da, reduce, keep=keep) if "seed" in da.dims else da
    values = np.asarray(out.values, dtype=float).ravel()
    return values[np.isfinite(values)]


def ood_measures(
    ds: xr.Dataset,
    *,
    select: Mapping[str, Any] | None = None,
    reduce: str = "median",
    metric: str = "loss",
) -> dict[str, np.ndarray]:
    """Per configuration (reduced over seeds): spread before/after, its shift, OOD and ID gaps."""
    check_reduce(reduce)
    before = stage_losses(ds, "pretrain", select, metric)
    after = stage_losses(ds, "transfer", select, metric)
    # the pretraining values of the excluded cells (target = pretraining) are NaN in the database;
    # masking "before" with "after" keeps the two distributions over the same cells
    valid = np.isfinite(after).all("eval_domain")
    s_before = loss_spread(before).where(valid)
    s_after = loss_spread(after)
    return {
        "spread_before": per_configuration(s_before, reduce),
        "spread_after": per_configuration(s_after, reduce),
        "spread_shift": per_configuration(s_after - s_before, reduce),
        "ood_before": per_configuration(
            ood_gap(before, "pretrain_domain", metric).where(valid), reduce
        ),
        "ood_after": per_configuration(ood_gap(after, "target_domain", metric), reduce),
        "id_gap": per_configuration(in_distribution_gap(ds, select, metric), reduce),
    }


# --- figures ----------------------------------------------------------------------------------
def _boxes(ax, groups: dict[str, np.ndarray], ylabel: str) -> None:
    labels = [k for k, v in groups.items() if v.size]
    if not labels:
        ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
        return
    ax.boxplot([groups[k] for k in labels], tick_labels=labels, showfliers=True)
    ax.set_ylabel(ylabel)


def ood_spread(
    ds: xr.Dataset,
    *,
    select: Mapping[str, Any] | None = None,
    reduce: str = "median",
    metric: str = "loss",
) -> Figure:
    """Spread of the loss across domains before/after transfer, its shift, and the two gaps.

    Each box holds one value per configuration (every grid cell but the seed), the seeds reduced
    with ``reduce``.
    """
    m = ood_measures(ds, select=select, reduce=reduce, metric=metric)
    title = metric_title(metric)
    fig = new_figure(11.0, 3.6)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    _boxes(
        ax1,
        {"after pretraining": m["spread_before"], "after transfer": m["spread_after"]},
        f"spread S of the {title} over domains",
    )
    ax1.set_title("(a) spread across domains")
    if m["spread_shift"].size:
        ax2.hist(m["spread_shift"], bins=min(30, max(5, m["spread_shift"].size // 3)), color="C0")
    ax2.axvline(0.0, color="k", lw=0.8)
    ax2.set_xlabel("shift ΔS = S(after) − S(before)")
    ax2.set_ylabel("configurations")
    ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_title("(b) shift of the spread")
    _boxes(
        ax3,
        {
            "OOD gap\nbefore": m["ood_before"],
            "OOD gap\nafter": m["ood_after"],
            "ID gap\nafter": m["id_gap"],
        },
        f"gap ({title} difference; > 0 is worse)",
    )
    ax3.axhline(0.0, color="k", lw=0.8)
    ax3.set_title("(c) OOD and in-distribution gaps")
    fig.suptitle(f"Generalization across domains; {reduce} over seeds of each configuration")
    return fig


def bar_pairs(ds: xr.Dataset, select: Mapping[str, list]) -> list[tuple[Any, Any]]:
    """(pretraining, target) pairs of the selection, pretraining ≠ target, in coordinate order."""
    pre = select.get("pretrain_domain", ds["pretrain_domain"].values.tolist())
    tgt = select.get("target_domain", ds["target_domain"].values.tolist())
    return [(p, t) for p in pre for t in tgt if p != t]


def pair_bars_data(
    ds: xr.Dataset,
    pair: tuple[Any, Any],
    *,
    select: Mapping[str, list],
    reduce: str,
    metric: str = "loss",
) -> tuple[xr.DataArray, xr.DataArray]:
    """(before, after) ``metric`` per evaluation domain of one pair, over the *filtered* models."""
    sel = {**select, "pretrain_domain": [pair[0]], "target_domain": [pair[1]]}
    before = reduce_da(stage_losses(ds, "pretrain", sel, metric), reduce, keep=["eval_domain"])
    after = reduce_da(stage_losses(ds, "transfer", sel, metric), reduce, keep=["eval_domain"])
    return before, after


def ood_bars(
    ds: xr.Dataset,
    *,
    select: Mapping[str, Any] | None = None,
    reduce: str = "median",
    metric: str = "loss",
) -> Figure:
    """Loss on every evaluation domain for chosen (pretraining → target) pairs, before/after.

    Every filter applies to the bars (the published bars ignored them): a pair's bars are the
    ``reduce`` over exactly the models that pass the selection.
    """
    check_reduce(reduce)
    sel = clean_select(ds, select)
    pairs = bar_pairs(ds, sel)[:MAX_BAR_PAIRS]
    if not pairs:
        raise ValueError("the selection holds no (pretraining, target) pair of different domains")
    ncol = min(3, len(pairs))
    nrow = int(np.ceil(len(pairs) / ncol))
    fig = new_figure(4.2 * ncol, 0.8 + 2.8 * nrow)
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
    for ax, pair in zip(axes, pairs, strict=False):
        before, after = pair_bars_data(ds, pair, select=sel, reduce=reduce, metric=metric)
        x = np.arange(before.sizes["eval_domain"])
        ax.bar(x - 0.2, before.values, width=0.4, color="0.6", label="after pretraining")
        ax.bar(x + 0.2, after.values, width=0.4, color="C0", label="after transfer")
        ticks = [domain_label(v) for v in before["eval_domain"].values.tolist()]
        ax.set_xticks(x, ticks, rotation=90 if len(x) > 6 else 0)
        for i, v in enumerate(before["eval_domain"].values.tolist()):
            if v == pair[0]:
                ax.get_xticklabels()[i].set_color("0.4")
            elif v == pair[1]:
                ax.get_xticklabels()[i].set_color("C0")
                ax.get_xticklabels()[i].set_fontweight("bold")
        ax.set_title(f"{domain_label(pair[0])} → {domain_label(pair[1])}", fontsize=10)
        ax.set_xlabel(axis_title(ds, "evaluation"))
        ax.set_ylabel(metric_title(metric))
    for ax in axes[len(pairs) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{metric_title(metric).capitalize()} on every domain, pretraining → target; "
        f"{reduce} over the filtered models"
    )
    return fig


def ood_numbers(
    ds: xr.Dataset,
    *,
    select: Mapping[str, Any] | None = None,
    reduce: str = "median",
    metric: str = "loss",
) -> dict[str, float]:
    """Medians of the per-configuration measures and the share of configurations whose spread
    grew through transfer (for the prose of chapter 8)."""
    m = ood_measures(ds, select=select, reduce=reduce, metric=metric)

    def med(key: str) -> float:
        return float(np.median(m[key])) if m[key].size else float("nan")

    shift = m["spread_shift"]
    return {
        "configurations": int(m["spread_after"].size),
        "spread_before": med("spread_before"),
        "spread_after": med("spread_after"),
        "spread_shift": med("spread_shift"),
        "spread_grew": float(np.mean(shift > 0)) if shift.size else float("nan"),
        "ood_before": med("ood_before"),
        "ood_after": med("ood_after"),
        "id_gap": med("id_gap"),
    }
