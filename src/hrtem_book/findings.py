"""The studies' findings scored on the results databases, each with a verdict.

F1-F9 are the transfer-learning study's (Rangel DaCosta et al.), G1-G6 its companion's (Sytwu et
al.: how far a network trained without transfer generalizes, G1-G3, and how synthetic training
carries to experimental-like images, G4-G6), D1-D2 the companion's statements on training
dynamics (how a model's first epoch relates to its generalization and its accuracy). Each is a
:class:`~hrtem_book.evidence.Rule` of the study module whose database it reads
(:mod:`hrtem_book.studies`); how a rule is decided is :mod:`hrtem_book.evidence`'s. Here they
are scored: every contrast decided on its interval, the contrasts combined, one sentence with
the numbers.

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

The rank-correlation rules (D1, D2) take the seeds as the only unit: with no relation, each
seed's correlation is centred on zero whichever test images were drawn (the first epoch is
scored on validation images, and a test image's sampling error moves every seed's final scores
alike), so the test images widen nothing a false pass depends on; what they do cost is power,
which the simulation includes.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from scipy import stats

from .analysis import ERROR_FLOOR
from .analysis import domain_name as _name
from .analysis import quiet as _quiet
from .database import COUNTS, STATUS_VALUES, metric_var
from .evidence import (
    CONFIDENCE,
    DELTA,
    MIN_MODELS,
    SCALES,
    STALE,
    UNMEASURABLE,
    Finding,
    NotMeasurable,
    Rule,
    combine,
    decide,
    t_intervals,
    test_contrast,
    two_level_intervals,
)
from .layout import cached_json
from .metrics import METRICS, get_metric
from .profiles import Profile
from .results import collect as collect_databases
from .results import load_database
from .studies import RULES
from .studies.generalization import EARLY_EPOCH

# the code of image_variances and _resampled is hashed into the rule set and names the shared
# analysis as it did when the rule set was fixed (_name, _quiet)
RULESET_ATTR = "ruleset_sha"  # database attribute holding the stamp
# when the rule set last changed, and its hash then (a test keeps the two in step with the code)
RULESET_DATE = "2026-12-08"
RULESET_SHA = "478009747a9a8d3e"
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


def collect_and_count(profile: Profile, root: str | Path = ".") -> list[str]:
    """``hrtem-book collect``: :func:`collect`, then one line per database with its runs by
    status (none when there are no records)."""
    lines = []
    for study, path in collect(profile, root).items():
        ds = load_database(path, study)
        counts = {s: int((ds["status"] == s).sum()) for s in STATUS_VALUES}
        lines.append(f"{path}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return lines
