"""The study's findings as statistical tests over the results databases, each with a verdict.

F1-F9 are the transfer-learning study's (Rangel DaCosta et al.), G1-G6 its companion's (Sytwu et
al.: how far a network trained without transfer generalizes, G1-G3, and how synthetic training
carries to experimental-like images, G4-G6), D1-D2 the companion's statements on training
dynamics (how a model's first epoch relates to its generalization and its accuracy).

Each finding is a :class:`Rule` written as data: the claim (our words, no stronger than the
source sentence it cites), its contrasts and the decision. A **contrast** is a paired comparison
measured once per seed: the mean, over every cell of the grid it pairs, of a difference of log
errors (error = the loss, or 1 − Dice / 1 − IoU, so lower is better and a difference of logs is
a relative change). The seed is the unit — models of one seed share nothing with those of
another, while the transfer models of one seed share their pretrained model — so the interval of
a contrast is the Student-t interval of the mean of its per-seed values
(:func:`scipy.stats.ttest_1samp`), widened by the sampling error of the test images where the
databases hold them image by image (the second unit, below), and a contrast is decided on that
interval against ``0`` and the smallest effect the claim would mean, :data:`DELTA` (a 10 %
relative change: the sources give no size of their own):

- ``greater`` (the claim: the contrast is positive): *holds* when the interval lies above 0,
  *does not hold* when it lies below δ (an effect the claim would mean is excluded);
- ``below`` (the claim: a cost that is small): *holds* when the interval lies below δ, *does
  not hold* when it lies above δ;
- ``within`` (the claim: two ways do about as well): *holds* when the interval lies inside
  (−δ, δ), *does not hold* when it lies outside;
- ``differs`` (the claim: a choice matters, either way): *holds* when the interval excludes 0,
  *does not hold* when it lies inside (−δ, δ);

and *inconclusive at this scale* otherwise.

The dynamics rules (D1, D2) relate two quantities across models rather than compare two errors:
their contrast is, per seed, Spearman's rank correlation across the models trained without
transfer, on Fisher's z scale (``atanh``, where a mean and a t interval behave), decided the same
way with the smallest correlation a claimed relation would mean, :data:`RHO_DELTA` (0.3, Cohen's
"medium" correlation; J. Cohen, *Statistical Power Analysis for the Behavioral Sciences*, 2nd
ed., 1988, §3.2), in place of δ. Each rule's :class:`Scale` says which. Their intervals take the
seeds as the only unit: with no relation, each seed's correlation is centred on zero whichever
test images were drawn (the first epoch is scored on validation images, and a test image's
sampling error moves every seed's final scores alike), so the test images widen nothing a
false pass depends on; what they do cost is power, which the simulation includes.

A finding with several contrasts holds when every
one holds (an intersection-union test: no correction needed), does not hold when any does not,
and is inconclusive otherwise. Why not a bootstrap over seeds: with three seeds the resampling
distribution of a mean has ten points, and a 95 % percentile interval excludes 0 whenever the
three share a sign — a quarter of the time with no effect at all. The t interval keeps its
level with three seeds; its price is power, which :mod:`hrtem_book.power` measures per rule.

The rule set (claims, sources, statistics, decisions and the code of the contrasts) is hashed
(:func:`ruleset_sha`); :func:`collect` stamps the hash into every database it writes, and a
database stamped with another rule set is reported as such, never scored.

The test images are a second unit. One domain's test images are shared by every model scored
on it, so the seed-to-seed spread does not see their sampling error: a contrast *between*
evaluation domains (F1, F9, G1-G3, F5's and F8's spreads across targets) carries it, a contrast
on the same images (F3, F4's sizes, F7) almost none. The databases store every model's score on
every test image (``image_loss``, ``image_counts``); :func:`image_variances` resamples each
domain's images (:func:`scipy.stats.bootstrap`, the domains independently, every model on the
same resample), recomputes the scores and every contrast, and takes the variance of its seed
mean. The interval then adds that variance to the seeds' (:func:`two_level_intervals`, degrees
of freedom by Welch-Satterthwaite). Model-by-image interaction is counted in both parts, which
makes the interval slightly conservative. A database without per-image scores is decided on the
seeds alone, and its sentence says so.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from scipy import stats

from .layout import cached_json
from .metrics import METRICS, get_metric
from .profiles import Profile
from .results import (
    COUNTS,
    STATUS_VALUES,
    deviation_from_ideal,
    heldout_table,
    load_database,
    metric_var,
    on_domain,
)
from .results import collect as collect_databases
from .series import GENERALIZATION_SERIES, match_index
from .series import split_structure_domain as _parts  # the rules' code calls it _parts

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive at this scale"
UNMEASURABLE, STALE = "not measurable", "not scored: database of another rule set"
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE, UNMEASURABLE, STALE)
KINDS = ("greater", "below", "within", "differs")
CONFIDENCE = 0.95  # two-sided level of every interval
DELTA = math.log(1.10)  # smallest effect a claim means: a 10 % relative change of the error
ERROR_FLOOR = 1e-4  # errors below this (a perfect Dice) count as this, so logs stay finite
# the series of the companion's finding G3 (imaging conditions and support)
CONDITION_SERIES = ("dose", "defocus", "substrate")
IN_FOCUS_NM = 0.0  # the in-focus defocus domain
# the companion's models trained without transfer, one database per series (D1, D2)
GENERALIZATION_STUDIES = tuple(f"generalization-{s}" for s in GENERALIZATION_SERIES)
EARLY_EPOCH = 1  # a model's initial learning: its validation error after its first epoch
RHO_DELTA = 0.3  # smallest rank correlation a claimed relation means (module docstring)
MIN_MODELS = 4  # models a rank correlation needs (per seed)
RULESET_ATTR = "ruleset_sha"  # database attribute holding the stamp
# when the rule set last changed, and its hash then (a test keeps the two in step with the code)
RULESET_DATE = "2026-12-07"
RULESET_SHA = "107841112d411070"


class NotMeasurable(Exception):
    """The grid lacks what a rule needs; the message says what."""


@dataclass(frozen=True)
class Scale:
    """What a rule's contrasts measure: the smallest effect its claim means (``delta``, on the
    contrast's scale), how a value reads, and what its summary calls it."""

    name: str
    delta: float
    text: Callable[[float], str]
    what: str  # the summary's words for a contrast value ({error} names the error scale)
    images: bool  # the test images are a second sampling unit of its intervals
    symbol: str = ""  # what a value is named before it ("ρ = "), if anything


@dataclass(frozen=True)
class Contrast:
    """One paired comparison: its value per seed (log-error difference) and how it is decided."""

    name: str  # what is compared, in words
    kind: str  # one of KINDS
    per_seed: np.ndarray  # one value per seed (NaN: a seed without the pair)


