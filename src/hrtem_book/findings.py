"""The study's findings as statistics over the results databases, each with a verdict.

F1-F8 are the transfer-learning study's (Rangel DaCosta et al.), G1-G6 its companion's (Sytwu et
al.: how far a network trained without transfer generalizes, G1-G3, and how synthetic training
carries to experimental-like images, G4-G6).

:func:`evaluate` turns a set of databases (``{"defocus": ds, "dose": ds, ...}``) into one
:class:`Finding` per claim of the study: the claim (in our words), the rule that decides it, the
numbers behind it and the verdict — ``holds``, ``does not hold`` or ``not measurable`` (the grid
lacks what the statistic needs). The rules were fixed before any database was built and never
depend on the outcome; a finding that fails is reported as failing.

Every statistic uses the model each stage kept (``final_<metric>``), on the error scale of the
metric: the loss itself, or 1 − Dice / 1 − IoU, so that lower is better throughout and the
same rule serves every metric. Groups of models are summarised by their median over every
axis not named (seeds, learning rates, freezing options, ...), as the study's figures do.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from .metrics import HIGHER_IS_BETTER, METRIC_NAMES, METRICS
from .results import heldout_table, metric_var, on_domain
from .series import match_index

HOLDS, FAILS, UNMEASURABLE = "holds", "does not hold", "not measurable"
# the series of the companion's finding G3 (imaging conditions and support)
CONDITION_SERIES = ("dose", "defocus", "substrate")
VERDICTS = (HOLDS, FAILS, UNMEASURABLE)
IN_FOCUS_NM = 0.0  # the in-focus defocus domain


@dataclass(frozen=True)
class Finding:
    """One claim of the study, tested on this build's databases."""

    key: str  # "F1", ...
    title: str  # a few words
    claim: str  # the study's statement, in our words
    rule: str  # what is computed and when it holds
    verdict: str  # one of VERDICTS
    summary: str  # one sentence with the numbers
    numbers: dict[str, Any] = field(default_factory=dict)
    metric: str = "loss"

    @property
    def holds(self) -> bool:
        return self.verdict == HOLDS


# --- helpers ----------------------------------------------------------------------------------
def _error(da: xr.DataArray, metric: str) -> xr.DataArray:
    """The metric on a lower-is-better scale: the loss, or 1 − Dice / 1 − IoU."""
    return 1.0 - da if HIGHER_IS_BETTER[metric] else da


def _value(error: float, metric: str) -> float:
    """Back from the error scale to the metric."""
    return 1.0 - error if HIGHER_IS_BETTER[metric] else error


def _stage(ds: xr.Dataset, stage: str, metric: str) -> xr.DataArray:
    """Error of every model after ``stage``: grid dims + ``eval_domain``."""
    da = ds[metric_var(metric, "final")].sel(stage=stage, drop=True)
    return _error(da, metric)


