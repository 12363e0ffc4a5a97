"""Chapter 7 (imaging conditions) and chapter 9 (dose): transfer heatmaps and the mixture baseline.

``transfer_heatmaps`` draws, for a transfer study, the loss on each target domain of the model
pretrained on each domain, after pretraining and after transfer, side by side on one colour
scale. ``baseline_comparison`` compares sequential transfer (pretrain on domain a, transfer to b)
with one model trained on a mixture of a and b; ``mixture_curves`` puts the same models on the
study's axes (the share of b in the training set, the models trained on a or b alone at its ends).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from ..database import on_domain
from ..metrics import get_metric
from ..series import match_index
from ..studies import parse_mix
from ._common import (
    axis_title,
    best_of,
    check_reduce,
    clean_select,
    domain_label,
    domain_unit,
    draw_heatmap,
    metric_title,
    new_figure,
    reduce_da,
    selected,
    value_range,
    var_of,
    worse,
    worst_of,
)

MAX_BASELINE_PAIRS = 4  # rows of the baseline figure; more pairs would be unreadable


def heatmap_data(
    ds: xr.Dataset,
    *,
    select: Mapping[str, Any] | None = None,
    reduce: str = "median",
    metric: str = "loss",
) -> tuple[xr.DataArray, xr.DataArray]:
    """(after pretraining, after transfer) ``metric`` maps, dims (pretrain_domain, target domain).

    After pretraining: the pretrained model of each row evaluated on each selected target domain
    (the ``eval_domain`` axis, so the diagonal — the model's own domain — is filled). After
    transfer: the transferred model evaluated on its own target domain (the diagonal is
    excluded from the study and stays empty).
    """
    check_reduce(reduce)
    var = var_of(metric)
    sel = clean_select(ds, select)
    targets = sel.pop("target_domain", None)
    pre_sel = {**sel, "stage": ["pretrain"]}
    if targets is not None:
        pre_sel["eval_domain"] = targets
    before = reduce_da(
        selected(ds, var, pre_sel), reduce, keep=["pretrain_domain", "eval_domain"]
    ).rename(eval_domain="target_domain")
    post_sel = {**sel, "stage": ["transfer"]}
    if targets is not None:
        post_sel["target_domain"] = targets
    after = on_domain(selected(ds, var, post_sel), "target_domain")
    after = reduce_da(after, reduce, keep=["pretrain_domain", "target_domain"])
    return before, after


def transfer_heatmaps(
    ds: xr.Dataset,
    *,
    select: Mapping[str, Any] | None = None,
    reduce: str = "median",
    vlim: tuple[float, float] | None = None,
    metric: str = "loss",
    label_fn: Callable[[Any], str] = domain_label,
    row_title: str | None = None,
    col_title: str | None = None,
) -> Figure:
    """Pretraining × target-domain heatmaps of the target-domain ``metric``, before/after transfer.

    ``vlim`` fixes the colour scale (default: the finite range of both panels, shared).
    ``label_fn`` turns a domain value into its tick label; ``row_title``/``col_title`` replace
    the axis titles derived from the database's series.
    """
    before, after = heatmap_data(ds, select=select, reduce=reduce, metric=metric)
    if before.size == 0 or after.size == 0:
        raise ValueError("the selection leaves no pretraining or target domain")
    lim = tuple(vlim) if vlim is not None else value_range(before, after)
    n_rows, n_cols = after.shape
    width = min(16.0, max(8.0, 3.0 + 1.1 * n_cols))
    fig = new_figure(width, max(3.4, 1.6 + 0.45 * n_rows))
    axes = fig.subplots(1, 2, sharey=True)
    row_title = row_title or axis_title(ds, "pretraining")
    col_title = col_title or axis_title(ds, "target")
    for ax, da, title in zip(
        axes, (before, after), ("after pretraining", "after transfer"), strict=True
    ):
        im = draw_heatmap(
            ax,
            da,
            vlim=lim,
            row_title=row_title,
            col_title=col_title,
            title=title,
            label_fn=label_fn,
            metric=metric,
        )
    axes[1].set_ylabel("")
    cbar = fig.colorbar(im, ax=list(axes), shrink=0.9)
    cbar.set_label(f"{metric_title(metric)} on the target domain")
    fig.suptitle(
        f"Target-domain {metric_title(metric)} ({reduce} over the filtered models of each cell)"
    )
    return fig


def imaging_conditions(ds: xr.Dataset, **kwargs) -> Figure:
    """Chapter 7: the defocus study's heatmaps (:func:`transfer_heatmaps`)."""
    return transfer_heatmaps(ds, **kwargs)


def dose_heatmaps(ds: xr.Dataset, **kwargs) -> Figure:
    """Chapter 9: the dose study's heatmaps (:func:`transfer_heatmaps`)."""
    return transfer_heatmaps(ds, **kwargs)


# --- mixture baseline ---------------------------------------------------------------------------
def baseline_pairs(ds: xr.Dataset, select: Mapping[str, list]) -> list[tuple[Any, Any]]:
    """Ordered (domain_a, domain_b) pairs of the selection, a ≠ b, in coordinate order."""
    a_vals = select.get("domain_a", ds["domain_a"].values.tolist())
    b_vals = select.get("domain_b", ds["domain_b"].values.tolist())
    return [(a, b) for a in a_vals for b in b_vals if a != b]


def _pairs_to_draw(
    ds: xr.Dataset, select: Mapping[str, Any] | None, reduce: str
) -> tuple[dict[str, list], list[tuple[Any, Any]], str]:
    """The checked selection of a baseline figure, its (a, b) pairs (at most
    :data:`MAX_BASELINE_PAIRS`) and the unit of the series' domains."""
    check_reduce(reduce)
    sel = clean_select(ds, select)
    pairs = baseline_pairs(ds, sel)[:MAX_BASELINE_PAIRS]
    if not pairs:
        raise ValueError("the selection holds no pair of different domains a and b")
    return sel, pairs, domain_unit(str(ds.attrs.get("series", "")))


def baseline_data(
    ds: xr.Dataset,
    transfer: xr.Dataset | None,
    pair: tuple[Any, Any],
    *,
    select: Mapping[str, list],
    reduce: str,
    metric: str = "loss",
    transfer_select: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """``metric`` of one (a, b) pair by role: ``{"a": {...}, "b": {...}}``.

    Role ``"a"`` is the pair's first domain (the pretraining domain of the transfer run), role
    ``"b"`` its second (the transfer target), whatever their numeric order. Each role holds
    ``mixture`` (DataArray over ``mix``), ``transfer`` and ``pretrained`` (floats; NaN when the
    transfer database lacks the pair).
    """
    a, b = pair
    var = var_of(metric)
    sel = {**select, "domain_a": [a], "domain_b": [b]}
    mixture = selected(ds, var, sel)
    out: dict[str, dict[str, Any]] = {}
    for role, axis in (("a", "domain_a"), ("b", "domain_b")):
        out[role] = {"domain": (a, b)[role == "b"]}
        out[role]["mixture"] = reduce_da(on_domain(mixture, axis), reduce, keep=["mix"])
        out[role]["transfer"] = out[role]["pretrained"] = float("nan")
    if transfer is None:
        return out
    tsel = clean_select(transfer, transfer_select)
    if "seed" in select and "seed" in transfer.dims:
        tsel["seed"] = [s for s in select["seed"] if s in transfer["seed"].values.tolist()]
    pre_vals = transfer["pretrain_domain"].values.tolist()
    tgt_vals = transfer["target_domain"].values.tolist()
    if a not in pre_vals or b not in tgt_vals or not tsel.get("seed", [0]):
        return out
    tsel.update(pretrain_domain=[a], target_domain=[b])
    for stage, key in (("transfer", "transfer"), ("pretrain", "pretrained")):
        da = selected(transfer, var, {**tsel, "stage": [stage]})
        for role, axis in (("a", "pretrain_domain"), ("b", "target_domain")):
            out[role][key] = float(reduce_da(on_domain(da, axis), reduce, keep=[]).values)
    return out


def baseline_comparison(
    ds: xr.Dataset,
    *,
    transfer: xr.Dataset | None = None,
    select: Mapping[str, Any] | None = None,
    reduce: str = "median",
    metric: str = "loss",
    transfer_select: Mapping[str, Any] | None = None,
) -> Figure:
    """Mixture baseline vs sequential transfer for the selected (a, b) pairs.

    One row per pair (at most :data:`MAX_BASELINE_PAIRS`), two panels per row: the loss on
    domain a (left) and on domain b (right). Panels are placed by role, never by the sorted
    defocus values, so they cannot swap when a > b (a fault of the published notebooks).
    ``ds`` is the baseline database; ``transfer`` the defocus study, reduced over every model
    with pretraining domain a and target b (and ``transfer_select``).
    """
    sel, pairs, unit = _pairs_to_draw(ds, select, reduce)
    fig = new_figure(9.0, 0.6 + 2.4 * len(pairs))
    axes = np.atleast_2d(fig.subplots(len(pairs), 2, sharex=True, squeeze=False))
    mixes = sel.get("mix", ds["mix"].values.tolist())
    for row, pair in enumerate(pairs):
        data = baseline_data(
            ds,
            transfer,
            pair,
            select=sel,
            reduce=reduce,
            metric=metric,
            transfer_select=transfer_select,
        )
        for col, role in enumerate(("a", "b")):
            ax = axes[row, col]
            d = data[role]
            x = np.arange(len(mixes))
            y = d["mixture"].sel(mix=mixes).values
            ax.plot(x, y, "o-", color="C0", label="mixture")
            if np.isfinite(d["transfer"]):
                ax.axhline(d["transfer"], color="C1", ls="--", label="transfer a → b")
            if np.isfinite(d["pretrained"]):
                ax.axhline(d["pretrained"], color="C2", ls=":", label="pretrained on a")
            ax.set_xticks(x, [str(m) for m in mixes])
            dom = f"{domain_label(d['domain'])} {unit}".strip()
            ax.set_title(
                f"a={domain_label(pair[0])}, b={domain_label(pair[1])}: "
                f"{get_metric(metric).short} on {role} ({dom})",
                fontsize=9,
            )
            ax.set_ylabel(metric_title(metric))
            if row == len(pairs) - 1:
                ax.set_xlabel("mixture: images of a : b")
    axes[0, 1].legend(fontsize=8, loc="best")
    fig.suptitle(f"Mixture baseline vs transfer; {reduce} over the filtered models")
    return fig


def mixture_curve(
    ds: xr.Dataset,
    transfer: xr.Dataset,
    pair: tuple[Any, Any],
    *,
    select: Mapping[str, list],
    reduce: str,
    metric: str = "loss",
) -> dict[str, Any]:
    """One (a, b) pair on the study's axes: the ``metric`` on b (``"b"``) and on a (``"a"``)
    against the share of b among the images a model trained on, each ``{share: value}``.

    The mixtures of the baseline database give the shares in between (``n_b / (n_a + n_b)``);
    the ends are the defocus study's models trained from scratch on a alone (share 0) and on b
    alone (share 1), which saw as many images (the profile's pretraining size). ``transfer``:
    ``{share: value}`` of the transfers a → b of each size N, placed at the share of the mixture
    holding N images of b out of as many in all — equal target images, as finding F6 compares.
    NaN where a database lacks the model."""
    a, b = pair
    var = var_of(metric)
    mixture = selected(ds, var, {**select, "domain_a": [a], "domain_b": [b]})
    out: dict[str, Any] = {"a": {}, "b": {}, "transfer": {"a": {}, "b": {}}}
    mixes = select.get("mix", ds["mix"].values.tolist())
    total = None
    for mix in mixes:
        n_a, n_b = parse_mix(mix)
        total = n_a + n_b
        cell = mixture.sel(mix=[mix])
        for role, axis in (("a", "domain_a"), ("b", "domain_b")):
            value = reduce_da(on_domain(cell, axis), reduce, keep=[])
            out[role][n_b / total] = float(value.values)
    seeds = {"seed": select["seed"]} if "seed" in select else {}

    def on_each_role(sel: dict) -> dict[str, float]:  # the transfer study's models of ``sel``
        da = selected(transfer, var, {**seeds, **sel})
        ev = da["eval_domain"].values
        return {role: float(reduce_da(da.isel(eval_domain=[match_index(ev, dom)]), reduce,
                                      keep=[]).values)
                for role, dom in (("a", a), ("b", b))}  # fmt: skip

    pre = transfer["pretrain_domain"].values.tolist()
    for share, home in ((0.0, a), (1.0, b)):
        if home in pre:
            for role, v in on_each_role({"stage": ["pretrain"], "pretrain_domain": [home]}).items():
                out[role][share] = v
    if a in pre and b in transfer["target_domain"].values.tolist() and total:
        tsel = {"stage": ["transfer"], "pretrain_domain": [a], "target_domain": [b]}
        for n in transfer["n_transfer"].values.tolist():
            for role, v in on_each_role({**tsel, "n_transfer": [n]}).items():
                out["transfer"][role][int(n) / total] = v
    return out


def mixture_curves(
    ds: xr.Dataset,
    *,
    transfer: xr.Dataset,
    select: Mapping[str, Any] | None = None,
    reduce: str = "median",
    metric: str = "loss",
) -> Figure:
    """The study's mixture-versus-transfer curve, one panel per selected (a, b) pair: the
    metric on b (solid) and on a (dotted) against the share of b in the training set — trained
    on a alone, on mixtures, on b alone — with the transfers a → b (crosses) at the share that
    holds as many images of b (:func:`mixture_curve`)."""
    sel, pairs, unit = _pairs_to_draw(ds, select, reduce)
    fig = new_figure(4.3 * len(pairs) + 0.4, 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(pairs), squeeze=False)[0])
    for ax, pair in zip(axes, pairs, strict=True):
        c = mixture_curve(ds, transfer, pair, select=sel, reduce=reduce, metric=metric)
        for role, style, colour in (("b", "o-", "C0"), ("a", "s:", "C2")):
            shares = sorted(c[role])
            name = f"{domain_label(pair[1] if role == 'b' else pair[0])} {unit}".strip()
            ax.plot(shares, [c[role][x] for x in shares], style, color=colour,
                    label=f"from scratch, on {role} ({name})")  # fmt: skip
            t = c["transfer"][role]
            if t:
                ax.plot(sorted(t), [t[x] for x in sorted(t)], "x", color=colour, ms=9, mew=2,
                        label=f"transfer a → b, on {role}")  # fmt: skip
        ax.set_xlabel("share of b among the training images")
        ax.set_ylabel(metric_title(metric))
        ax.set_title(f"a = {domain_label(pair[0])} {unit}, b = {domain_label(pair[1])} {unit}",
                     fontsize=9)  # fmt: skip
        ax.set_xlim(-0.04, 1.04)
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle(f"Mixtures against transfer ({reduce} over the filtered models)", fontsize=10)
    return fig


# --- numbers quoted in the prose ----------------------------------------------------------------
def study_counts(ds: xr.Dataset) -> dict[str, int]:
    """Cells of a database by status (``ok``, ``failed``, ``missing``, ``excluded``), and ``runs``:
    distinct finished runs (mirrored baseline cells share one run)."""
    status = ds["status"].values.astype(str).ravel()
    counts = {s: int((status == s).sum()) for s in ("ok", "failed", "missing", "excluded")}
    hashes = ds["config_hash"].values.astype(str).ravel()
    counts["runs"] = len(set(hashes[status == "ok"].tolist()))
    return counts


def heatmap_numbers(
    ds: xr.Dataset,
    *,
    select: Mapping[str, Any] | None = None,
    reduce: str = "median",
    metric: str = "loss",
) -> dict[str, Any]:
    """Numbers the chapters quote about a transfer study's heatmaps (see :func:`heatmap_data`).

    ``before``/``after``: mean over the off-diagonal cells of the reduced maps; ``improved``:
    fraction of (pretraining, target) pairs that transfer improved; ``best_pretrain``: the
    pretraining domain with the best mean value after transfer; ``worst_pair``: the
    (pretraining, target) pair with the worst value after pretraining.
    """
    before, after = heatmap_data(ds, select=select, reduce=reduce, metric=metric)
    before_t = before.sel(target_domain=after["target_domain"])
    both = np.isfinite(after.values) & np.isfinite(before_t.values)
    if not both.any():
        raise ValueError(
            "no (pretraining, target) pair has finite losses before and after transfer"
        )
    row_mean = after.mean("target_domain", skipna=True)
    off = before_t.where(xr.DataArray(both, dims=after.dims, coords=after.coords))
    worst = np.unravel_index(worst_of(off.values, metric), off.shape)
    return {
        **study_counts(ds),
        "before": float(np.nanmean(before_t.values[both])),
        "after": float(np.nanmean(after.values[both])),
        "improved": float(np.mean(worse(after.values[both], before_t.values[both], metric) < 0)),
        "best_pretrain": after["pretrain_domain"].values[best_of(row_mean.values, metric)].item(),
        "worst_pair": (
            after["pretrain_domain"].values[worst[0]].item(),
            after["target_domain"].values[worst[1]].item(),
        ),
        "worst_loss": float(off.values[worst]),
    }


def baseline_numbers(
    ds: xr.Dataset, transfer: xr.Dataset, *, reduce: str = "median", metric: str = "loss"
) -> dict[str, Any]:
    """How often the mixture beats transfer on the target domain b, over all selectable pairs.

    For every (a, b) pair found in both databases and every mixture, the mixture's ``metric`` on
    b is compared with the transfer model's on b (both reduced with ``reduce``); ``median_gap``
    is the median of mixture minus transfer, oriented so that > 0 means the mixture is worse.
    """
    wins = total = 0
    gaps = []
    for pair in baseline_pairs(ds, {}):
        d = baseline_data(ds, transfer, pair, select={}, reduce=reduce, metric=metric)["b"]
        mix = d["mixture"].values
        ok = np.isfinite(mix) & np.isfinite(d["transfer"])
        gap = worse(mix[ok], d["transfer"], metric)
        wins += int((gap < 0).sum())
        total += int(ok.sum())
        gaps.extend(gap.tolist())
    return {
        **study_counts(ds),
        "comparisons": total,
        "mixture_wins": wins,
        "median_gap": float(np.median(gaps)) if gaps else float("nan"),
    }