@dataclass(frozen=True)
class Interval:
    """A contrast decided: mean over seeds, its t interval and the contrast's verdict."""

    name: str
    kind: str
    estimate: float
    low: float
    high: float
    n_seeds: int
    verdict: str
    images: int = 0  # test images taken as a second sampling unit (0: seeds only)
    scale: str = "log"  # a key of SCALES

    def text(self) -> str:
        """``"+12 % [+3 %, +21 %]"`` (a relative change of the error) or ``"ρ = +0.41 [−0.05,
        +0.74]"`` (a rank correlation): the estimate with its interval."""
        s = SCALES[self.scale]
        return f"{s.symbol}{s.text(self.estimate)} [{s.text(self.low)}, {s.text(self.high)}]"


@dataclass(frozen=True)
class Rule:
    """One claim of the study and the test that decides it, as data."""

    key: str  # "F1", ...
    title: str  # a few words
    claim: str  # the source's statement, in our words and no stronger
    source: tuple[str, str]  # (seed file prefix, a few words that locate the sentence)
    statistic: str  # what is compared, in words
    contrasts: Callable[[Mapping[str, xr.Dataset], str], list[Contrast]]
    studies: tuple[str, ...]  # the databases it reads
    scale: str = "log"  # what its contrasts measure: a key of SCALES

    def data(self) -> dict[str, Any]:
        """Everything that decides the verdict, for the hash: text, constants and code."""
        out = {
            "key": self.key,
            "claim": self.claim,
            "source": list(self.source),
            "statistic": self.statistic,
            "studies": list(self.studies),
            "code": inspect.getsource(self.contrasts),
        }
        if self.scale != "log":  # (the log rules' data, and so their hash input, unchanged)
            out["scale"] = self.scale
            out["delta"] = SCALES[self.scale].delta
        return out


@dataclass(frozen=True)
class Finding:
    """One claim of the study, tested on this build's databases."""

    key: str
    title: str
    claim: str
    rule: str  # the statistic and its decision, in words
    verdict: str  # one of VERDICTS
    summary: str  # one sentence with the numbers and their intervals
    numbers: dict[str, Any] = field(default_factory=dict)
    metric: str = "loss"
    intervals: tuple[Interval, ...] = ()

    @property
    def holds(self) -> bool:
        return self.verdict == HOLDS


# --- the decision -----------------------------------------------------------------------------
def pct_change(log_ratio: float) -> str:
    """A log-error difference as the relative change it means: ``+12 %``."""
    if not math.isfinite(log_ratio):
        return "n/a"
    return f"{100 * math.expm1(log_ratio):+.0f} %".replace("-", "−")


def rho_text(z: float) -> str:
    """A Fisher z as the rank correlation it means: ``+0.41``."""
    if not math.isfinite(z):
        return "n/a"
    return f"{math.tanh(z):+.2f}".replace("-", "−")


SCALES = {
    "log": Scale("log", DELTA, pct_change, "Relative change of the error ({error})", True),
    "correlation": Scale(
        "correlation", math.atanh(RHO_DELTA), rho_text,
        "Spearman's rank correlation across the models (error: {error}), on Fisher's z scale",
        False, "ρ = ",
    ),
}  # fmt: skip


def effect_text(scale: str, value: float) -> str:
    """An effect on ``scale`` (a log-error difference, or a Fisher z) in words: ``+21 %``,
    ``ρ = 0.54`` (a named value without its plus sign)."""
    s = SCALES[scale]
    return f"{s.symbol}{s.text(value).lstrip('+')}" if s.symbol else s.text(value)


def t_intervals(rows: np.ndarray, confidence: float = CONFIDENCE):
    """Per row of ``rows`` (draws × seeds, finite): the mean and its two-sided Student-t
    interval (:func:`scipy.stats.ttest_1samp`); a row without spread has a zero-width one."""
    rows = np.asarray(rows, float)
    mean = rows.mean(axis=-1)
    if rows.shape[-1] < 2:  # one seed: no interval
        nan = np.full(mean.shape, np.nan)
        return mean, nan, nan
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = stats.ttest_1samp(rows, 0.0, axis=-1).confidence_interval(confidence)
    flat = np.ptp(rows, axis=-1) == 0
    return mean, np.where(flat, mean, ci.low), np.where(flat, mean, ci.high)


def t_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean of the finite ``values`` and its interval (:func:`t_intervals`); NaN with < 2."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return (float(v.mean()) if v.size else math.nan), math.nan, math.nan
    mean, low, high = t_intervals(v[None, :], confidence)
    return float(mean[0]), float(low[0]), float(high[0])


def decide(kind: str, low: float, high: float, delta: float = DELTA) -> str:
    """The verdict of one contrast from its interval (see the module docstring)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return UNMEASURABLE
    inside = -delta < low and high < delta
    if kind == "greater":
        return HOLDS if low > 0 else FAILS if high < delta else INCONCLUSIVE
    if kind == "below":
        return HOLDS if high < delta else FAILS if low > delta else INCONCLUSIVE
    if kind == "within":
        return HOLDS if inside else FAILS if (low > delta or high < -delta) else INCONCLUSIVE
    if kind == "differs":
        return HOLDS if (low > 0 or high < 0) else FAILS if inside else INCONCLUSIVE
    raise ValueError(f"kind={kind!r}; allowed: {', '.join(KINDS)}")


def combine(verdicts: list[str]) -> str:
    """Several contrasts: holds if every one holds, does not hold if any does not."""
    if any(v == UNMEASURABLE for v in verdicts) or not verdicts:
        return UNMEASURABLE
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    return FAILS if FAILS in verdicts else INCONCLUSIVE


def two_level_intervals(
    rows: np.ndarray,
    image_var: np.ndarray | float,
    n_images: int,
    confidence: float = CONFIDENCE,
):
    """Per row of ``rows`` (draws × seeds, finite): the mean and its two-sided interval when
    the test images are a sampling unit too. ``image_var`` (per row, or one value) is the
    variance of the seed mean over resamples of the test images (:func:`image_variances`);
    the standard error adds it to the seeds' (s² / n), and the degrees of freedom follow
    Welch–Satterthwaite from n − 1 (seeds) and ``n_images`` − 1 (images). With no image
    variance this is :func:`t_intervals`."""
    rows = np.asarray(rows, float)
    n = rows.shape[-1]
    mean = rows.mean(axis=-1)
    v = np.broadcast_to(np.nan_to_num(np.asarray(image_var, float)), mean.shape)
    if n < 2 or n_images < 2:
        nan = np.full(mean.shape, np.nan)
        return mean, nan, nan
    a = rows.var(axis=-1, ddof=1) / n
    se2 = a + v
    with np.errstate(all="ignore"):
        df = se2**2 / (a**2 / (n - 1) + v**2 / (n_images - 1))
        half = stats.t.ppf(0.5 + confidence / 2, np.where(se2 > 0, df, np.inf)) * np.sqrt(se2)
    return mean, mean - half, mean + half


def test_contrast(
    c: Contrast,
    delta: float = DELTA,
    image_var: float = math.nan,
    n_images: int = 0,
    scale: str = "log",
) -> Interval:
    """Decide one contrast: seeds as the unit, and the test images as a second one when
    ``image_var`` (:func:`image_variances`) is known (:func:`two_level_intervals`); ``delta``
    is the smallest effect on the contrast's ``scale`` (a key of :data:`SCALES`)."""
    v = np.asarray(c.per_seed, float)
    v = v[np.isfinite(v)]
    if math.isfinite(image_var) and v.size >= 2 and n_images >= 2:
        mean, low, high = two_level_intervals(v[None, :], image_var, n_images)
        est, lo, hi = float(mean[0]), float(low[0]), float(high[0])
    else:
        est, lo, hi = t_interval(v)
    images = n_images if math.isfinite(image_var) else 0
    verdict = decide(c.kind, lo, hi, delta)
    return Interval(c.name, c.kind, est, lo, hi, int(v.size), verdict, images, scale)