@contextlib.contextmanager
def _quiet():
    """All-NaN groups give NaN by design: no RuntimeWarning about them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _median(da: xr.DataArray, keep: list[str] | tuple[str, ...] = ()) -> xr.DataArray:
    """Median over every dim not in ``keep`` (NaN-aware)."""
    dims = [d for d in da.dims if d not in keep]
    with _quiet():
        return da.median(dims, skipna=True) if dims else da


def _seed_sd(table: xr.DataArray) -> float:
    """Median over the other cells of the seed-to-seed sample standard deviation (ddof 1)."""
    with _quiet():
        sds = table.std("seed", skipna=True, ddof=1).values
    sds = sds[np.isfinite(sds)]
    return float(np.median(sds)) if sds.size else math.nan


def _f(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.3f}"


def _unmeasurable(key, title, claim, rule, why, metric) -> Finding:
    return Finding(
        key, title, claim, rule, UNMEASURABLE, f"Not measurable here: {why}.", {}, metric
    )


def _axis_range(table: xr.DataArray, over: str) -> float:
    """Range (max − min) across ``over`` of the means over the other axis."""
    other = [d for d in table.dims if d != over][0]
    with _quiet():
        means = table.mean(other, skipna=True).values
    means = means[np.isfinite(means)]
    return float(means.max() - means.min()) if means.size > 1 else math.nan


# --- the findings -----------------------------------------------------------------------------
def in_focus_hardest(dbs: Mapping[str, xr.Dataset], metric: str = "loss") -> Finding:
    key, title = "F1", "in-focus target is the hardest"
    claim = (
        "After transfer, the in-focus (0 nm) target is the hardest defocus to segment: models "
        "transferred to it end with the worst loss of all targets."
    )
    rule = (
        "Median over all transfer models of the target-domain error after transfer, per target "
        "defocus; holds if the 0 nm target has the worst median."
    )
    ds = dbs.get("defocus")
    if ds is None:
        return _unmeasurable(key, title, claim, rule, "no defocus database", metric)
    targets = ds["target_domain"].values
    if match_index(targets, IN_FOCUS_NM) < 0 or len(targets) < 2:
        return _unmeasurable(key, title, claim, rule, "0 nm and another target needed", metric)
    after = on_domain(_stage(ds, "transfer", metric), "target_domain")
    med = _median(after, ["target_domain"])
    values = {float(t): float(v) for t, v in zip(targets, med.values, strict=True)}
    finite = {t: v for t, v in values.items() if math.isfinite(v)}
    if IN_FOCUS_NM not in finite or len(finite) < 2:
        return _unmeasurable(key, title, claim, rule, "no finished transfer to 0 nm", metric)
    hardest = max(finite, key=finite.get)
    others = sorted(_value(v, metric) for t, v in finite.items() if t != IN_FOCUS_NM)
    verdict = HOLDS if hardest == IN_FOCUS_NM else FAILS
    name = METRIC_NAMES[metric]
    summary = (
        f"After transfer the median {name} on the 0 nm target is "
        f"{_f(_value(finite[IN_FOCUS_NM], metric))}, against "
        f"{_f(others[0])}–{_f(others[-1])} on the other "
        f"targets; the hardest target is {hardest:g} nm."
    )
    numbers = {"by_target": {t: _value(v, metric) for t, v in finite.items()}, "hardest": hardest}
    return Finding(key, title, claim, rule, verdict, summary, numbers, metric)


def pretraining_matters_less(dbs: Mapping[str, xr.Dataset], metric: str = "loss") -> Finding:
    key, title = "F2", "pretraining domain matters less after transfer"
    claim = (
        "After transfer, the loss on a target barely depends on where the model was pretrained: "
        "the spread across pretraining domains shrinks compared with before transfer."
    )
    rule = (
        "For each target defocus with at least two pretraining defoci: the range (max − min) "
        "across pretraining defoci of the median target-domain error, before transfer (the "
        "pretrained model applied as is) and after; holds if the range shrinks for every target."
    )
    ds = dbs.get("defocus")
    if ds is None:
        return _unmeasurable(key, title, claim, rule, "no defocus database", metric)
    keep = ["pretrain_domain", "target_domain"]
    after = _median(on_domain(_stage(ds, "transfer", metric), "target_domain"), keep)
    before = _median(on_domain(_stage(ds, "pretrain", metric), "target_domain"), keep)
    before = before.where(np.isfinite(after))  # the same (pretraining, target) cells
    ranges = {}
    for t in ds["target_domain"].values.tolist():
        b = before.sel(target_domain=t).values
        a = after.sel(target_domain=t).values
        ok = np.isfinite(a) & np.isfinite(b)
        if ok.sum() >= 2:
            ranges[t] = (float(np.ptp(b[ok])), float(np.ptp(a[ok])))
    if not ranges:
        return _unmeasurable(
            key, title, claim, rule, "no target has two pretraining defoci", metric
        )
    shrinks = [a < b for b, a in ranges.values()]
    verdict = HOLDS if all(shrinks) else FAILS
    mean_b = float(np.mean([b for b, _ in ranges.values()]))
    mean_a = float(np.mean([a for _, a in ranges.values()]))
    summary = (
        f"Across pretraining defoci the median target {METRIC_NAMES[metric]} spans "
        f"{_f(mean_b)} before transfer and {_f(mean_a)} after (mean range over "
        f"{len(ranges)} targets); it shrinks for {sum(shrinks)} of {len(ranges)} targets."
    )
    numbers = {"ranges": ranges, "mean_before": mean_b, "mean_after": mean_a}
    return Finding(key, title, claim, rule, verdict, summary, numbers, metric)


def freezing_costs(dbs: Mapping[str, xr.Dataset], metric: str = "loss") -> Finding:
    key, title = "F3", "decoder freezing is cheap, encoder freezing is not"
    claim = (
        "Freezing the decoder during transfer costs little against training the whole network; "
        "freezing the encoder costs more."
    )
    rule = (
        "Paired per configuration (same pretraining, target, data size, learning rates, seed): "
        "the target-domain error after transfer with a frozen part minus that without freezing; "
        "holds if the median cost of freezing the encoder is positive and larger than that of "
        "freezing the decoder."
    )
    ds = dbs.get("defocus")
    if ds is None or not {"none", "encoder", "decoder"} <= set(ds["freeze"].values.tolist()):
        return _unmeasurable(key, title, claim, rule, "all three freezing options needed", metric)
    after = on_domain(_stage(ds, "transfer", metric), "target_domain")
    none = after.sel(freeze="none")
    cost = {f: float(_median(after.sel(freeze=f) - none)) for f in ("encoder", "decoder")}
    if not all(math.isfinite(v) for v in cost.values()):
        return _unmeasurable(key, title, claim, rule, "no paired finished runs", metric)
    options = ("none", "encoder", "decoder")
    med = {f: _value(float(_median(after.sel(freeze=f))), metric) for f in options}
    verdict = HOLDS if cost["encoder"] > 0 and cost["encoder"] > cost["decoder"] else FAILS
    name = METRIC_NAMES[metric]
    summary = (
        f"Median target {name} after transfer: {_f(med['none'])} with nothing frozen, "
        f"{_f(med['decoder'])} with the decoder frozen, {_f(med['encoder'])} with the encoder "
        f"frozen; the paired median cost (error) of freezing is {cost['decoder']:+.3f} for the "
        f"decoder and {cost['encoder']:+.3f} for the encoder."
    )
    numbers = {"median": med, "paired_cost": cost}
    return Finding(key, title, claim, rule, verdict, summary, numbers, metric)


def more_images_help(dbs: Mapping[str, xr.Dataset], metric: str = "loss") -> Finding:
    key, title = "F4", "more transfer images: lower and narrower"
    claim = (
        "More transfer images lower the median target loss after transfer and narrow its spread "
        "over configurations."
    )
    rule = (
        "Per transfer-set size N: median and interquartile range, over all transfer models, of "
        "the target-domain error after transfer; holds if the median falls with every step up "
        "in N and the range at the largest N is below that at the smallest."
    )
    ds = dbs.get("defocus")
    if ds is None or ds.sizes.get("n_transfer", 0) < 2:
        return _unmeasurable(key, title, claim, rule, "two or more transfer sizes needed", metric)
    after = on_domain(_stage(ds, "transfer", metric), "target_domain")
    sizes = [int(n) for n in ds["n_transfer"].values]
    med, iqr = {}, {}
    for n in sizes:
        v = after.sel(n_transfer=n).values.ravel()
        v = v[np.isfinite(v)]
        if not v.size:
            return _unmeasurable(key, title, claim, rule, f"no finished run with N={n}", metric)
        med[n] = float(np.median(v))
        q1, q3 = np.percentile(v, [25, 75])
        iqr[n] = float(q3 - q1)
    falls = all(med[a] > med[b] for a, b in zip(sizes, sizes[1:], strict=False))
    narrows = iqr[sizes[-1]] < iqr[sizes[0]]
    verdict = HOLDS if falls and narrows else FAILS
    name = METRIC_NAMES[metric]
    summary = (
        f"Median target {name} after transfer by N = {', '.join(map(str, sizes))}: "
        f"{', '.join(_f(_value(med[n], metric)) for n in sizes)}; interquartile range "
        f"{_f(iqr[sizes[0]])} at N = {sizes[0]} and {_f(iqr[sizes[-1]])} at N = {sizes[-1]}."
    )
    numbers = {"median": {n: _value(v, metric) for n, v in med.items()}, "iqr": iqr}
    return Finding(key, title, claim, rule, verdict, summary, numbers, metric)


def dose_follows_target(dbs: Mapping[str, xr.Dataset], metric: str = "loss") -> Finding:
    key, title = "F5", "low dose hurts pretraining; transfer follows the target dose"
    claim = (
        "Pretraining on low-dose images gives worse models before transfer; after transfer the "
        "loss follows the dose of the target, not that of the pretraining."
    )
    rule = (
        "(a) Mean over every evaluation dose of the pretrained models' error (median over "
        "seeds): the lowest pretraining dose must be the worst. (b) After transfer, the table "
        "of median target errors by (pretraining dose, target dose): the range across target "
        "doses of its means must exceed the range across pretraining doses. Holds if (a) and (b)."
    )
    ds = dbs.get("dose")
    if ds is None or ds.sizes["pretrain_domain"] < 3:
        return _unmeasurable(key, title, claim, rule, "three or more doses needed", metric)
    before = _median(_stage(ds, "pretrain", metric), ["pretrain_domain", "eval_domain"])
    with _quiet():
        overall = before.mean("eval_domain", skipna=True)
    doses = [float(d) for d in ds["pretrain_domain"].values]
    by_dose = {d: float(v) for d, v in zip(doses, overall.values, strict=True)}
    finite = {d: v for d, v in by_dose.items() if math.isfinite(v)}
    if len(finite) < 3:
        return _unmeasurable(key, title, claim, rule, "too few finished pretrainings", metric)
    worst = max(finite, key=finite.get)
    low_worst = worst == min(finite)
    table = _median(
        on_domain(_stage(ds, "transfer", metric), "target_domain"),
        ["pretrain_domain", "target_domain"],
    )
    effect_target = _axis_range(table, "target_domain")
    effect_pretrain = _axis_range(table, "pretrain_domain")
    follows = effect_target > effect_pretrain
    verdict = HOLDS if low_worst and follows else FAILS
    name = METRIC_NAMES[metric]
    summary = (
        f"Before transfer the mean {name} over all doses is "
        + ", ".join(f"{_f(_value(v, metric))} ({d:g})" for d, v in finite.items())
        + f" by pretraining dose [e⁻/Å²], worst at {worst:g}; after transfer the target dose "
        f"moves the median error by {_f(effect_target)} and the pretraining dose by "
        f"{_f(effect_pretrain)}."
    )
    numbers = {
        "before_by_pretraining_dose": {d: _value(v, metric) for d, v in finite.items()},
        "worst_pretraining_dose": worst,
        "effect_target": effect_target,
        "effect_pretrain": effect_pretrain,
        "parts": {"low_dose_worst": low_worst, "follows_target": follows},
    }
    return Finding(key, title, claim, rule, verdict, summary, numbers, metric)


def transfer_matches_mixture(dbs: Mapping[str, xr.Dataset], metric: str = "loss") -> Finding:
    key, title = "F6", "transfer ≈ a mixture with the same target images"
    claim = (
        "Transfer with N target images does about as well on the target as one training on a "
        "mixture of the two domains that holds the same N target images."
    )
    rule = (
        "For every baseline pair (a, b) and mixture whose count of b images equals a transfer-set "
        "size N of the defocus study, with transfers a → b: the mixture's median error on b "
        "minus the transfer models' median error on b (N images). About as well: the median "
        "difference is within twice the seed-to-seed standard deviation of those transfer "
        "models."
    )
    base, transfer = dbs.get("baseline"), dbs.get("defocus")
    if base is None or transfer is None:
        return _unmeasurable(
            key, title, claim, rule, "baseline and defocus databases needed", metric
        )
    mix_err = _stage(base, "mixture", metric)
    t_err = on_domain(_stage(transfer, "transfer", metric), "target_domain")
    gaps, sds, pairs = [], [], []
    sizes = [int(n) for n in transfer["n_transfer"].values]
    for a in base["domain_a"].values.tolist():
        for b in base["domain_b"].values.tolist():
            if a == b or match_index(transfer["pretrain_domain"].values, a) < 0:
                continue
            if match_index(transfer["target_domain"].values, b) < 0:
                continue
            for mix in base["mix"].values.tolist():
                n_b = int(str(mix).split(":")[1])
                if n_b not in sizes:
                    continue
                m = mix_err.sel(domain_a=a, domain_b=b, mix=mix)
                m = float(_median(m.isel(eval_domain=match_index(m["eval_domain"].values, b))))
                t = t_err.sel(pretrain_domain=a, target_domain=b, n_transfer=n_b)
                tv = float(_median(t))
                with _quiet():
                    sd = float(t.std("seed", skipna=True).median(skipna=True))
                if math.isfinite(m) and math.isfinite(tv):
                    gaps.append(m - tv)
                    sds.append(sd)
                    pairs.append((a, b, mix, _value(m, metric), _value(tv, metric)))
    if not gaps:
        return _unmeasurable(
            key, title, claim, rule, "no mixture holds as many target images as a transfer run",
            metric,
        )  # fmt: skip
    gap, sd = float(np.median(gaps)), float(np.nanmedian(sds))
    verdict = HOLDS if abs(gap) <= 2 * sd else FAILS
    name = METRIC_NAMES[metric]
    summary = (
        f"Over {len(gaps)} comparisons the mixture's error on the target minus the transfer "
        f"model's has a median of {gap:+.3f} ({name} scale), against a seed-to-seed standard "
        f"deviation of {_f(sd)} of the transfer models."
    )
    numbers = {"median_gap": gap, "seed_sd": sd, "comparisons": pairs}
    return Finding(key, title, claim, rule, verdict, summary, numbers, metric)


def in_focus_pretraining_asymmetry(dbs: Mapping[str, xr.Dataset], metric: str = "loss") -> Finding:
    key, title = "F7", "pretraining in focus transfers better than the reverse"
    claim = (
        "Pretraining in focus transfers better to other defoci than pretraining elsewhere "
        "transfers to focus: the two directions are not symmetric."
    )
    rule = (
        "For every defocus d ≠ 0 pretrained and targeted in both directions: the transfer gap "
        "G(0 → d) — median error on d after transfer from 0 nm minus that of the model "
        "pretrained on d itself — against G(d → 0), defined alike; holds if the mean G(0 → d) is "
        "below the mean G(d → 0)."
    )
    ds = dbs.get("defocus")
    if ds is None:
        return _unmeasurable(key, title, claim, rule, "no defocus database", metric)
    pre, tgt = ds["pretrain_domain"].values, ds["target_domain"].values
    if match_index(pre, IN_FOCUS_NM) < 0 or match_index(tgt, IN_FOCUS_NM) < 0:
        return _unmeasurable(
            key, title, claim, rule, "0 nm must be pretrained and targeted", metric
        )
    after = _median(
        on_domain(_stage(ds, "transfer", metric), "target_domain"),
        ["pretrain_domain", "target_domain"],
    )
    own = _median(on_domain(_stage(ds, "pretrain", metric), "pretrain_domain"), ["pretrain_domain"])
    ref = {float(p): float(v) for p, v in zip(pre, own.values, strict=True)}
    gaps = {}
    for d in pre.tolist():
        if d == IN_FOCUS_NM or match_index(tgt, d) < 0:
            continue
        out_ = float(after.sel(pretrain_domain=IN_FOCUS_NM, target_domain=d)) - ref[float(d)]
        in_ = float(after.sel(pretrain_domain=d, target_domain=IN_FOCUS_NM)) - ref[IN_FOCUS_NM]
        if math.isfinite(out_) and math.isfinite(in_):
            gaps[float(d)] = (out_, in_)
    if not gaps:
        return _unmeasurable(key, title, claim, rule, "no defocus transferred both ways", metric)
    g_out = float(np.mean([g for g, _ in gaps.values()]))
    g_in = float(np.mean([g for _, g in gaps.values()]))
    verdict = HOLDS if g_out < g_in else FAILS
    summary = (
        f"Mean transfer gap (error above the in-domain model) from 0 nm to "
        f"{', '.join(f'{d:g}' for d in gaps)} nm: {g_out:+.3f}; from those defoci to 0 nm: "
        f"{g_in:+.3f} ({METRIC_NAMES[metric]} scale)."
    )
    numbers = {"gaps": gaps, "from_focus": g_out, "to_focus": g_in}
    return Finding(key, title, claim, rule, verdict, summary, numbers, metric)


def structure_follows_target(dbs: Mapping[str, xr.Dataset], metric: str = "loss") -> Finding:
    key, title = "F8", "structure: the target decides; size matters little"
    claim = (
        "After transfer, the loss depends mostly on the target structure; particle size has a "
        "weak effect, which transfer removes."
    )
    rule = (
        "(a) After transfer, the table of median target errors by (pretraining set, target "
        "set): the range across targets of its means must exceed the range across pretraining "
        "sets. (b) The size effect S — the mean change of a target's error when the "
        "pretraining set changes only in particle size — must be below the lattice effect L "
        "(a change only in lattice) before transfer, and shrink through transfer. Holds if (a) "
        "and (b)."
    )
    ds = dbs.get("structure")
    if ds is None:
        return _unmeasurable(key, title, claim, rule, "no structure database", metric)
    names = [str(n) for n in ds["pretrain_domain"].values]
    parts = {n: n.rsplit("-", 1) for n in names}
    lattices = {p[0] for p in parts.values()}
    sizes = {p[1] for p in parts.values()}
    if len(lattices) < 2 or len(sizes) < 2:
        return _unmeasurable(key, title, claim, rule, "two lattices and two sizes needed", metric)
    keep = ["pretrain_domain", "target_domain"]
    after = _median(on_domain(_stage(ds, "transfer", metric), "target_domain"), keep)
    before = _median(on_domain(_stage(ds, "pretrain", metric), "target_domain"), keep)
    effect_target = _axis_range(after, "target_domain")
    effect_pretrain = _axis_range(after, "pretrain_domain")

    def effect(table: xr.DataArray, same: int) -> float:
        """Mean |Δ error| on a target between pretraining sets equal in part ``same`` only."""
        diffs = []
        for t in table["target_domain"].values.tolist():
            for i, p in enumerate(names):
                for q in names[i + 1 :]:
                    if parts[p][same] == parts[q][same] and parts[p] != parts[q]:
                        d = float(table.sel(pretrain_domain=p, target_domain=t)) - float(
                            table.sel(pretrain_domain=q, target_domain=t)
                        )
                        if math.isfinite(d):
                            diffs.append(abs(d))
        return float(np.mean(diffs)) if diffs else math.nan

    s_before, s_after = effect(before, 0), effect(after, 0)  # same lattice, other size
    l_before = effect(before, 1)  # same size, other lattice
    if not all(math.isfinite(v) for v in (effect_target, effect_pretrain, s_before, s_after)):
        return _unmeasurable(key, title, claim, rule, "too few finished transfer runs", metric)
    target_decides = effect_target > effect_pretrain
    size_weak = s_before < l_before and s_after < s_before
    verdict = HOLDS if target_decides and size_weak else FAILS
    summary = (
        f"After transfer the target set moves the median error by {_f(effect_target)} and the "
        f"pretraining set by {_f(effect_pretrain)}; before transfer a change of particle size "
        f"moves a target's error by {_f(s_before)} (lattice: {_f(l_before)}), after transfer "
        f"by {_f(s_after)} ({METRIC_NAMES[metric]} scale)."
    )
    numbers = {
        "effect_target": effect_target,
        "effect_pretrain": effect_pretrain,
        "size_before": s_before,
        "size_after": s_after,
        "lattice_before": l_before,
        "parts": {"target_decides": target_decides, "size_weak": size_weak},
    }
    return Finding(key, title, claim, rule, verdict, summary, numbers, metric)


# --- the companion study (Sytwu et al.): generalization without transfer ----------------------
def generalization_gaps(ds: xr.Dataset, metric: str = "dice") -> dict[str, Any]:
    """Off-diagonal gaps of a ``generalization-<series>`` database on the error scale.

    ``gaps[(train, test)]``: median (over seeds) error on ``test`` of the models trained on
    ``train`` minus that of the models trained on ``test`` itself (the in-domain ideal;
    positive = worse), for every pair of distinct training domains that are also test domains.
    ``seed_sd``: median over the training domains of the seed-to-seed (sample) standard
    deviation of the in-domain error; NaN with fewer than two seeds. ``mean_gap``: mean of the gaps.
    """
    err = _stage(ds, "pretrain", metric)  # train_domain, seed, eval_domain
    med = _median(err, ["train_domain", "eval_domain"])
    own = on_domain(err, "train_domain")  # train_domain, seed
    trains = [t for t in ds["train_domain"].values.tolist()]
    tests = med["eval_domain"].values
    ideal = {}
    for t in trains:
        j = match_index(tests, t)
        if j >= 0:
            ideal[t] = float(med.sel(train_domain=t).values[j])
    gaps = {}
    for t in trains:
        for u, ref in ideal.items():
            if u == t or not math.isfinite(ref):
                continue
            v = float(med.sel(train_domain=t).values[match_index(tests, u)])
            if math.isfinite(v):
                gaps[(t, u)] = v - ref
    return {
        "gaps": gaps,
        "seed_sd": _seed_sd(own),  # NaN from fewer than two seeds
        "mean_gap": float(np.mean(list(gaps.values()))) if gaps else math.nan,
        "ideal": {t: _value(v, metric) for t, v in ideal.items()},
    }


def _gen_db(dbs: Mapping[str, xr.Dataset], series: str) -> xr.Dataset | None:
    return dbs.get(f"generalization-{series}")


def not_scale_invariant(dbs: Mapping[str, xr.Dataset], metric: str = "dice") -> Finding:
    key, title = "G1", "no generalization across magnifications"
    claim = (
        "A segmentation network is not scale invariant: trained at one magnification (pixel "
        "size), it segments images taken at another clearly worse than a network trained there."
    )
    rule = (
        "Models trained without transfer on one pixel size and tested on every other one: for "
        "every (training, test) pair, the median error on the test pixel size minus that of the "
        "models trained on it (the in-domain ideal); holds if every such gap exceeds twice the "
        "seed-to-seed standard deviation of the in-domain models."
    )
    ds = _gen_db(dbs, "magnification")
    if ds is None or ds.sizes["train_domain"] < 2:
        return _unmeasurable(
            key, title, claim, rule, "two or more trained magnifications needed", metric
        )
    g = generalization_gaps(ds, metric)
    if not g["gaps"]:
        return _unmeasurable(key, title, claim, rule, "too few finished models", metric)
    if not math.isfinite(g["seed_sd"]):
        return _unmeasurable(key, title, claim, rule, "two or more seeds needed", metric)
    smallest = min(g["gaps"], key=g["gaps"].get)
    verdict = HOLDS if all(v > 2 * g["seed_sd"] for v in g["gaps"].values()) else FAILS
    pairs = ", ".join(f"{a:g} → {b:g} Å/px: {v:+.3f}" for (a, b), v in g["gaps"].items())
    summary = (
        f"Gaps to the in-domain ideal ({METRIC_NAMES[metric]} scale) by training → test pixel "
        f"size: {pairs}; the smallest is {g['gaps'][smallest]:+.3f} "
        f"({smallest[0]:g} → {smallest[1]:g} Å/px), against twice the seed standard deviation, "
        f"{2 * g['seed_sd']:.3f}."
    )
    return Finding(key, title, claim, rule, verdict, summary, g, metric)


def large_particles_generalize_worst(
    dbs: Mapping[str, xr.Dataset], metric: str = "dice"
) -> Finding:
    key, title = "G2", "trained on large particles, generalizes worst"
    claim = (
        "Networks trained on images of larger particles generalize the worst to other data; "
        "training on small particles carries over better."
    )
    rule = (
        "On the structure series without transfer: the mean gap to the in-domain ideal over the "
        "other test sets, of the models trained on large particles against those trained on "
        "small ones (every lattice); holds if the large-particle models' mean gap is the larger."
    )
    ds = _gen_db(dbs, "structure")
    if ds is None:
        return _unmeasurable(
            key, title, claim, rule, "no generalization-structure database", metric
        )
    g = generalization_gaps(ds, metric)
    by_size: dict[str, list[float]] = {"small": [], "large": []}
    for (t, _), v in g["gaps"].items():
        size = str(t).rsplit("-", 1)[-1]
        if size in by_size:
            by_size[size].append(v)
    if not by_size["small"] or not by_size["large"]:
        return _unmeasurable(key, title, claim, rule, "models trained on both sizes needed", metric)
    mean = {k: float(np.mean(v)) for k, v in by_size.items()}
    verdict = HOLDS if mean["large"] > mean["small"] else FAILS
    summary = (
        f"Mean gap to the in-domain ideal ({METRIC_NAMES[metric]} scale) over the other test "
        f"sets: {mean['large']:+.3f} for models trained on large particles, "
        f"{mean['small']:+.3f} for those trained on small ones (seed standard deviation "
        f"{_f(g['seed_sd'])})."
    )
    return Finding(key, title, claim, rule, verdict, summary, {**g, "by_size": mean}, metric)


def conditions_shape_generalization(dbs: Mapping[str, xr.Dataset], metric: str = "dice") -> Finding:
    key, title = "G3", "dose, defocus and support shape generalization"
    claim = (
        "Besides magnification and particle size, the electron dose, the defocus and the "
        "support (substrate) under the particles also limit how far a trained network carries."
    )
    rule = (
        "For each of the dose, defocus and substrate series without transfer: the mean gap to "
        "the in-domain ideal over all (training, test) pairs of distinct domains; holds if, for "
        "all three series, it exceeds twice the seed-to-seed standard deviation of the "
        "in-domain models."
    )
    found = {}
    for series in CONDITION_SERIES:
        ds = _gen_db(dbs, series)
        if ds is None:
            continue
        g = generalization_gaps(ds, metric)
        if not g["gaps"]:
            continue
        if not math.isfinite(g["seed_sd"]):
            return _unmeasurable(key, title, claim, rule, "two or more seeds needed", metric)
        found[series] = (g["mean_gap"], g["seed_sd"])
    if len(found) < len(CONDITION_SERIES):
        return _unmeasurable(
            key, title, claim, rule, "dose, defocus and substrate databases needed", metric
        )
    verdict = HOLDS if all(m > 2 * sd for m, sd in found.values()) else FAILS
    summary = (
        f"Mean gap to the in-domain ideal ({METRIC_NAMES[metric]} scale): "
        + "; ".join(f"{s} {m:+.3f} (2 sd {2 * sd:.3f})" for s, (m, sd) in found.items())
        + "."
    )
    numbers = {"by_series": {s: {"mean_gap": m, "seed_sd": sd} for s, (m, sd) in found.items()}}
    return Finding(key, title, claim, rule, verdict, summary, numbers, metric)


def _heldout(dbs: Mapping[str, xr.Dataset], metric: str) -> xr.DataArray | None:
    """Error on the experimental-like domain by (pretrain_domain, seed, case), or None."""
    ds = dbs.get("heldout")
    return None if ds is None else _error(heldout_table(ds, metric), metric)


def synthetic_variants_matter(dbs: Mapping[str, xr.Dataset], metric: str = "dice") -> Finding:
    key, title = "G4", "the synthetic variant decides the first experimental score"
    claim = (
        "Trained on simulations and applied to experimental images without transfer, a "
        "network's success depends on what the simulations varied: the particle sizes and the "
        "support they showed."
    )
    rule = (
        "Models trained from scratch on each synthetic variant (support of varied or fixed "
        "thickness, small or large particles only), tested on the experimental-like images: "
        "the range (largest minus smallest) of the variants' mean error over seeds; holds if "
        "it exceeds twice the seed-to-seed standard deviation."
    )
    err = _heldout(dbs, metric)
    if err is None or err.sizes["pretrain_domain"] < 2:
        return _unmeasurable(
            key, title, claim, rule, "two or more synthetic variants needed", metric
        )
    before = err.sel(case="before", drop=True)
    sd = _seed_sd(before)
    if not math.isfinite(sd):
        return _unmeasurable(key, title, claim, rule, "two or more seeds needed", metric)
    with _quiet():
        means = before.mean("seed", skipna=True)
    spread = _axis_range(before, "pretrain_domain")
    verdict = HOLDS if spread > 2 * sd else FAILS
    name = METRIC_NAMES[metric]
    by = {
        str(v): _value(float(means.sel(pretrain_domain=v)), metric)
        for v in means["pretrain_domain"].values
    }
    summary = (
        f"Mean {name} on the experimental-like images before transfer: "
        + ", ".join(f"{v} {x:.3f}" for v, x in by.items())
        + f"; range {spread:.3f} against twice the seed standard deviation, {2 * sd:.3f}."
    )
    return Finding(
        key,
        title,
        claim,
        rule,
        verdict,
        summary,
        {"before": by, "range": spread, "seed_sd": sd},
        metric,
    )


def transfer_rescues_experimental(dbs: Mapping[str, xr.Dataset], metric: str = "dice") -> Finding:
    key, title = "G5", "transfer overcomes a poor synthetic start"
    claim = (
        "Transfer learning on a few experimental images overcomes a poor start: after it, "
        "every synthetic variant does better on experimental data, and the variants differ less."
    )
    rule = (
        "On the experimental-like test images: the mean error over seeds of each "
        "synthetic variant before transfer and after transfer on a few unbiased experimental-like "
        "images; holds if every variant's error drops and the range across variants shrinks."
    )
    err = _heldout(dbs, metric)
    if err is None or not {"before", "after"} <= set(err["case"].values.tolist()):
        return _unmeasurable(
            key, title, claim, rule, "transfers to the experimental-like images needed", metric
        )
    with _quiet():
        means = err.sel(case=["before", "after"]).mean("seed", skipna=True)
    if not np.isfinite(means.values).all():
        return _unmeasurable(key, title, claim, rule, "too few finished models", metric)
    drops = {
        str(v): float(
            means.sel(pretrain_domain=v, case="before") - means.sel(pretrain_domain=v, case="after")
        )
        for v in means["pretrain_domain"].values
    }
    spread = {
        c: _axis_range(err.sel(case=c, drop=True), "pretrain_domain") for c in ("before", "after")
    }
    ranges_ok = all(math.isfinite(v) for v in spread.values())
    verdict = (
        HOLDS
        if all(d > 0 for d in drops.values()) and ranges_ok and spread["after"] < spread["before"]
        else FAILS
    )
    name = METRIC_NAMES[metric]
    summary = (
        f"Improvement by transfer on the experimental-like images (error before minus after, "
        f"{name} scale): "
        + ", ".join(f"{v} {d:+.3f}" for v, d in drops.items())
        + f"; range across variants {_f(spread['before'])} before, {_f(spread['after'])} after."
    )
    return Finding(
        key, title, claim, rule, verdict, summary, {"gain": drops, "range": spread}, metric
    )


def size_bias_hurts_transfer(dbs: Mapping[str, xr.Dataset], metric: str = "dice") -> Finding:
    key, title = "G6", "a size-biased transfer set costs accuracy"
    claim = (
        "Transfer learning suffers when the few experimental images it uses are biased to "
        "one particle size."
    )
    rule = (
        "Paired by synthetic variant and seed: the error on the experimental-like validation "
        "images (sizes unbiased) after transfer on images of small particles only, minus that "
        "after transfer on as many unbiased images; holds if the mean paired cost exceeds twice "
        "the seed-to-seed standard deviation of the unbiased transfers."
    )
    err = _heldout(dbs, metric)
    if err is None or not {"after", "after-biased"} <= set(err["case"].values.tolist()):
        return _unmeasurable(
            key, title, claim, rule, "unbiased and size-biased transfers needed", metric
        )
    cost = err.sel(case="after-biased", drop=True) - err.sel(case="after", drop=True)
    sd = _seed_sd(err.sel(case="after", drop=True))
    if not math.isfinite(sd):
        return _unmeasurable(key, title, claim, rule, "two or more seeds needed", metric)
    with _quiet():
        mean = float(cost.mean(skipna=True))
    if not math.isfinite(mean):
        return _unmeasurable(key, title, claim, rule, "too few finished models", metric)
    verdict = HOLDS if mean > 2 * sd else FAILS
    with _quiet():
        med = {
            c: _value(float(_median(err.sel(case=c, drop=True))), metric)
            for c in ("after", "after-biased")
        }
    name = METRIC_NAMES[metric]
    summary = (
        f"Median {name} on the experimental-like images after transfer: {med['after']:.3f} "
        f"with unbiased images, {med['after-biased']:.3f} with small particles only; mean paired "
        f"cost {mean:+.3f} against twice the seed standard deviation, {2 * sd:.3f}."
    )
    return Finding(
        key,
        title,
        claim,
        rule,
        verdict,
        summary,
        {"median": med, "mean_cost": mean, "seed_sd": sd},
        metric,
    )


FINDINGS: tuple[Callable[[Mapping[str, xr.Dataset], str], Finding], ...] = (
    in_focus_hardest,
    pretraining_matters_less,
    freezing_costs,
    more_images_help,
    dose_follows_target,
    transfer_matches_mixture,
    in_focus_pretraining_asymmetry,
    structure_follows_target,
    not_scale_invariant,
    large_particles_generalize_worst,
    conditions_shape_generalization,
    synthetic_variants_matter,
    transfer_rescues_experimental,
    size_bias_hurts_transfer,
)


def evaluate(dbs: Mapping[str, xr.Dataset], metric: str = "loss") -> dict[str, Finding]:
    """Every finding of :data:`FINDINGS` on ``dbs`` (study name → database), by key."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; allowed: {', '.join(METRICS)}")
    out = {}
    for fn in FINDINGS:
        finding = fn(dbs, metric)
        out[finding.key] = finding
    return out
