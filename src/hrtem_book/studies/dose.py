"""The dose study (Rangel DaCosta et al.): pretraining at one electron dose [e⁻/Å²], transfer to
another, with the freezing options; the paper's 180 transfer runs on 15 pretrainings. Its
finding F5.
"""

from __future__ import annotations

from ..analysis import axis_spreads as _axis_spreads
from ..analysis import log_final as _log_stage
from ..analysis import per_seed
from ..analysis import study_db as _db
from ..database import on_domain
from ..evidence import NO_EFFECT, Contrast, NotMeasurable, Rule, Scenario, centred
from .grid import PAPER_TRANSFER_FIXED, TRANSFER, StudySpec

# the rules' code is hashed into the rule set (findings.ruleset_sha) and names the shared
# analysis as it did when the rule set was fixed

SPECS = (
    StudySpec(
        name="dose",
        series="dose",
        kind=TRANSFER,
        axes=("pretrain_domain", "target_domain", "freeze", "seed"),
        domain_axes=("pretrain_domain", "target_domain"),
        fixed=dict(PAPER_TRANSFER_FIXED),
        description="Transfer between electron doses [e⁻/Å²].",
    ),
)


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


RULES: tuple[Rule, ...] = (
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
)  # fmt: skip


# --- the error rates' scenarios (hrtem_book.power) ----------------------------------------------
def scenarios(coords: dict[str, dict]) -> dict[str, tuple[list[Scenario], Scenario]]:
    """Its rules' error-rate scenarios on ``coords`` (:func:`hrtem_book.studies.scenarios`)."""
    dose = coords.get("dose", {})

    def f5(cell, st, ev, d):
        doses = list(dose["pretrain_domain"])
        if st == "pretrain":
            return d * (cell["pretrain_domain"] == min(doses))
        return d * centred(doses, ev) if ev == cell["target_domain"] else 0.0

    return {"F5": ([NO_EFFECT], Scenario("the lowest pretraining dose δ worse; after transfer the "
                                         "target doses differ by sd δ", f5))}  # fmt: skip