# --- reading the databases --------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    """All-NaN groups give NaN by design: no RuntimeWarning about them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _error(da: xr.DataArray, metric: str) -> xr.DataArray:
    """The metric on a lower-is-better scale: the loss, or 1 − Dice / 1 − IoU."""
    return get_metric(metric).error(da)


def _value(error: float, metric: str) -> float:
    """Back from the error scale to the metric."""
    return get_metric(metric).value(error)


def _stage(ds: xr.Dataset, stage: str, metric: str) -> xr.DataArray:
    """Error of every model after ``stage``: grid dims + ``eval_domain``."""
    da = ds[metric_var(metric, "final")].sel(stage=stage, drop=True)
    return _error(da, metric)


def _log(da: xr.DataArray) -> xr.DataArray:
    return np.log(da.clip(min=ERROR_FLOOR))


def _log_stage(ds: xr.Dataset, stage: str, metric: str) -> xr.DataArray:
    """Log error of every model after ``stage``."""
    return _log(_stage(ds, stage, metric))


def per_seed(da: xr.DataArray) -> xr.DataArray:
    """Mean over every dim but ``seed`` (NaN-aware): one value per seed."""
    dims = [d for d in da.dims if d != "seed"]
    with _quiet():
        return da.mean(dims, skipna=True) if dims else da


def _spread(da: xr.DataArray, dim: str) -> xr.DataArray:
    """Log of the sample sd (ddof 1) across ``dim``: a relative spread, NaN with < 2 values."""
    with _quiet():
        return np.log(da.std(dim, ddof=1, skipna=True).where(da.count(dim) >= 2))


def _db(dbs: Mapping[str, xr.Dataset], name: str) -> xr.Dataset:
    ds = dbs.get(name)
    if ds is None:
        raise NotMeasurable(f"no {name} database")
    if ds.sizes.get("seed", 0) < 2:
        raise NotMeasurable(f"two or more seeds needed (the {name} database has one)")
    return ds


def _name(domain) -> str:
    return f"{domain:g}" if isinstance(domain, int | float) else str(domain)


# --- the transfer-learning study --------------------------------------------------------------
def _in_focus_hardest(dbs, metric):
    ds = _db(dbs, "defocus")
    targets = ds["target_domain"].values
    j = match_index(targets, IN_FOCUS_NM)
    if j < 0 or len(targets) < 2:
        raise NotMeasurable("0 nm and another target needed")
    after = on_domain(_log_stage(ds, "transfer", metric), "target_domain")
    focus = per_seed(after.isel(target_domain=j))
    return [
        Contrast(f"0 nm against {_name(t)} nm", "greater",
                 (focus - per_seed(after.isel(target_domain=i))).values)
        for i, t in enumerate(targets.tolist()) if i != j
    ]  # fmt: skip


def _pretraining_matters_less(dbs, metric):
    ds = _db(dbs, "defocus")
    if ds.sizes["pretrain_domain"] < 2:
        raise NotMeasurable("two or more pretraining defoci needed")
    after = on_domain(_log_stage(ds, "transfer", metric), "target_domain")
    before = on_domain(_log_stage(ds, "pretrain", metric), "target_domain")
    before = before.where(np.isfinite(after))  # the same (pretraining, target) cells
    shrink = per_seed(_spread(before, "pretrain_domain")) - per_seed(
        _spread(after, "pretrain_domain")
    )
    return [Contrast("spread before against after transfer", "greater", shrink.values)]


def _freezing_costs(dbs, metric):
    ds = _db(dbs, "defocus")
    if not {"none", "encoder", "decoder"} <= set(ds["freeze"].values.tolist()):
        raise NotMeasurable("all three freezing options needed")
    after = on_domain(_log_stage(ds, "transfer", metric), "target_domain")
    enc, dec, none = (after.sel(freeze=f, drop=True) for f in ("encoder", "decoder", "none"))
    return [
        Contrast("encoder frozen against decoder frozen", "greater", per_seed(enc - dec).values),
        Contrast("decoder frozen against nothing frozen", "below", per_seed(dec - none).values),
    ]


def _more_images_help(dbs, metric):
    ds = _db(dbs, "defocus")
    if ds.sizes.get("n_transfer", 0) < 2:
        raise NotMeasurable("two or more transfer sizes needed")
    after = on_domain(_log_stage(ds, "transfer", metric), "target_domain")
    sizes = [int(n) for n in ds["n_transfer"].values]
    out = [
        Contrast(f"N = {a} against N = {b}", "greater",
                 per_seed(after.sel(n_transfer=a) - after.sel(n_transfer=b)).values)
        for a, b in zip(sizes, sizes[1:], strict=False)
    ]  # fmt: skip

    def spread(n: int) -> xr.DataArray:  # across configurations, per seed
        da = after.sel(n_transfer=n, drop=True)
        flat = da.stack(config=[d for d in da.dims if d != "seed"])
        return _spread(flat, "config")

    out.append(
        Contrast(f"spread at N = {sizes[0]} against N = {sizes[-1]}", "greater",
                 (spread(sizes[0]) - spread(sizes[-1])).values)
    )  # fmt: skip
    return out


def _axis_spreads(table: xr.DataArray, a: str, b: str) -> xr.DataArray:
    """Per seed: spread across ``a`` of the means over ``b``, minus spread across ``b`` of the
    means over ``a`` (log sds): positive when ``a`` moves the error more."""
    rest = [d for d in table.dims if d not in (a, b, "seed")]
    with _quiet():
        t = table.mean(rest, skipna=True) if rest else table
        return _spread(t.mean(b, skipna=True), a) - _spread(t.mean(a, skipna=True), b)


def _dose_follows_target(dbs, metric):
    ds = _db(dbs, "dose")
    if ds.sizes["pretrain_domain"] < 3:
        raise NotMeasurable("three or more doses needed")
    doses = [float(d) for d in ds["pretrain_domain"].values]
    lowest = doses.index(min(doses))
    before = _log_stage(ds, "pretrain", metric)  # every evaluation dose
    low = per_seed(before.isel(pretrain_domain=lowest))
    others = per_seed(before.drop_isel(pretrain_domain=lowest))
    after = on_domain(_log_stage(ds, "transfer", metric), "target_domain")
    return [
        Contrast(f"pretrained at {min(doses):g} e⁻/Å² against the other doses", "greater",
                 (low - others).values),
        Contrast("target dose against pretraining dose after transfer", "greater",
                 _axis_spreads(after, "target_domain", "pretrain_domain").values),
    ]  # fmt: skip


