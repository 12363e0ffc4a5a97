"""How a claim of the studies is tested: the rule format, its intervals and its decision.

A finding (:mod:`hrtem_book.findings`) is a :class:`Rule` written as data: the claim (our
words, no stronger than the source sentence it cites), its contrasts and the decision. A
**contrast** is a paired comparison measured once per seed: the mean, over every cell of the
grid it pairs, of a difference of log errors (error = the loss, or 1 − Dice / 1 − IoU, so lower
is better and a difference of logs is a relative change). The seed is the unit — models of one
seed share nothing with those of another, while the transfer models of one seed share their
pretrained model — so the interval of a contrast is the Student-t interval of the mean of its
per-seed values (:func:`scipy.stats.ttest_1samp`), widened by the sampling error of the test
images where the databases hold them image by image (:func:`two_level_intervals`), and a
contrast is decided on that interval against ``0`` and the smallest effect the claim would mean,
:data:`DELTA` (a 10 % relative change: the sources give no size of their own):

- ``greater`` (the claim: the contrast is positive): *holds* when the interval lies above 0,
  *does not hold* when it lies below δ (an effect the claim would mean is excluded);
- ``below`` (the claim: a cost that is small): *holds* when the interval lies below δ, *does
  not hold* when it lies above δ;
- ``within`` (the claim: two ways do about as well): *holds* when the interval lies inside
  (−δ, δ), *does not hold* when it lies outside;
- ``differs`` (the claim: a choice matters, either way): *holds* when the interval excludes 0,
  *does not hold* when it lies inside (−δ, δ);

and *inconclusive at this scale* otherwise.

Rules that relate two quantities across models rather than compare two errors (the dynamics
rules D1, D2) have as contrast, per seed, Spearman's rank correlation across models on Fisher's
z scale (:func:`rank_z`), decided the same way with the smallest correlation a claimed relation
would mean, :data:`RHO_DELTA` (0.3, Cohen's "medium" correlation; J. Cohen, *Statistical Power
Analysis for the Behavioral Sciences*, 2nd ed., 1988, §3.2), in place of δ. Each rule's
:class:`Scale` says which.

A finding with several contrasts holds when every one holds (an intersection-union test: no
correction needed), does not hold when any does not, and is inconclusive otherwise
(:func:`combine`). Why not a bootstrap over seeds: with three seeds the resampling distribution
of a mean has ten points, and a 95 % percentile interval excludes 0 whenever the three share a
sign — a quarter of the time with no effect at all. The t interval keeps its level with three
seeds; its price is power, which :mod:`hrtem_book.power` measures per rule.

Nothing here reads a database or knows a study: the studies (:mod:`hrtem_book.studies`) write
their rules in this format, and :mod:`hrtem_book.findings` scores them.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._lazy import LazyModule

xr = LazyModule("xarray")  # imported on first use (hrtem_book._lazy)
stats = LazyModule("scipy.stats")  # imported on first use (hrtem_book._lazy)

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive at this scale"
UNMEASURABLE, STALE = "not measurable", "not scored: database of another rule set"
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE, UNMEASURABLE, STALE)
KINDS = ("greater", "below", "within", "differs")
CONFIDENCE = 0.95  # two-sided level of every interval
DELTA = math.log(1.10)  # smallest effect a claim means: a 10 % relative change of the error
RHO_DELTA = 0.3  # smallest rank correlation a claimed relation means (module docstring)
MIN_MODELS = 4  # models a rank correlation needs (per seed)


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


# --- what a rule's error rates are measured against (hrtem_book.power) ------------------------
# a plant: (cell {axis: value}, stage, eval_domain, delta) -> log error added to that score
Plant = Callable[[dict, str, Any, float], float]


def no_plant(cell, stage, ev, d) -> float:
    """Nothing planted."""
    return 0.0


def centred(values, value) -> float:
    """Unit-sd (ddof 1) centred score of ``value`` among ``values``."""
    values = list(values)
    if len(values) < 2 or value not in values:
        return 0.0
    v = np.arange(len(values), dtype=float)
    return float(((v - v.mean()) / v.std(ddof=1))[values.index(value)])


@dataclass(frozen=True)
class Scenario:
    """What the simulated databases of a rule's error rates hold (:mod:`hrtem_book.power`): a
    description and the planted effect, in units of the rule's δ; ``first_epoch`` = (target,
    sign): the models' first-epoch errors relate to their ``target`` score ("own", "gap") with
    ``sign`` × the smallest claimed rank correlation (the dynamics rules), None: not simulated."""

    what: str
    plant: Plant
    first_epoch: tuple[str, float] | None = None


NO_EFFECT = Scenario("no effect", no_plant)
