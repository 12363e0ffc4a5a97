"""The structure study (Rangel DaCosta et al.): pretraining on one crystal structure and particle
size (``"<lattice>-<size>"``), transfer to another. The paper's 18 sets, ordered pairs, 3
freezing options and 3 replicates make exactly 18 · 17 · 3 · 3 = 2,754 runs (its text says
"about 2,500"). Its finding F8.
"""

from __future__ import annotations

import numpy as np

from .._lazy import LazyModule
from ..analysis import axis_spreads as _axis_spreads
from ..analysis import log_final as _log_stage
from ..analysis import per_seed
from ..analysis import study_db as _db
from ..database import on_domain
from ..evidence import NO_EFFECT, Contrast, NotMeasurable, Rule, Scenario, centred
from ..series import split_structure_domain as _parts
from .grid import PAPER_TRANSFER_FIXED, TRANSFER, StudySpec

xr = LazyModule("xarray")  # imported on first use (hrtem_book._lazy)

# the rules' code is hashed into the rule set (findings.ruleset_sha) and names the shared
# analysis as it did when the rule set was fixed

SPECS = (
    StudySpec(
        name="structure",
        series="structure",
        kind=TRANSFER,
        axes=("pretrain_domain", "target_domain", "freeze", "seed"),
        domain_axes=("pretrain_domain", "target_domain"),
        fixed=dict(PAPER_TRANSFER_FIXED),
        description="Transfer between crystal structures and particle sizes.",
    ),
)


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


RULES: tuple[Rule, ...] = (
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
)  # fmt: skip


# --- the error rates' scenarios (hrtem_book.power) ----------------------------------------------
def scenarios(coords: dict[str, dict]) -> dict[str, tuple[list[Scenario], Scenario]]:
    """Its rules' error-rate scenarios on ``coords`` (:func:`hrtem_book.studies.scenarios`)."""
    structure = coords.get("structure", {})

    def f8(cell, st, ev, d):
        if st == "transfer":
            targets = list(structure["target_domain"])
            return d * centred(targets, ev) if ev == cell["target_domain"] else 0.0
        return d * (_parts(cell["pretrain_domain"])[0] != _parts(ev)[0])

    return {"F8": ([NO_EFFECT], Scenario("after transfer the target sets differ by sd δ; before, "
                                         "another lattice δ worse", f8))}  # fmt: skip