def _transfer_matches_mixture(dbs, metric):
    base, transfer = _db(dbs, "baseline"), _db(dbs, "defocus")
    mix_err = _log_stage(base, "mixture", metric)
    t_err = on_domain(_log_stage(transfer, "transfer", metric), "target_domain")
    sizes = [int(n) for n in transfer["n_transfer"].values]
    out = []
    for a in base["domain_a"].values.tolist():
        for b in base["domain_b"].values.tolist():
            pa = match_index(transfer["pretrain_domain"].values, a)
            tb = match_index(transfer["target_domain"].values, b)
            if a == b or pa < 0 or tb < 0:
                continue
            diffs = []  # one per mixture holding as many b images as a transfer size
            for mix in base["mix"].values.tolist():
                n_b = int(str(mix).split(":")[1])
                if n_b not in sizes:
                    continue
                m = mix_err.sel(domain_a=a, domain_b=b, mix=mix)
                m = per_seed(m.isel(eval_domain=match_index(m["eval_domain"].values, b)))
                t = per_seed(t_err.isel(pretrain_domain=pa, target_domain=tb).sel(n_transfer=n_b))
                diffs.append((m - t).values)
            if diffs:
                with _quiet():
                    diff = np.nanmean(np.stack(diffs), axis=0)
                out.append(Contrast(f"mixture against transfer, {_name(a)} → {_name(b)} nm "
                                    f"({len(diffs)} sizes)", "within", diff))  # fmt: skip
    if not out:
        raise NotMeasurable("no mixture holds as many target images as a transfer run")
    return out


def _in_focus_pretraining_asymmetry(dbs, metric):
    ds = _db(dbs, "defocus")
    pre, tgt = ds["pretrain_domain"].values, ds["target_domain"].values
    if match_index(pre, IN_FOCUS_NM) < 0 or match_index(tgt, IN_FOCUS_NM) < 0:
        raise NotMeasurable("0 nm must be pretrained and targeted")
    after = on_domain(_log_stage(ds, "transfer", metric), "target_domain")
    own = on_domain(_log_stage(ds, "pretrain", metric), "pretrain_domain")

    def gap(p, t) -> xr.DataArray:  # transfer p → t above the model pretrained on t itself
        i, j = match_index(pre, p), match_index(tgt, t)
        return per_seed(after.isel(pretrain_domain=i, target_domain=j)) - per_seed(
            own.isel(pretrain_domain=match_index(pre, t))
        )

    both = [d for d in pre.tolist() if d != IN_FOCUS_NM and match_index(tgt, d) >= 0]
    if not both:
        raise NotMeasurable("no defocus transferred both ways")
    diff = sum(gap(d, IN_FOCUS_NM) - gap(IN_FOCUS_NM, d) for d in both) / len(both)
    return [Contrast("gap to focus against gap from focus", "greater", diff.values)]


def _structure_follows_target(dbs, metric):
    ds = _db(dbs, "structure")
    names = [str(n) for n in ds["pretrain_domain"].values]
    parts = {n: _parts(n) for n in names}
    if len({p[0] for p in parts.values()}) < 2 or len({p[1] for p in parts.values()}) < 2:
        raise NotMeasurable("two lattices and two sizes needed")
    after = on_domain(_log_stage(ds, "transfer", metric), "target_domain")
    before = on_domain(_log_stage(ds, "pretrain", metric), "target_domain")

    def effect(same: int) -> xr.DataArray:
        """Per seed: mean |Δ log error| on a target between pretraining sets equal in part
        ``same`` only (0: same lattice, other size; 1: same size, other lattice)."""
        diffs = [
            abs(before.sel(pretrain_domain=p) - before.sel(pretrain_domain=q))
            for i, p in enumerate(names) for q in names[i + 1 :]
            if parts[p][same] == parts[q][same] and parts[p] != parts[q]
        ]  # fmt: skip
        return per_seed(xr.concat(diffs, "pair"))

    return [
        Contrast("target set against pretraining set after transfer", "greater",
                 _axis_spreads(after, "target_domain", "pretrain_domain").values),
        Contrast("lattice against particle size before transfer", "greater",
                 (np.log(effect(1)) - np.log(effect(0))).values),
    ]  # fmt: skip


# --- the companion study: generalization without transfer, and onto experimental-like images --
def _gaps(ds: xr.Dataset, metric: str) -> dict[tuple, xr.DataArray]:
    """Per (training, test) pair of distinct domains that are both trained and tested: the log
    error on ``test`` of the models trained on ``training`` minus that of the models trained on
    ``test`` itself (the in-domain ideal), per seed."""
    err = _log_stage(ds, "pretrain", metric)  # train_domain, seed, eval_domain
    trains = ds["train_domain"].values.tolist()
    tests = err["eval_domain"].values
    out = {}
    for u in trains:
        j = match_index(tests, u)
        if j < 0:
            continue
        ideal = err.sel(train_domain=u).isel(eval_domain=j)
        for t in trains:
            if t != u:
                out[(t, u)] = err.sel(train_domain=t).isel(eval_domain=j) - ideal
    return out


def _mean_gap(ds: xr.Dataset, metric: str) -> np.ndarray:
    gaps = _gaps(ds, metric)
    if not gaps:
        raise NotMeasurable("two or more domains trained and tested needed")
    with _quiet():
        return xr.concat(list(gaps.values()), "pair").mean("pair", skipna=True).values


def _in_focus_generalizes(dbs, metric):
    ds = _db(dbs, "generalization-defocus")
    gaps = _gaps(ds, metric)
    focus = IN_FOCUS_NM
    both = [t for (t, u) in gaps if u == focus and (focus, t) in gaps]
    if not both:
        raise NotMeasurable("0 nm and another defocus trained and tested both ways needed")
    diff = sum(gaps[(d, focus)] - gaps[(focus, d)] for d in both) / len(both)
    return [Contrast("gap of other defoci on 0 nm against 0 nm on them", "greater", diff.values)]


def _not_scale_invariant(dbs, metric):
    ds = _db(dbs, "generalization-magnification")
    return [Contrast("other pixel size against the in-domain ideal", "greater",
                     _mean_gap(ds, metric))]  # fmt: skip


def _large_particles_generalize_worst(dbs, metric):
    ds = _db(dbs, "generalization-structure")
    by_size: dict[str, list] = {"small": [], "large": []}
    for (t, _), g in _gaps(ds, metric).items():
        size = _parts(t)[1]
        if size in by_size:
            by_size[size].append(g)
    if not by_size["small"] or not by_size["large"]:
        raise NotMeasurable("models trained on both sizes needed")
    with _quiet():
        mean = {k: xr.concat(v, "pair").mean("pair", skipna=True) for k, v in by_size.items()}
    return [Contrast("gap of large-particle models against small-particle models", "greater",
                     (mean["large"] - mean["small"]).values)]  # fmt: skip


