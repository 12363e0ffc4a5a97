"""The findings' statistics on hand-made databases whose answer is known: each finding holds on
one, does not hold on another, and is "not measurable" where the grid lacks what it needs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import xarray as xr

from hrtem_book import findings
from hrtem_book.results import empty_database
from hrtem_book.studies import get_study

DEFOCUS = {
    "pretrain_domain": [-10.0, 0.0, 10.0],
    "target_domain": [-10.0, 0.0, 10.0],
    "n_transfer": [8, 16, 32],
    "pretrain_lr": [1e-3],
    "transfer_lr": [1e-3, 1e-4],
    "freeze": ["none", "encoder", "decoder"],
    "seed": [0, 1, 2],
}
DOSE = {
    "pretrain_domain": [30.0, 75.0, 300.0, 600.0],
    "target_domain": [30.0, 75.0, 300.0, 600.0],
    "freeze": ["none"],
    "seed": [0, 1, 2],
}
STRUCTURE = {
    "pretrain_domain": ["CdSe-small", "CdSe-large", "Si-small", "Si-large"],
    "target_domain": ["CdSe-small", "CdSe-large", "Si-small", "Si-large"],
    "freeze": ["none"],
    "seed": [0, 1, 2],
}
BASELINE = {
    "domain_a": [-10.0],
    "domain_b": [0.0, 10.0],
    "mix": ["112:16", "96:32"],
    "lr": [1e-3],
    "seed": [0, 1, 2],
}


def hand_database(study: str, coords: dict, loss) -> xr.Dataset:
    """A database whose kept-model loss is ``loss(cell, stage, eval_domain)`` in every cell (the
    target = pretraining cells excluded); Dice is 1 − loss, so both metrics tell one story."""
    spec = get_study(study)
    domains = list(dict.fromkeys(v for a in spec.domain_axes for v in coords[a]))
    ds = empty_database(study, coords, domains, 1, profile="hand")
    values = ds["final_loss"].values
    for idx in itertools.product(*(range(len(coords[a])) for a in spec.axes)):
        cell = {a: coords[a][i] for a, i in zip(spec.axes, idx, strict=True)}
        first, second = (cell[a] for a in (spec.domain_axes * 2)[:2])
        if spec.kind != "pretrain" and first == second:
            ds["status"].values[idx] = "excluded"
            continue
        ds["status"].values[idx] = "ok"
        for s, stage in enumerate(spec.stages):
            for e, dom in enumerate(domains):
                values[idx + (s, e)] = loss(cell, stage, dom)
    ds["final_dice"].values[...] = 1.0 - values
    ds["final_iou"].values[...] = (1.0 - values) / (1.0 + values)
    return ds


def verdicts(dbs: dict, key: str) -> set[str]:
    """The verdict of finding ``key`` under the loss and under Dice (they must agree here)."""
    return {findings.evaluate(dbs, metric)[key].verdict for metric in ("loss", "dice")}


HOLDS, FAILS, NA = {findings.HOLDS}, {findings.FAILS}, {findings.UNMEASURABLE}


def _before(c, d):
    """Before transfer: worse the further the pretraining defocus, and worse underfocus."""
    return 0.2 + 0.01 * abs(c["pretrain_domain"] - d) + 0.005 * c["pretrain_domain"]


def defocus(after, before=_before):
    """A defocus database from the loss after transfer on the target, and before transfer on
    every domain."""

    def loss(c, stage, d):
        if stage == "pretrain":
            return before(c, d)
        return after(c) if d == c["target_domain"] else 0.4

    return hand_database("defocus", DEFOCUS, loss)


def test_f1_in_focus_target_is_hardest():
    hard = defocus(lambda c: 0.3 if c["target_domain"] == 0 else 0.1)
    easy = defocus(lambda c: 0.05 if c["target_domain"] == 0 else 0.1)
    assert verdicts({"defocus": hard}, "F1") == HOLDS
    assert verdicts({"defocus": easy}, "F1") == FAILS
    no_focus = hard.sel(target_domain=[-10.0, 10.0])
    assert verdicts({"defocus": no_focus}, "F1") == NA
    f = findings.evaluate({"defocus": hard})["F1"]
    assert f.numbers["by_target"] == pytest.approx({-10.0: 0.1, 0.0: 0.3, 10.0: 0.1})


def test_f2_spread_across_pretraining_domains_shrinks():
    # before transfer the loss on a target grows with the distance to the pretraining defocus
    shrinks = defocus(lambda c: 0.1 + 0.001 * c["pretrain_domain"])
    grows = defocus(lambda c: 0.1 + 0.05 * abs(c["pretrain_domain"]), before=lambda c, d: 0.2)
    assert verdicts({"defocus": shrinks}, "F2") == HOLDS
    assert verdicts({"defocus": grows}, "F2") == FAILS
    one_pretraining = shrinks.sel(pretrain_domain=[0.0])
    assert verdicts({"defocus": one_pretraining}, "F2") == NA


def test_f3_freezing_the_encoder_costs_more_than_the_decoder():
    cost = {"none": 0.0, "decoder": 0.005, "encoder": 0.03}
    holds = defocus(lambda c: 0.1 + cost[c["freeze"]])
    swapped = {"none": 0.0, "decoder": 0.03, "encoder": 0.005}
    fails = defocus(lambda c: 0.1 + swapped[c["freeze"]])
    assert verdicts({"defocus": holds}, "F3") == HOLDS
    assert verdicts({"defocus": fails}, "F3") == FAILS
    assert verdicts({"defocus": holds.sel(freeze=["none"])}, "F3") == NA
    f = findings.evaluate({"defocus": holds})["F3"]
    assert f.numbers["paired_cost"] == pytest.approx({"encoder": 0.03, "decoder": 0.005})


def test_f4_more_images_lower_and_narrow_the_loss():
    spread = {0: -1.0, 1: 0.0, 2: 1.0}
    holds = defocus(lambda c: 0.1 + (0.5 + 0.1 * spread[c["seed"]]) / c["n_transfer"])
    widening = defocus(lambda c: 0.1 + 0.001 * c["n_transfer"] * (1 + spread[c["seed"]]))
    assert verdicts({"defocus": holds}, "F4") == HOLDS
    assert verdicts({"defocus": widening}, "F4") == FAILS
    assert verdicts({"defocus": holds.sel(n_transfer=[16])}, "F4") == NA


def dose(before, after):
    def loss(c, stage, d):
        if stage == "pretrain":
            return before(c, d)
        return after(c) if d == c["target_domain"] else 0.4

    return hand_database("dose", DOSE, loss)


def test_f5_low_dose_pretraining_is_worse_and_transfer_follows_the_target():
    low_worse = lambda c, d: 0.3 if c["pretrain_domain"] == 30 else 0.15  # noqa: E731
    holds = dose(low_worse, lambda c: 0.1 + 0.1 * (c["target_domain"] == 30))
    follows_pretraining = dose(low_worse, lambda c: 0.1 + 0.1 * (c["pretrain_domain"] == 30))
    high_worse = dose(lambda c, d: 0.3 if c["pretrain_domain"] == 600 else 0.15,
                      lambda c: 0.1 + 0.1 * (c["target_domain"] == 30))  # fmt: skip
    assert verdicts({"dose": holds}, "F5") == HOLDS
    assert verdicts({"dose": follows_pretraining}, "F5") == FAILS
    assert verdicts({"dose": high_worse}, "F5") == FAILS
    f = findings.evaluate({"dose": follows_pretraining})["F5"]
    assert f.numbers["parts"] == {"low_dose_worst": True, "follows_target": False}
    assert verdicts({}, "F5") == NA


def test_f6_transfer_matches_a_mixture_with_the_same_target_images():
    transfer = defocus(lambda c: 0.1 + 0.01 * c["seed"])

    def baseline(offset):
        def loss(c, stage, d):
            return 0.11 + offset if d == c["domain_b"] else 0.2

        return hand_database("baseline", BASELINE, loss)

    assert verdicts({"defocus": transfer, "baseline": baseline(0.0)}, "F6") == HOLDS
    assert verdicts({"defocus": transfer, "baseline": baseline(0.2)}, "F6") == FAILS
    assert verdicts({"defocus": transfer}, "F6") == NA
    # a mixture whose count of target images matches no transfer size cannot be compared
    other = baseline(0.0).assign_coords(mix=["100:28", "90:38"])
    assert verdicts({"defocus": transfer, "baseline": other}, "F6") == NA


def test_f7_pretraining_in_focus_transfers_better_than_the_reverse():
    def own(c, d):  # the pretrained model on its own domain: focus is harder
        return 0.2 if c["pretrain_domain"] == 0 else 0.1

    def after(from_focus_gap, to_focus_gap):
        def fn(c):
            if c["pretrain_domain"] == 0:
                return 0.1 + from_focus_gap
            if c["target_domain"] == 0:
                return 0.2 + to_focus_gap
            return 0.12

        return fn

    holds = defocus(after(0.01, 0.1), before=own)
    fails = defocus(after(0.1, 0.01), before=own)
    assert verdicts({"defocus": holds}, "F7") == HOLDS
    assert verdicts({"defocus": fails}, "F7") == FAILS
    assert verdicts({"defocus": holds.sel(pretrain_domain=[-10.0, 10.0])}, "F7") == NA
    f = findings.evaluate({"defocus": holds})["F7"]
    assert f.numbers["from_focus"] == pytest.approx(0.01)
    assert f.numbers["to_focus"] == pytest.approx(0.1)


def structure(before, after):
    def loss(c, stage, d):
        if stage == "pretrain":
            return before(c["pretrain_domain"], d)
        return after(c) if d == c["target_domain"] else 0.4

    return hand_database("structure", STRUCTURE, loss)


def _parts(name: str) -> tuple[str, str]:
    lattice, size = name.rsplit("-", 1)
    return lattice, size


def test_f8_target_structure_decides_and_size_matters_little():
    def before(p, t):  # lattice mismatch costs much, size mismatch little
        (lp, sp), (lt, st) = _parts(p), _parts(t)
        return 0.1 + 0.2 * (lp != lt) + 0.02 * (sp != st)

    by_target = lambda c: 0.1 + 0.1 * c["target_domain"].startswith("Si")  # noqa: E731
    by_pretraining = lambda c: 0.1 + 0.1 * c["pretrain_domain"].startswith("Si")  # noqa: E731
    assert verdicts({"structure": structure(before, by_target)}, "F8") == HOLDS
    assert verdicts({"structure": structure(before, by_pretraining)}, "F8") == FAILS

    def size_strong(p, t):  # size mismatch costs more than lattice mismatch
        (lp, sp), (lt, st) = _parts(p), _parts(t)
        return 0.1 + 0.02 * (lp != lt) + 0.2 * (sp != st)

    assert verdicts({"structure": structure(size_strong, by_target)}, "F8") == FAILS
    one_lattice = structure(before, by_target).sel(
        pretrain_domain=["CdSe-small", "CdSe-large"], target_domain=["CdSe-small", "CdSe-large"]
    )
    assert verdicts({"structure": one_lattice}, "F8") == NA


def generalization(series: str, domains: list, loss) -> xr.Dataset:
    """A generalization-<series> database: ``loss(train, test, seed)`` of every model."""
    coords = {"train_domain": domains, "seed": [0, 1, 2]}
    return hand_database(
        f"generalization-{series}", coords,
        lambda c, stage, d: loss(c["train_domain"], d, c["seed"]),
    )  # fmt: skip


def _noise(seed: int) -> float:
    return 0.004 * (seed - 1)  # seed-to-seed spread: sample sd 0.004


MAGNIFICATION = [0.5, 1.0, 1.5]


def test_g1_no_generalization_across_magnifications():
    scale = generalization(
        "magnification", MAGNIFICATION, lambda a, b, s: 0.1 + 0.2 * abs(a - b) + _noise(s)
    )
    assert verdicts({"generalization-magnification": scale}, "G1") == HOLDS
    # a network that does as well at every pixel size: every gap is noise
    invariant = generalization("magnification", MAGNIFICATION, lambda a, b, s: 0.1 + _noise(s))
    assert verdicts({"generalization-magnification": invariant}, "G1") == FAILS
    # one neighbouring pair that carries over within the noise is enough to fail
    near = generalization(
        "magnification", MAGNIFICATION,
        lambda a, b, s: 0.1 + 0.2 * (abs(a - b) > 0.6) + _noise(s),
    )  # fmt: skip
    assert verdicts({"generalization-magnification": near}, "G1") == FAILS
    one = scale.sel(train_domain=[1.0])
    assert verdicts({"generalization-magnification": one}, "G1") == NA
    assert verdicts({}, "G1") == NA


SETS = ["CdSe-small", "CdSe-large", "Si-small", "Si-large"]


def test_g2_models_trained_on_large_particles_generalize_worst():
    def loss(large_penalty):
        def fn(a, b, s):
            off = 0.0 if a == b else 0.1 + (large_penalty if a.endswith("large") else 0.0)
            return 0.1 + off + _noise(s)

        return fn

    worst = generalization("structure", SETS, loss(0.1))
    assert verdicts({"generalization-structure": worst}, "G2") == HOLDS
    best = generalization("structure", SETS, loss(-0.05))
    assert verdicts({"generalization-structure": best}, "G2") == FAILS
    small_only = worst.sel(train_domain=["CdSe-small", "Si-small"])
    assert verdicts({"generalization-structure": small_only}, "G2") == NA


def test_g3_dose_defocus_and_support_each_limit_generalization():
    def db(series, domains, gap):
        return generalization(
            series, domains, lambda a, b, s: 0.1 + (0.0 if a == b else gap) + _noise(s)
        )

    dbs = {
        "generalization-dose": db("dose", [30.0, 300.0, 600.0], 0.05),
        "generalization-defocus": db("defocus", [-10.0, 0.0, 10.0], 0.05),
        "generalization-substrate": db("substrate", [0.0, 3.0, 9.0], 0.05),
    }
    assert verdicts(dbs, "G3") == HOLDS
    flat = {**dbs, "generalization-substrate": db("substrate", [0.0, 3.0, 9.0], 0.0)}
    assert verdicts(flat, "G3") == FAILS
    assert verdicts({k: v for k, v in dbs.items() if "substrate" not in k}, "G3") == NA


def test_every_finding_reports_a_verdict_and_its_rule():
    out = findings.evaluate({})
    assert list(out) == [f"F{i}" for i in range(1, 9)] + [f"G{i}" for i in range(1, 7)]
    for f in out.values():
        assert f.verdict == findings.UNMEASURABLE and f.rule and f.claim
    with pytest.raises(ValueError, match="metric='accuracy'; allowed: loss, dice, iou"):
        findings.evaluate({}, metric="accuracy")


def test_failed_and_missing_runs_are_skipped_not_counted():
    ds = defocus(lambda c: 0.3 if c["target_domain"] == 0 else 0.1)
    ds["final_loss"].loc[{"target_domain": 0.0, "seed": 0}] = np.nan  # a failed replicate
    assert verdicts({"defocus": ds}, "F1") == HOLDS
