"""Error rates of the findings' rules, measured by simulation.

For each rule of :mod:`hrtem_book.findings` and a profile's grid, databases are simulated many
times over — the profile's axes and seeds, seed noise at the level measured on a laptop build,
and either **no effect** or the **smallest effect the claim means** (:data:`evidence.DELTA`, a
10 % relative change of the error) planted where the claim puts it (the ``scenarios`` of the
rule's study module, :func:`hrtem_book.studies.scenarios`) — and the rule is run on each.
The share of draws that *hold* with no effect is the rule's **false-pass rate**; with the
smallest effect, its **power**; the share that *does not hold* with that effect, its
**false-fail rate**. A rule with several contrasts has one null per contrast family (e.g. F3:
nothing costs anything; the decoder costs δ and the encoder 2δ): its false-pass rate is the
largest over them.

Noise model (log error, per value): a model term of sd :data:`SIGMA_MODEL` shared by every
score of one model, and a score term of sd :data:`SIGMA_SCORE` per evaluation domain; a
transferred model inherits a share :data:`RHO` of its pretrained model's term. Total ≈ 0.14, the
seed-to-seed spread measured on the laptop databases of commit 3941258 (fp32, AVX2): median
relative sd of the kept models' error 0.09-0.15 by study and stage (loss), 0.06-0.12 (1 − Dice).
The test images add a **test-set term** of sd :data:`SIGMA_SET` per (series, evaluation domain)
and draw, shared by every model scored on those images (the sampling error of one set of test
images). The rule's interval then takes the images as a second unit
(:func:`evidence.two_level_intervals`): its image variance is, per contrast, SIGMA_SET² times the
sum of the squared sensitivities of the contrast to each domain's term (finite differences on
:data:`N_DESIGN_DRAWS` draws with the smallest claimed effect, once per rule and profile), with
the sampling noise of a variance estimated from the domain's test images (χ² with n − 1 degrees
of freedom) — what the bootstrap over images estimates on a real database, short of the
interaction of models and images.
Draws are simulated at once: draw ``d`` holds seeds ``d·S … d·S + S − 1`` of one database.

The dynamics rules (D1, D2) relate a model's first-epoch error to a final score. Their databases
add that first-epoch validation error on each model's own domain, :data:`SIGMA_EARLY` around
:data:`EARLY_ERROR` (log error), drawn independently of everything else (no effect) or with
the smallest claimed rank correlation, :data:`evidence.RHO_DELTA`, to the final score the rule
reads (:func:`plant_first_epoch`).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from . import evidence, findings
from .analysis import domain_name, quiet
from .layout import cached_json
from .profiles import get_profile
from .results import empty_database
from .series import match_index
from .studies import build_grid, get_study, scenarios
from .studies.generalization import EARLY_EPOCH, first_epoch_table

SIGMA_MODEL = 0.10  # sd of a model's log error shared by all its scores
SIGMA_SCORE = 0.10  # sd of one score's log error (one evaluation domain)
RHO = 0.5  # share of a transferred model's model term inherited from its pretraining
# sd of the log error of a set of 16 test images from sampling its images: the bootstrap over
# the test images of 18 laptop pretrainings (defocus, structure and held-out series, commit
# 0091e57, AVX2) on each of their evaluation domains: median 0.109 (loss), 0.120 (1 − Dice)
SIGMA_SET = 0.12
N_DESIGN_DRAWS = 50  # draws behind each contrast's image variance
DESIGN_SEED = 20261207  # the random numbers of those draws
_STEP = 0.01  # finite-difference step of a domain's test-set term (log error)
BASE_ERROR = 0.15  # error level of the simulated models (loss; 1 − Dice alike)
N_DRAWS = 1000
EARLY_ERROR = 0.5  # error level after the first epoch (between ln 2 at the start and the end)
SIGMA_EARLY = 0.2  # its sd across models (log error)
_MODEL_AXES = ("pretrain_domain", "pretrain_lr", "seed")  # what a pretraining depends on


def _as_metrics(error):
    """A simulated error (the loss) as each metric's value: loss, Dice = 1 − error and IoU =
    Dice / (2 − Dice); numbers and arrays alike."""
    return {"loss": error, "dice": 1.0 - error, "iou": (1.0 - error) / (1.0 + error)}


def plant_first_epoch(dbs: dict, target: str, z: float, rng: np.random.Generator) -> None:
    """Write each generalization model's first-epoch log error on its own domain
    (``history_<m>`` at :data:`EARLY_EPOCH`): ``tanh(z)`` times the model's ``target``
    score of :func:`first_epoch_table` ("own", "gap"; centred within its series and
    seed, scaled to unit sd over every model and draw), plus independent noise making up the
    rest of a unit variance; then × :data:`SIGMA_EARLY` around log :data:`EARLY_ERROR`. The
    population rank correlation is then about ``tanh(z)`` (Pearson's of a normal pair)."""
    try:
        table = first_epoch_table(dbs, "loss")
    except evidence.NotMeasurable:  # (one seed: the rule cannot be decided, nothing to plant)
        return
    rho = math.tanh(z)
    centred = {s: t[target] - np.nanmean(t[target], axis=0) for s, t in table.items()}
    sd = float(np.nanstd(np.concatenate([c.ravel() for c in centred.values()])))
    for study, t in table.items():
        ds = dbs[study]
        noise = rng.standard_normal(centred[study].shape)
        early = rho * np.nan_to_num(centred[study] / (sd or 1.0)) + math.sqrt(1 - rho**2) * noise
        error = np.exp(math.log(EARLY_ERROR) + SIGMA_EARLY * early)  # trains × seeds
        ev = ds["eval_domain"].values
        for i, train in enumerate(t["trains"]):
            at = {"train_domain": train, "stage": "pretrain", "epoch": EARLY_EPOCH,
                  "eval_domain": ev[match_index(ev, train)]}  # fmt: skip
            for m, value in _as_metrics(error[i]).items():
                ds[f"history_{m}"].loc[at] = value


def simulate(study: str, coords: dict, eval_domains, plant: evidence.Plant, n_draws: int,
             rng: np.random.Generator, delta: float = evidence.DELTA,
             offsets: dict[str, np.ndarray] | None = None) -> xr.Dataset:  # fmt: skip
    """``n_draws`` databases of ``study`` on ``coords`` as one, seeds stacked (module doc);
    ``offsets``: each evaluation domain's test-set term per draw (by domain name), if any."""
    spec = get_study(study)
    n_seeds = len(coords["seed"])
    coords = {**coords, "seed": tuple(range(n_draws * n_seeds))}
    ds = empty_database(study, coords, eval_domains, 1, profile="simulated")
    var = ds["final_loss"]
    sizes = dict(var.sizes)
    axes = [a for a in spec.axes if a != "seed"]
    own_dims = [*spec.axes]
    if spec.kind.loads_pretraining:
        pre_dims = [a for a in spec.axes if a in _MODEL_AXES]
    else:
        pre_dims = own_dims

    def normal(dims) -> xr.DataArray:
        return xr.DataArray(rng.standard_normal([sizes[d] for d in dims]), dims=dims)

    z_pre = SIGMA_MODEL * normal(pre_dims) + SIGMA_SCORE * normal([*pre_dims, "eval_domain"])
    if spec.kind.loads_pretraining:
        own = SIGMA_MODEL * (RHO * normal(pre_dims) + math.sqrt(1 - RHO**2) * normal(own_dims))
        z_own = own + SIGMA_SCORE * normal([*own_dims, "eval_domain"])
        noise = xr.concat([z_pre.broadcast_like(z_own), z_own], "stage")
    else:
        noise = z_pre.expand_dims(stage=1)
    noise = noise.assign_coords(stage=list(spec.stages)).transpose(*var.dims)
    effect = np.zeros([sizes[d] for d in var.dims if d != "seed"])
    excluded = np.zeros([sizes[a] for a in axes], bool)
    dims_wo_seed = [d for d in var.dims if d != "seed"]
    for idx in np.ndindex(*effect.shape):
        at = dict(zip(dims_wo_seed, idx, strict=True))
        cell = {a: coords[a][at[a]] for a in axes}
        first, second = (cell.get(a, cell.get("train_domain")) for a in (spec.domain_axes * 2)[:2])
        if spec.kind.excludes_diagonal and first == second:
            excluded[tuple(at[a] for a in axes)] = True
        stage = spec.stages[at["stage"]]
        effect[idx] = plant(cell, stage, ds["eval_domain"].values[at["eval_domain"]], delta)
    log_err = math.log(BASE_ERROR) + noise + xr.DataArray(effect, dims=dims_wo_seed)
    if offsets:
        names = [domain_name(d) for d in ds["eval_domain"].values.tolist()]
        per_seed = np.stack(
            [np.repeat(offsets.get(n, np.zeros(n_draws)), n_seeds) for n in names], axis=-1
        )
        log_err = log_err + xr.DataArray(per_seed, dims=("seed", "eval_domain"))
    mask = xr.DataArray(~excluded, dims=axes)
    err = np.exp(log_err).where(mask).transpose(*var.dims)
    for m, value in _as_metrics(err.values).items():
        ds[f"final_{m}"].values[...] = value
    ok = mask.broadcast_like(ds["status"]).transpose(*ds["status"].dims).values
    ds["status"].values[...] = np.where(ok, "ok", "excluded")
    ds.attrs.update(findings.stamp_attrs())
    return ds


def simulate_rule(
    grids: dict,
    scenario: evidence.Scenario,
    n_draws: int,
    rng: np.random.Generator,
    scale: float = 1.0,
    offsets: dict[str, dict] | None = None,
) -> dict[str, xr.Dataset]:
    """The databases a rule reads (``grids``: study → grid), ``n_draws`` draws each, with
    ``scenario`` planted at ``scale`` × the smallest claimed effect (:func:`simulate`, then
    the scenario's ``after``); ``offsets``: the test-set terms (:func:`_offsets`), if any."""
    dbs = {s: simulate(s, g.coords, g.eval_domains, scenario.plant, n_draws, rng,
                       evidence.DELTA * scale, (offsets or {}).get(s))
           for s, g in grids.items()}  # fmt: skip
    if scenario.first_epoch is not None:
        target, sign = scenario.first_epoch
        plant_first_epoch(dbs, target, sign * scale * evidence.SCALES["correlation"].delta, rng)
    return dbs


@dataclass(frozen=True)
class ErrorRates:
    """One rule's measured error rates on one profile's grid."""

    key: str
    profile: str
    n_seeds: int
    n_draws: int
    false_pass: float  # holds with no effect (largest over the nulls)
    power: float  # holds with the smallest claimed effect
    false_fail: float  # does not hold with the smallest claimed effect
    effect: str  # the smallest claimed effect, in words

    @property
    def underpowered(self) -> bool:
        return self.power < 0.8


def _seed_means(rule: evidence.Rule, dbs: dict, n_draws: int) -> dict[str, np.ndarray]:
    """Each contrast's mean over the seeds of every draw (NaN where a draw lacks it)."""
    out = {}
    for c in rule.contrasts(dbs, "loss"):
        rows = np.asarray(c.per_seed, float).reshape(n_draws, -1)
        with quiet():
            out[c.name] = np.nanmean(rows, axis=1)
    return out


def _keys(grids: dict) -> dict[tuple[str, str], list[str]]:
    """(series, evaluation domain name) → the studies whose databases score on those images."""
    out: dict[tuple[str, str], list[str]] = {}
    for study, g in grids.items():
        for d in g.eval_domains:
            out.setdefault((get_study(study).series, domain_name(d)), []).append(study)
    return out


def _offsets(grids: dict, n_draws: int, rng: np.random.Generator) -> dict[str, dict]:
    """Test-set terms of sd :data:`SIGMA_SET` per draw: study → {domain name: [n_draws]}, one
    draw per (series, domain), shared by the studies that score on the same images."""
    out: dict[str, dict] = {s: {} for s in grids}
    for (_, name), studies in _keys(grids).items():
        term = SIGMA_SET * rng.standard_normal(n_draws)
        for study in studies:
            out[study][name] = term
    return out


def image_design(rule: evidence.Rule, dbs: dict, grids: dict, n_draws: int) -> dict[str, float]:
    """Each contrast's variance from the test-set terms: SIGMA_SET² × Σ over (series, domain)
    of the squared sensitivity of its seed mean to that domain's term, by finite differences on
    the simulated ``dbs`` (loss), averaged over the draws."""
    try:
        base = _seed_means(rule, dbs, n_draws)
    except evidence.NotMeasurable:
        return {}
    total = {name: np.zeros(n_draws) for name in base}
    for (_, name), studies in _keys(grids).items():
        moved = dict(dbs)
        for study in studies:
            ds = dbs[study].copy()
            loss = ds["final_loss"].copy(deep=True)
            e = [domain_name(d) for d in ds["eval_domain"].values.tolist()].index(name)
            loss[{"eval_domain": e}] = loss[{"eval_domain": e}] * math.exp(_STEP)
            moved[study] = ds.assign(final_loss=loss)
        for c, value in _seed_means(rule, moved, n_draws).items():
            total[c] += ((value - base[c]) / _STEP) ** 2
    with quiet():
        return {c: SIGMA_SET**2 * float(np.nanmean(v)) for c, v in total.items()}


def _verdicts(
    rule: evidence.Rule,
    dbs: dict,
    n_draws: int,
    image_var: dict[str, float] | None = None,
    n_images: int = 0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The rule's verdict in each draw (the same decision code as :func:`findings.score`);
    with ``image_var`` (:func:`image_design`) the interval takes the ``n_images`` test images
    as a second unit, each draw's image variance estimated with χ²(n_images − 1) noise."""
    try:
        contrasts = rule.contrasts(dbs, "loss")
    except evidence.NotMeasurable:
        return np.full(n_draws, evidence.UNMEASURABLE)
    rng = rng or np.random.default_rng(0)
    delta = evidence.SCALES[rule.scale].delta
    per_draw = []
    for c in contrasts:
        rows = np.asarray(c.per_seed, float).reshape(n_draws, -1)
        v = (image_var or {}).get(c.name, math.nan)
        if math.isfinite(v) and n_images >= 2:
            v_hat = v * rng.chisquare(n_images - 1, n_draws) / (n_images - 1)
            mean, low, high = evidence.two_level_intervals(rows, v_hat, n_images)
        else:
            mean, low, high = evidence.t_intervals(rows)
        per_draw.append(
            [evidence.decide(c.kind, lo, hi, delta) for lo, hi in zip(low, high, strict=True)]
        )
    return np.array([evidence.combine(list(v)) for v in zip(*per_draw, strict=True)])


@functools.cache
def _design(key: str, profile: str) -> dict[str, float]:
    """:func:`image_design` of ``key``'s rule on ``profile``'s grids, measured once on databases
    with the smallest claimed effect and reused for its nulls and larger effects (exact for the
    contrasts that are differences of means, whose sensitivities do not depend on the data)."""
    rule = findings.get_rule(key)
    grids = {s: build_grid(s, get_profile(profile)) for s in rule.studies}
    _, alternative = scenarios(key, {s: g.coords for s, g in grids.items()})
    rng = np.random.default_rng(DESIGN_SEED)
    offsets = _offsets(grids, N_DESIGN_DRAWS, rng)
    dbs = simulate_rule(grids, alternative, N_DESIGN_DRAWS, rng, 1.0, offsets)
    return image_design(rule, dbs, grids, N_DESIGN_DRAWS)


def error_rates(
    key: str,
    profile: str = "laptop",
    n_draws: int = N_DRAWS,
    seed: int = 0,
    scale: float = 1.0,
    images: bool = True,
) -> ErrorRates:
    """Simulate ``key``'s rule on ``profile``'s grids (module doc); ``scale`` multiplies the
    planted effect (1: the smallest the claim means); ``images``: the test images as a second
    sampling unit (the databases hold per-image scores), else the seeds alone."""
    rule = findings.get_rule(key)
    prof = get_profile(profile)
    grids = {s: build_grid(s, prof) for s in rule.studies}
    coords = {s: g.coords for s, g in grids.items()}
    nulls, alternative = scenarios(key, coords)
    rng = np.random.default_rng(seed)
    n_seeds = min(len(g.coords["seed"]) for g in grids.values())
    if n_seeds < 2:  # no interval, no verdict: nothing to simulate
        nan = math.nan
        return ErrorRates(key, profile, n_seeds, n_draws, nan, nan, nan, alternative.what)

    n_images = prof.data.n_test

    def databases(scenario: evidence.Scenario, n: int) -> dict:
        offsets = _offsets(grids, n, rng) if images else {}
        return simulate_rule(grids, scenario, n, rng, 1.0 if scenario in nulls else scale, offsets)

    # the test-set terms are in every simulated database; the intervals take the images as a
    # unit where the rule's scale does (the dynamics rules' take the seeds alone)
    design = _design(key, profile) if images and evidence.SCALES[rule.scale].images else {}

    def rates(scenario: evidence.Scenario) -> np.ndarray:
        return _verdicts(rule, databases(scenario, n_draws), n_draws, design, n_images, rng)

    def share(verdicts: np.ndarray, verdict: str) -> float:
        if np.all(verdicts == evidence.UNMEASURABLE):
            return math.nan  # the grid cannot decide the rule (one seed, a missing axis)
        return float(np.mean(verdicts == verdict))

    false_pass = max(share(rates(n), evidence.HOLDS) for n in nulls)
    alt = rates(alternative)
    return ErrorRates(key, profile, n_seeds, n_draws, false_pass,
                      share(alt, evidence.HOLDS), share(alt, evidence.FAILS),
                      alternative.what)  # fmt: skip


DETECTABLE_SCALES = (1, 2, 4, 8)  # multiples of δ tried by :func:`detectable`


def detectable(
    key: str, profile: str = "laptop", n_draws: int = 400, at_delta: ErrorRates | None = None
) -> float:
    """The smallest planted effect among :data:`DETECTABLE_SCALES` × δ that the rule calls
    *holds* in ≥ 80 % of draws, on the rule's scale (a log-error difference, or a Fisher z:
    :func:`evidence.effect_text` says it in words); NaN if none. ``at_delta``: the rule's
    :func:`error_rates` at δ, already measured (its scale is not simulated again)."""
    delta = evidence.SCALES[findings.get_rule(key).scale].delta
    for k in DETECTABLE_SCALES:
        if k == 1 and at_delta is not None:
            power = at_delta.power
        else:
            power = error_rates(key, profile, n_draws, seed=k, scale=k).power
        if not math.isfinite(power):
            return math.nan
        if power >= 0.8:
            return k * delta
    return math.nan


def table(profile: str) -> dict[str, dict]:
    """Every rule's error rates on ``profile``'s grid (:func:`error_rates`, 1,000 draws) and the
    smallest effect it detects (:func:`detectable`, on the rule's ``scale``), by rule key."""
    out = {}
    for key in findings.RULE_KEYS:
        r = error_rates(key, profile)
        out[key] = {"false_pass": r.false_pass, "power": r.power, "false_fail": r.false_fail,
                    "effect": r.effect, "reach": detectable(key, profile, at_delta=r),
                    "scale": findings.get_rule(key).scale}  # fmt: skip
    return out


def cached_table(profile: str, path: Path, log: Callable[[str], None] = print) -> dict[str, dict]:
    """:func:`table`, kept in ``path`` (:func:`~hrtem_book.layout.cached_json`) under a key of
    everything it depends on (this module's and the rules' code, the profile): computed once per
    build, read by the chapter."""
    key = hashlib.sha256(
        "|".join(
            [
                findings.ruleset_sha(),
                inspect.getsource(sys.modules[__name__]),
                repr(get_profile(profile)),
            ]
        ).encode()  # fmt: skip
    ).hexdigest()
    return cached_json(path, key, lambda: table(profile), log=log, who="power")