def _conditions_shape_generalization(dbs, metric):
    return [
        Contrast(f"{series}: other {series} against the in-domain ideal", "greater",
                 _mean_gap(_db(dbs, f"generalization-{series}"), metric))
        for series in CONDITION_SERIES
    ]  # fmt: skip


def _heldout(dbs, metric, cases: tuple[str, ...]) -> xr.DataArray:
    """Log error on the experimental-like test images by (pretrain_domain, seed, case)."""
    ds = _db(dbs, "heldout")
    table = _log(_error(heldout_table(ds, metric), metric))
    if not set(cases) <= set(table["case"].values.tolist()):
        raise NotMeasurable(f"held-out cases {', '.join(cases)} needed")
    return table


def _synthetic_variants_matter(dbs, metric):
    before = _heldout(dbs, metric, ("before",)).sel(case="before", drop=True)
    variants = set(before["pretrain_domain"].values.tolist())
    pairs = {"support: fixed against varied thickness": ("fixed-support", "varied"),
             "size: large against small particles": ("large", "small")}  # fmt: skip
    if not all(set(p) <= variants for p in pairs.values()):
        raise NotMeasurable("variants varied, fixed-support, small and large needed")
    return [
        Contrast(name, "differs",
                 (before.sel(pretrain_domain=a) - before.sel(pretrain_domain=b)).values)
        for name, (a, b) in pairs.items()
    ]  # fmt: skip


def _transfer_rescues_experimental(dbs, metric):
    table = _heldout(dbs, metric, ("before", "after"))
    gain = per_seed(table.sel(case="before") - table.sel(case="after"))
    return [Contrast("before against after transfer", "greater", gain.values)]


def _size_bias_hurts_transfer(dbs, metric):
    table = _heldout(dbs, metric, ("after", "after-biased"))
    cost = per_seed(table.sel(case="after-biased") - table.sel(case="after"))
    return [Contrast("small particles only against unbiased images", "greater", cost.values)]


# --- the companion study: training dynamics ---------------------------------------------------
def first_epoch_table(dbs: Mapping[str, xr.Dataset], metric: str) -> dict[str, dict[str, Any]]:
    """Per ``generalization-<series>`` database, the models trained without transfer whose
    training domain is also a test domain (``trains``), each as rows (model × seed) of: ``early``,
    its log error on its own domain's validation images after its first epoch
    (:data:`EARLY_EPOCH`: its initial learning); ``own``, the kept model's log error on its own
    domain's test images; ``gap``, the kept model's mean gap to the in-domain ideal on the other
    domains' test images (:func:`_gaps`). Series with fewer than two such models are left out."""
    out = {}
    seeds = None
    for study in GENERALIZATION_STUDIES:
        ds = _db(dbs, study)
        if seeds is None:
            seeds = ds["seed"].values
        elif not np.array_equal(ds["seed"].values, seeds):
            raise NotMeasurable("the generalization databases must hold the same seeds")
        gaps = _gaps(ds, metric)
        trains = [t for t in ds["train_domain"].values.tolist() if any(k[0] == t for k in gaps)]
        if len(trains) < 2:
            continue
        if metric_var(metric, "history") not in ds:
            raise NotMeasurable(f"the {study} database holds no per-epoch scores")
        history = ds[metric_var(metric, "history")].sel(stage="pretrain", drop=True)
        first = _log(_error(history.sel(epoch=EARLY_EPOCH, drop=True), metric))
        first = on_domain(first, "train_domain")
        kept = on_domain(_log_stage(ds, "pretrain", metric), "train_domain")
        with _quiet():
            gap = [xr.concat([g for (a, _), g in gaps.items() if a == t], "pair").mean("pair")
                   for t in trains]  # fmt: skip
        out[study] = {
            "trains": trains,
            "early": np.stack([first.sel(train_domain=t).values for t in trains]),
            "own": np.stack([kept.sel(train_domain=t).values for t in trains]),
            "gap": np.stack([g.values for g in gap]),
        }
    return out


def rank_z(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per column (seed) of ``x`` and ``y`` (models × seeds): Fisher's z (``atanh``) of
    Spearman's rank correlation (Pearson's of the mid-ranks, as :func:`scipy.stats.spearmanr`)
    over the models with both values finite, ρ clipped to ±0.999; NaN with fewer than
    :data:`MIN_MODELS` models or no variation."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    rho = np.full(x.shape[1], np.nan)
    for n in np.unique(ok.sum(axis=0)):  # columns with as many models, ranked at once
        cols = np.flatnonzero(ok.sum(axis=0) == n)
        if n < MIN_MODELS:
            continue
        pick = ok[:, cols].T  # columns × models
        rx = stats.rankdata(x[:, cols].T[pick].reshape(len(cols), n), axis=1)
        ry = stats.rankdata(y[:, cols].T[pick].reshape(len(cols), n), axis=1)
        rx, ry = rx - rx.mean(axis=1, keepdims=True), ry - ry.mean(axis=1, keepdims=True)
        norm = np.sqrt((rx**2).sum(axis=1) * (ry**2).sum(axis=1))
        with np.errstate(all="ignore"):
            rho[cols] = np.where(norm > 0, (rx * ry).sum(axis=1) / norm, np.nan)
    return np.arctanh(np.clip(rho, -0.999, 0.999))


def _first_epoch_relation(dbs, metric, what: str) -> np.ndarray:
    """Per seed: :func:`rank_z` of the first-epoch error against ``what`` ("own", "gap") over
    the models of every series, each centred across the training domains of its series."""
    table = first_epoch_table(dbs, metric)
    if not table:
        raise NotMeasurable("two or more domains trained and tested in some series needed")
    with _quiet():
        x = np.concatenate([t["early"] - np.nanmean(t["early"], axis=0) for t in table.values()])
        y = np.concatenate([t[what] - np.nanmean(t[what], axis=0) for t in table.values()])
    return rank_z(x, y)


def _initial_learning_and_generalization(dbs, metric):
    return [Contrast("first-epoch error at home against the gap away from home", "differs",
                     _first_epoch_relation(dbs, metric, "gap"))]  # fmt: skip


def _initial_learning_and_accuracy(dbs, metric):
    return [Contrast("first-epoch error at home against the kept model's error there",
                     "differs", _first_epoch_relation(dbs, metric, "own"))]  # fmt: skip


