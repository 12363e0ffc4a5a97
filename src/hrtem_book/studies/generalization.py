"""The companion study's models trained without transfer (Sytwu et al.): one
``generalization-<series>`` study per series (defocus, dose, structure, magnification,
substrate), axes ``train_domain, seed``; each model is one pretraining on ``train_domain``
evaluated on every domain of its series (the database's ``eval_domain`` is the test domain).

Its findings: F9 (the transfer study's in-focus model out of its domain), G1-G3 (how far a model
generalizes: magnification, particle size, the imaging conditions and the support) and D1-D2
(how a model's first epoch relates to its generalization and its accuracy). ``generalization``
names the whole group on the command line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._lazy import LazyModule
from ..analysis import deviation_from_ideal, median, seed_sd
from ..analysis import error as _error
from ..analysis import final_error as _stage
from ..analysis import gaps as _gaps
from ..analysis import log_error as _log
from ..analysis import log_final as _log_stage
from ..analysis import mean_gap as _mean_gap
from ..analysis import quiet as _quiet
from ..analysis import study_db as _db
from ..analysis import value as _value
from ..config import DataConfig
from ..database import metric_var, on_domain
from ..evidence import (
    NO_EFFECT,
    RHO_DELTA,
    Contrast,
    NotMeasurable,
    Rule,
    Scenario,
    no_plant,
    rank_z,
)
from ..series import GENERALIZATION_SERIES, match_index
from ..series import split_structure_domain as _parts
from .defocus import IN_FOCUS_NM
from .grid import PAPER_SEEDS, PAPER_TRANSFER_FIXED, PRETRAIN, StudySpec

xr = LazyModule("xarray")  # imported on first use (hrtem_book._lazy)

# the rules' code is hashed into the rule set (findings.ruleset_sha) and names the shared
# analysis as it did when the rule set was fixed

# the companion's models trained without transfer, one database per series (D1, D2)
GENERALIZATION_STUDIES = tuple(f"generalization-{s}" for s in GENERALIZATION_SERIES)
GROUPS = {"generalization": GENERALIZATION_STUDIES}
# the series of the companion's finding G3 (imaging conditions and support)
CONDITION_SERIES = ("dose", "defocus", "substrate")
EARLY_EPOCH = 1  # a model's initial learning: its validation error after its first epoch


def _paper_values(data: DataConfig, series: str) -> dict[str, tuple]:
    """Every domain of the series as a training domain, three replicates."""
    return {"train_domain": data.domains(series), "seed": PAPER_SEEDS}


SPECS = tuple(
    StudySpec(
        name=f"generalization-{series}",
        series=series,
        kind=PRETRAIN,
        axes=("train_domain", "seed"),
        domain_axes=("train_domain",),
        paper=_paper_values,
        fixed={"pretrain_lr": PAPER_TRANSFER_FIXED["pretrain_lr"]},
        description=f"Trained on one {series} domain, tested on every one (no transfer).",
    )
    for series in GENERALIZATION_SERIES
)


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


# --- descriptive numbers for the companion chapter's figures ------------------------------------
def generalization_gaps(ds: xr.Dataset, metric: str = "dice") -> dict[str, Any]:
    """Off-diagonal gaps of a ``generalization-<series>`` database on the error scale.

    ``gaps[(train, test)]``: median (over seeds) error on ``test`` of the models trained on
    ``train`` minus that of the models trained on ``test`` itself (the in-domain ideal;
    positive = worse), for every pair of distinct training domains that are also test domains.
    ``seed_sd``: median over the training domains of the seed-to-seed (sample) standard
    deviation of the in-domain error; NaN with fewer than two seeds. ``mean_gap``: mean of the gaps.
    """
    err = _stage(ds, "pretrain", metric)  # train_domain, seed, eval_domain
    med = median(err, ["train_domain", "eval_domain"])
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
        "seed_sd": seed_sd(own),  # NaN from fewer than two seeds
        "mean_gap": float(np.mean(list(gaps.values()))) if gaps else math.nan,
        "ideal": {t: _value(v, metric) for t, v in ideal.items()},
    }


# --- the error rates' scenarios (hrtem_book.power) ----------------------------------------------
def scenarios(coords: dict[str, dict]) -> dict[str, tuple[list[Scenario], Scenario]]:
    """Its rules' error-rate scenarios on ``coords`` (:func:`hrtem_book.studies.scenarios`)."""

    def f9(cell, st, ev, d):
        return d * (ev == IN_FOCUS_NM and cell["train_domain"] != IN_FOCUS_NM)

    def off_domain(cell, st, ev, d):
        return d * (ev != cell["train_domain"])

    def g2(cell, st, ev, d):
        return off_domain(cell, st, ev, d) * (_parts(cell["train_domain"])[1] == "large")

    def first_epoch(target: str, what: str) -> tuple[list[Scenario], Scenario]:
        null = Scenario("first epoch unrelated", no_plant, (target, 0.0))
        related = Scenario(f"a rank correlation of {RHO_DELTA:g} with the {what}", no_plant,
                           (target, 1.0))  # fmt: skip
        return [null], related

    return {
        "F9": ([NO_EFFECT], Scenario("models trained off focus δ worse on 0 nm", f9)),
        "G1": ([NO_EFFECT], Scenario("every other pixel size δ worse than the ideal", off_domain)),
        "G2": ([NO_EFFECT], Scenario("large-particle models δ worse off their domain", g2)),
        "G3": ([NO_EFFECT], Scenario("every other domain δ worse than the ideal", off_domain)),
        "D1": first_epoch("gap", "gap away from home"),
        "D2": first_epoch("own", "error at home"),
    }
