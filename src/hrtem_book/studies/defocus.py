"""The transfer-learning study over defocus (Rangel DaCosta et al.): pretraining on one defocus,
transfer to another, with transfer-set size, learning rates and freezing as axes.

The paper's grid: 5 pretraining defoci × every target defocus × 4 transfer-set sizes × 2
pretraining and 2 transfer learning rates × 3 freezing options × 3 replicates — 7,200 transfer
runs on 30 pretrainings. Its findings F1-F4 and F7 read this database alone; F6 (transfer
against a mixture) is the baseline study's (:mod:`hrtem_book.studies.baseline`), F9 (the
in-focus model without transfer) the companion's (:mod:`hrtem_book.studies.generalization`).
"""

from __future__ import annotations

import numpy as np

from .._lazy import LazyModule
from ..analysis import domain_name as _name
from ..analysis import log_final as _log_stage
from ..analysis import per_seed
from ..analysis import spread as _spread
from ..analysis import study_db as _db
from ..config import FREEZE_OPTIONS, DataConfig
from ..database import on_domain
from ..evidence import NO_EFFECT, Contrast, NotMeasurable, Rule, Scenario, centred
from ..series import match_index
from .grid import PAPER_SEEDS, TRANSFER, StudySpec

xr = LazyModule("xarray")  # imported on first use (hrtem_book._lazy)

# the rules' code is hashed into the rule set (findings.ruleset_sha) and names the shared
# analysis as it did when the rule set was fixed

IN_FOCUS_NM = 0.0  # the in-focus defocus domain
PAPER_PRETRAIN_DEFOCI_NM = (-10.0, -5.0, 0.0, 5.0, 10.0)


def _paper_values(data: DataConfig, series: str) -> dict[str, tuple]:
    return {
        "pretrain_domain": PAPER_PRETRAIN_DEFOCI_NM,
        "target_domain": data.domains(series),
        "n_transfer": (64, 128, 256, 512),
        "pretrain_lr": (1e-3, 1e-4),
        "transfer_lr": (1e-4, 1e-5),
        "freeze": FREEZE_OPTIONS,
        "seed": PAPER_SEEDS,
    }


SPECS = (
    StudySpec(
        name="defocus",
        series="defocus",
        kind=TRANSFER,
        axes=(
            "pretrain_domain",
            "target_domain",
            "n_transfer",
            "pretrain_lr",
            "transfer_lr",
            "freeze",
            "seed",
        ),
        domain_axes=("pretrain_domain", "target_domain"),
        paper=_paper_values,
        description="Transfer between defoci [nm]: data size, learning rates, freezing.",
    ),
)


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
        "F7", "pretraining in focus transfers better than the reverse",
        "Two domains can carry unequal information: pretraining on one may serve transfer to "
        "the other better than the reverse — here, in focus against out of focus.",
        ("000", "fundamental asymmetries"),
        "For every defocus d ≠ 0 transferred both ways: the gap of the transfer d → 0 nm above "
        "the model pretrained at 0 nm against the gap of 0 nm → d above the model pretrained on "
        "d, averaged over d per seed.",
        _in_focus_pretraining_asymmetry, ("defocus",),
    ),
)  # fmt: skip


# --- the error rates' scenarios (hrtem_book.power) ----------------------------------------------
def scenarios(coords: dict[str, dict]) -> dict[str, tuple[list[Scenario], Scenario]]:
    """Its rules' error-rate scenarios on ``coords`` (:func:`hrtem_book.studies.scenarios`)."""
    defocus = coords.get("defocus", {})

    def f1(cell, st, ev, d):
        return d * (st == "transfer" and ev == IN_FOCUS_NM)

    def f2(cell, st, ev, d):
        return d * centred(defocus["pretrain_domain"], cell["pretrain_domain"]) * (st == "pretrain")

    def f3_null(cell, st, ev, d):
        return (
            d * {"encoder": 2.0, "decoder": 1.0, "none": 0.0}[cell["freeze"]] * (st == "transfer")
        )

    def f3(cell, st, ev, d):
        return d * (cell["freeze"] == "encoder") * (st == "transfer")

    def f4(cell, st, ev, d):
        if st != "transfer":
            return 0.0
        sizes = list(defocus["n_transfer"])
        out = d * (len(sizes) - 1 - sizes.index(cell["n_transfer"]))
        if cell["n_transfer"] == sizes[0]:
            pairs = [(p, t) for p in defocus["pretrain_domain"] for t in defocus["target_domain"]]
            out += d * centred(pairs, (cell["pretrain_domain"], cell["target_domain"]))
        return out

    def f7(cell, st, ev, d):
        return d * (st == "transfer" and cell["target_domain"] == IN_FOCUS_NM)

    return {
        "F1": ([NO_EFFECT], Scenario("the 0 nm target δ harder", f1)),
        "F2": ([NO_EFFECT], Scenario("before transfer the pretraining defoci differ by sd δ, "
                                     "after transfer not at all", f2)),
        "F3": ([NO_EFFECT, Scenario("decoder costs δ, encoder 2δ", f3_null)],
               Scenario("encoder costs δ, decoder nothing", f3)),
        "F4": ([NO_EFFECT], Scenario("each smaller transfer set δ worse; at the smallest the "
                                     "configurations differ by sd δ", f4)),
        "F7": ([NO_EFFECT], Scenario("transfer to 0 nm δ worse than from 0 nm", f7)),
    }  # fmt: skip