RULES: tuple[Rule, ...] = (
    Rule(
        "F1", "the in-focus target is the hardest",
        "Of the defocus targets, the in-focus one is the hardest to segment.",
        ("000", "hardest for our models"),
        "After transfer, the error on each target (every pretraining, size, learning rate and "
        "freezing option averaged per seed): 0 nm against each other target.",
        _in_focus_hardest, ("defocus",),
    ),
    Rule(
        "F2", "the pretraining domain matters less after transfer",
        "After transfer, performance on the target depends little on the pretraining data, "
        "though it depends on it notably before transfer.",
        ("000", "fairly consistent in the transfer learning domain"),
        "On each target: the spread (sd of log errors) across pretraining defoci, of the "
        "pretrained models applied as they are against that of the transferred models, averaged "
        "over targets and configurations per seed.",
        _pretraining_matters_less, ("defocus",),
    ),
    Rule(
        "F3", "freezing the encoder costs more than the decoder",
        "Freezing the decoder during transfer costs little against training the whole network; "
        "freezing the encoder costs more.",
        ("", ""),
        "Paired by configuration (pretraining, target, size, learning rates, seed): the target "
        "error with the encoder frozen against the decoder frozen (must be positive), and with "
        "the decoder frozen against nothing frozen (must be below δ).",
        _freezing_costs, ("defocus",),
    ),
    Rule(
        "F4", "more transfer images: lower and narrower",
        "More transfer images lower the target error after transfer and narrow its spread over "
        "configurations.",
        ("", ""),
        "Paired by configuration: the target error with each transfer-set size against the next "
        "larger; and the spread (sd of log errors) across configurations at the smallest size "
        "against the largest, per seed.",
        _more_images_help, ("defocus",),
    ),
    Rule(
        "F5", "low dose hurts pretraining; transfer follows the target dose",
        "Models pretrained on the lowest dose are worse everywhere; after transfer the "
        "performance depends on the dose of the target.",
        ("002", "Models trained on low dose images are worse"),
        "(a) Before transfer, averaged over every evaluation dose: the models pretrained on the "
        "lowest dose against the others. (b) After transfer: the spread across target doses "
        "against the spread across pretraining doses, per seed.",
        _dose_follows_target, ("dose",),
    ),
    Rule(
        "F6", "transfer ≈ a mixture with the same target images",
        "With a comparable amount of target data, transfer and one training on a mixture of the "
        "two domains perform comparably on the target.",
        ("000", "seem comparable for similar amounts"),
        "For each pair of defoci (a → b) apart, over the mixtures whose count of b images "
        "equals a transfer-set size: the mixture's error on b against that of the transfers "
        "a → b with as many b images, per seed (each pair must lie within ±δ).",
        _transfer_matches_mixture, ("baseline", "defocus"),
    ),
    Rule(
        "F7", "pretraining in focus transfers better than the reverse",
        "Two domains can carry unequal information: pretraining on one may serve transfer to "
        "the other better than the reverse — here, in focus against out of focus.",
        ("000", "fundamental asymmetries"),
        "For every defocus d ≠ 0 transferred both ways: the gap of the transfer d → 0 nm above "
        "the model pretrained at 0 nm against the gap of 0 nm → d above the model pretrained on "
        "d, averaged over d per seed.",
        _in_focus_pretraining_asymmetry, ("defocus",),
    ),
    Rule(
        "F8", "structure: the target decides; size matters less than lattice",
        "After transfer, performance depends mostly on the target structure; particle size "
        "has a weak effect.",
        ("002", "mostly depends on the target domain structure"),
        "(a) After transfer: the spread across target sets against the spread across "
        "pretraining sets. (b) Before transfer: the change of a target's error between "
        "pretraining sets differing only in lattice against only in size, per seed.",
        _structure_follows_target, ("structure",),
    ),
    Rule(
        "F9", "the in-focus model carries out of its domain",
        "Models trained in focus, the hardest domain, do comparatively well outside it.",
        ("000", "better performance out-of-distribution"),
        "Models trained from scratch, for every defocus d ≠ 0 trained and tested both ways: the "
        "gap of the model trained on d above the in-domain ideal on 0 nm against the gap of the "
        "model trained in focus above the ideal on d, averaged over d per seed.",
        _in_focus_generalizes, ("generalization-defocus",),
    ),
    Rule(
        "G1", "no generalization across magnifications",
        "A segmentation network is not scale invariant: it does not carry to another "
        "magnification.",
        ("004", "CNNs are not scale invariant"),
        "Models trained without transfer on one pixel size: the error on every other pixel "
        "size against that of the models trained there (the in-domain ideal), averaged over "
        "pairs per seed.",
        _not_scale_invariant, ("generalization-magnification",),
    ),
    Rule(
        "G2", "trained on large particles, generalizes worst",
        "Networks trained on images of larger particles generalize the worst.",
        ("004", "larger nanoparticles generalize the worst"),
        "Without transfer: the gap to the in-domain ideal on the other test sets of models "
        "trained on large particles against those trained on small ones, per seed.",
        _large_particles_generalize_worst, ("generalization-structure",),
    ),
    Rule(
        "G3", "dose, defocus and support: a gap each",
        "The companion explored dose, defocus and the support besides magnification and size; "
        "we ask whether a model trained at one value of each falls short at another.",
        ("004", "We have explored the role"),
        "For each of the dose, defocus and substrate series without transfer: the error on "
        "every other domain against the in-domain ideal, averaged over pairs per seed.",
        _conditions_shape_generalization,
        tuple(f"generalization-{s}" for s in CONDITION_SERIES),
    ),
    Rule(
        "G4", "the synthetic variant changes the first experimental score",
        "Trained on simulations and applied to experimental images without transfer, networks "
        "behave differently depending on the particle and support geometry the simulations "
        "varied.",
        ("004", "nanoparticle and substrate geometry"),
        "Models trained from scratch on each synthetic variant, on the experimental-like test "
        "images: fixed against varied support thickness, and large against small particles, "
        "paired by seed (each must differ from 0, either way).",
        _synthetic_variants_matter, ("heldout",),
    ),
    Rule(
        "G5", "transfer overcomes a poor synthetic start",
        "Transfer learning can overcome a poor initial performance.",
        ("004", "can overcome poor initial performance"),
        "On the experimental-like test images: the error before transfer against after transfer "
        "on a few unbiased experimental-like images, averaged over the synthetic variants per "
        "seed.",
        _transfer_rescues_experimental, ("heldout",),
    ),
    Rule(
        "G6", "a size-biased transfer set costs accuracy",
        "Transfer learning suffers when the experimental images it uses are biased in particle "
        "size.",
        ("004", "contains particle size bias"),
        "On the experimental-like test images, paired by variant and seed: after transfer on "
        "images of small particles only against after transfer on as many unbiased images.",
        _size_bias_hurts_transfer, ("heldout",),
    ),
    Rule(
        "D1", "initial learning and generalization are related",
        "How a network learns early in training on its own domain is related to how well it "
        "generalizes to other domains.",
        ("004", "how initial learning is related"),
        "Models trained without transfer, every series: Spearman's rank correlation, across "
        "the models of a seed, between the error on the own domain's validation images after "
        "the first epoch and the kept model's mean gap to the in-domain ideal on the other "
        "domains' test images, both centred within each series (must differ from 0, either "
        "way).",
        _initial_learning_and_generalization, GENERALIZATION_STUDIES, "correlation",
    ),
    Rule(
        "D2", "initial learning and final accuracy are related",
        "How a network's performance develops during training is related to the accuracy it "
        "reaches.",
        ("004", "performance dynamics during training relate"),
        "Models trained without transfer, every series: Spearman's rank correlation, across "
        "the models of a seed, between the error on the own domain's validation images after "
        "the first epoch and the kept model's error on the own domain's test images, both "
        "centred within each series (must differ from 0, either way).",
        _initial_learning_and_accuracy, GENERALIZATION_STUDIES, "correlation",
    ),
)  # fmt: skip
RULE_KEYS = tuple(r.key for r in RULES)


def ruleset_data() -> list[dict[str, Any]]:
    """The rule set as data: every rule's text, sources and contrast code, and the decision's
    constants."""
    head = {"confidence": CONFIDENCE, "delta": DELTA, "error_floor": ERROR_FLOOR,
            "decide": inspect.getsource(decide), "combine": inspect.getsource(combine),
            "interval": inspect.getsource(t_intervals),
            "two_level": inspect.getsource(two_level_intervals),
            "image_variances": inspect.getsource(image_variances),
            "resampled": inspect.getsource(_resampled),
            "image_resamples": IMAGE_RESAMPLES, "early_epoch": EARLY_EPOCH,
            "min_models": MIN_MODELS}  # fmt: skip
    return [head, *(r.data() for r in RULES)]


@functools.cache
def ruleset_sha() -> str:
    """SHA-256 (first 16 hex digits) of :func:`ruleset_data`."""
    text = json.dumps(ruleset_data(), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stamp_attrs() -> dict[str, str]:
    """The attributes :func:`collect` stamps into every database."""
    return {RULESET_ATTR: ruleset_sha(), "ruleset_date": RULESET_DATE}


def collect(profile, root=".", studies=None, log: Callable[[str], None] = print) -> dict:
    """:func:`hrtem_book.results.collect`, each database stamped with this rule set."""
    return collect_databases(profile, root, studies, attrs=stamp_attrs(), log=log)


def stale(dbs: Mapping[str, xr.Dataset]) -> dict[str, str]:
    """Databases stamped with another rule set (or none): name → the stamp they carry."""
    sha = ruleset_sha()
    return {
        name: str(ds.attrs.get(RULESET_ATTR, "none"))
        for name, ds in dbs.items()
        if ds.attrs.get(RULESET_ATTR) != sha
    }


def score(
    rule: Rule,
    dbs: Mapping[str, xr.Dataset],
    metric: str = "loss",
    image_var: Mapping[tuple[str, str], tuple[float, int]] | None = None,
) -> Finding:
    """One rule on ``dbs``: its contrasts decided, combined, and said in one sentence.
    ``image_var``: :func:`image_variances` of ``dbs`` (None: computed here for this rule)."""
    base = {"key": rule.key, "title": rule.title, "claim": rule.claim,
            "rule": rule.statistic, "metric": metric}  # fmt: skip
    old = {s: v for s, v in stale({s: dbs[s] for s in rule.studies if s in dbs}).items()}
    if old:
        what = ", ".join(f"{s} (stamp {v})" for s, v in old.items())
        return Finding(**base, verdict=STALE, summary=(
            f"Not scored: {what} carries another rule set than this code's {ruleset_sha()}; "
            "collect the databases again (`hrtem-book collect`)."))  # fmt: skip
    try:
        contrasts = rule.contrasts(dbs, metric)
    except NotMeasurable as exc:
        return Finding(**base, verdict=UNMEASURABLE, summary=f"Not measurable here: {exc}.")
    if image_var is None:
        image_var = image_variances(dbs, metric, rules=(rule,))
    scale = SCALES[rule.scale]
    tested = tuple(
        test_contrast(c, scale.delta, *image_var.get((rule.key, c.name), (math.nan, 0)),
                      scale=scale.name)
        for c in contrasts
    )  # fmt: skip
    if any(t.n_seeds < 2 for t in tested):
        why = "Not measurable here: two or more seeds with every pair needed."
        return Finding(**base, verdict=UNMEASURABLE, summary=why, intervals=tested)
    verdict = combine([t.verdict for t in tested])
    what = scale.what.format(error=get_metric(metric).error_name)
    parts = "; ".join(f"{t.name}: {t.text()} ({t.verdict})" for t in tested)
    units = "seeds and test images" if all(t.images for t in tested) else "seeds"
    summary = (
        f"{what}, mean over {tested[0].n_seeds} seeds with its "
        f"{CONFIDENCE:.0%} interval over {units} — {parts}."
    )
    numbers = {t.name: {"estimate": t.estimate, "low": t.low, "high": t.high,
                        "kind": t.kind, "verdict": t.verdict} for t in tested}  # fmt: skip
    return Finding(**base, verdict=verdict, summary=summary, numbers=numbers, intervals=tested)


# --- the test images as a sampling unit --------------------------------------------------------
IMAGE_RESAMPLES = 200  # bootstrap resamples of the test images behind each image variance
_RESAMPLE_BATCH = 50  # resamples evaluated at once (memory: seeds × this)


def _image_keys(dbs: Mapping[str, xr.Dataset]) -> dict[tuple[str, str], int]:
    """(series, evaluation domain) → its number of test images, over every database with
    per-image scores: a domain's test images are the same in every database of its series."""
    keys: dict[tuple[str, str], int] = {}
    for ds in dbs.values():
        if "image_loss" not in ds:
            continue
        n = ds["image_loss"].notnull().sum("test_image")
        for e, dom in enumerate(ds["eval_domain"].values.tolist()):
            count = int(n.isel(eval_domain=e).max())
            if count >= 2:
                key = (str(ds.attrs.get("series")), _name(dom))
                keys[key] = max(keys.get(key, 0), count)
    return keys


def _resampled(ds: xr.Dataset, draws: Mapping[tuple[str, str], np.ndarray]) -> xr.Dataset:
    """``ds`` with every ``final_<m>`` recomputed on resamples of its test images: ``draws``
    maps (series, domain) → image indices [B, n]; the result stacks B databases along
    ``seed`` (resample-major: resample b holds seeds b·S … b·S + S − 1)."""
    n_seeds = ds.sizes["seed"]
    n_draws = len(next(iter(draws.values())))
    keep = [v for v in ds.data_vars if v.startswith("final_") or v == "status"]
    out = ds[keep].isel(seed=np.tile(np.arange(n_seeds), n_draws))
    out = out.assign_coords(seed=np.arange(n_seeds * n_draws))
    if "image_loss" not in ds:
        return out
    series = str(ds.attrs.get("series"))
    for e, dom in enumerate(ds["eval_domain"].values.tolist()):
        idx = draws.get((series, _name(dom)))
        if idx is None:
            continue
        at = xr.DataArray(idx, dims=("draw", "test_image"))
        loss = ds["image_loss"].isel(eval_domain=e).isel(test_image=at)
        counts = ds["image_counts"].isel(eval_domain=e).isel(test_image=at)
        with _quiet():
            values = {"loss": loss.mean("test_image", skipna=False)}
            tp, fp, fn = (counts.sel(count=c).sum("test_image", skipna=False) for c in COUNTS)
            values["dice"] = xr.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 1.0)
            values["iou"] = xr.where(tp + fp + fn > 0, tp / (tp + fp + fn), 1.0)
        for m, da in values.items():
            da = da.where(loss.notnull().all("test_image"))
            stacked = da.stack(stacked=("draw", "seed")).transpose(..., "stacked")
            var = out[metric_var(m)]
            order = [d if d != "seed" else "stacked" for d in var.dims if d != "eval_domain"]
            var.values[(slice(None),) * var.dims.index("eval_domain") + (e,)] = stacked.transpose(
                *order
            ).values
    return out


def image_variances(
    dbs: Mapping[str, xr.Dataset],
    metric: str = "loss",
    rules: tuple[Rule, ...] | None = None,
    n_resamples: int = IMAGE_RESAMPLES,
    seed: int = 0,
) -> dict[tuple[str, str], tuple[float, int]]:
    """(rule key, contrast name) → (variance of the contrast's seed mean over resamples of the
    test images, the fewest test images behind it).

    Every domain's test images are resampled with replacement, independently of the other
    domains' and identically for every model scored on them (the models share them); the
    databases' scores are recomputed from their per-image values and every rule's contrasts
    evaluated again. The resampling is :func:`scipy.stats.bootstrap`'s (independent samples,
    one per domain; its ``standard_error``). Contrasts of databases without per-image scores
    are left out (their intervals take the seeds as the only unit)."""
    rules = tuple(r for r in (RULES if rules is None else rules) if SCALES[r.scale].images)
    keys = _image_keys(dbs)
    if not keys:
        return {}
    names: list[tuple[str, str]] = []
    n_min: dict[tuple[str, str], int] = {}
    min_images = min(keys.values())
    for rule in rules:
        try:
            for c in rule.contrasts(dbs, metric):
                names.append((rule.key, c.name))
                n_min[(rule.key, c.name)] = min_images
        except NotMeasurable:
            continue
    if not names:
        return {}
    order = list(keys)

    def statistic(*idx, axis=-1):
        batched = np.ndim(idx[0]) > 1  # scipy passes [batch, n] resamples, or the data [n]
        idx = [np.atleast_2d(np.asarray(i)) for i in idx]
        draws = dict(zip(order, idx, strict=True))
        b = len(idx[0])
        resampled = {name: _resampled(ds, draws) for name, ds in dbs.items()}
        out = np.full((len(names), b), np.nan)
        row = {n: i for i, n in enumerate(names)}
        for rule in rules:
            try:
                contrasts = rule.contrasts(resampled, metric)
            except NotMeasurable:
                continue
            for c in contrasts:
                if (rule.key, c.name) in row:
                    per = np.asarray(c.per_seed, float).reshape(b, -1)
                    with _quiet():
                        out[row[(rule.key, c.name)]] = np.nanmean(per, axis=1)
        return out if batched else out[:, 0]

    data = tuple(np.arange(keys[k]) for k in order)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resampling distributions (no image data)
        res = stats.bootstrap(
            data, statistic, paired=False, vectorized=True, n_resamples=n_resamples,
            batch=_RESAMPLE_BATCH, method="percentile", rng=np.random.default_rng(seed),
        )  # fmt: skip
    se = np.atleast_1d(res.standard_error)
    return {name: (float(se[i]) ** 2, n_min[name]) for i, name in enumerate(names)}


def _fingerprint(dbs: Mapping[str, xr.Dataset], metric: str) -> str:
    """What :func:`image_variances` depends on: the rule set, the metric and the databases'
    scores and coordinates (SHA-256)."""
    h = hashlib.sha256(f"{ruleset_sha()}|{metric}|{IMAGE_RESAMPLES}".encode())
    for name in sorted(dbs):
        ds = dbs[name]
        h.update(f"{name}|{ds.attrs.get('series')}|{dict(ds.sizes)}".encode())
        for coord in sorted(ds.coords):
            h.update(np.asarray(ds[coord].values).astype(str).tobytes())
        for var in sorted(v for v in ds.data_vars if v.startswith(("final_", "image_"))):
            h.update(var.encode() + np.ascontiguousarray(ds[var].values, float).tobytes())
    return h.hexdigest()


def cached_image_variances(
    dbs: Mapping[str, xr.Dataset],
    metric: str,
    path: Path,
    log: Callable[[str], None] = print,
) -> dict[tuple[str, str], tuple[float, int]]:
    """:func:`image_variances`, kept in ``path`` (:func:`~hrtem_book.layout.cached_json`) under
    the fingerprint of what it depends on: the book's chapters read it instead of resampling
    again; a cache of other databases is remade."""

    def make() -> dict[str, list]:
        return {"\t".join(k): [v, n] for k, (v, n) in image_variances(dbs, metric).items()}

    def decode(value: dict) -> dict[tuple[str, str], tuple[float, int]]:
        return {tuple(k.split("\t", 1)): (float(v), int(n)) for k, (v, n) in value.items()}

    return cached_json(path, _fingerprint(dbs, metric), make, decode, log, "findings")


def evaluate(
    dbs: Mapping[str, xr.Dataset],
    metric: str = "loss",
    image_var: Mapping[tuple[str, str], tuple[float, int]] | None = None,
) -> dict[str, Finding]:
    """Every rule of :data:`RULES` on ``dbs`` (study name → database), by key; ``image_var``:
    their :func:`image_variances` when already at hand (e.g. :func:`cached_image_variances`)."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; allowed: {', '.join(METRICS)}")
    if image_var is None:
        image_var = image_variances(dbs, metric)
    return {rule.key: score(rule, dbs, metric, image_var) for rule in RULES}


def get_rule(key: str) -> Rule:
    for rule in RULES:
        if rule.key == key:
            return rule
    raise ValueError(f"rule {key!r}; allowed: {', '.join(RULE_KEYS)}")


# --- descriptive numbers for the companion chapter's figures ----------------------------------
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
    columns = {t: j for t in trains if (j := match_index(tests, t)) >= 0}
    ideal = {t: float(med.sel(train_domain=t).values[j]) for t, j in columns.items()}
    deviation = deviation_from_ideal(med.rename(eval_domain="test_domain"))
    gaps = {}
    for t in trains:
        for u, j in columns.items():
            v = float(deviation.sel(train_domain=t).values[j])
            if u != t and math.isfinite(v):  # NaN where either error is
                gaps[(t, u)] = v
    return {
        "gaps": gaps,
        "seed_sd": _seed_sd(own),  # NaN from fewer than two seeds
        "mean_gap": float(np.mean(list(gaps.values()))) if gaps else math.nan,
        "ideal": {t: _value(v, metric) for t, v in ideal.items()},
    }


def collect_and_count(profile: Profile, root: str | Path = ".") -> list[str]:
    """``hrtem-book collect``: :func:`collect`, then one line per database with its runs by
    status (none when there are no records)."""
    lines = []
    for study, path in collect(profile, root).items():
        ds = load_database(path, study)
        counts = {s: int((ds["status"] == s).sum()) for s in STATUS_VALUES}
        lines.append(f"{path}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return lines
