"""The companion's synthetic → experimental question (Sytwu et al.): pretrainings on synthetic
variants (``pretrain_domain``: varied or fixed support thickness, small or large particles only)
transferred on a few images of an experimental-like domain (``target_domain``: ``experimental``,
or ``experimental-small``, a transfer set biased to small particles), every run evaluated on the
experimental-like test images before and after transfer. Its findings G4-G6 read the table of
:func:`heldout_table`.
"""

from __future__ import annotations

from .._lazy import LazyModule
from ..analysis import error as _error
from ..analysis import log_error as _log
from ..analysis import per_seed
from ..analysis import study_db as _db
from ..config import DataConfig
from ..database import match_indices, metric_var
from ..evidence import NO_EFFECT, Contrast, NotMeasurable, Rule, Scenario
from ..series import HELDOUT_MEASURED, HELDOUT_SYNTHETIC
from .grid import PAPER_SEEDS, PAPER_TRANSFER_FIXED, TRANSFER, StudySpec

xr = LazyModule("xarray")  # imported on first use (hrtem_book._lazy)

# the rules' code is hashed into the rule set (findings.ruleset_sha) and names the shared
# analysis as it did when the rule set was fixed


def _paper_values(data: DataConfig, series: str) -> dict[str, tuple]:
    """Every synthetic variant as pretraining, each experimental-like domain as target."""
    return {
        "pretrain_domain": HELDOUT_SYNTHETIC,
        "target_domain": HELDOUT_MEASURED,
        "seed": PAPER_SEEDS,
    }


SPECS = (
    StudySpec(
        name="heldout",
        series="heldout",
        kind=TRANSFER,
        axes=("pretrain_domain", "target_domain", "seed"),
        domain_axes=("pretrain_domain", "target_domain"),
        paper=_paper_values,
        # the companion's transfer to a few experimental images: the study's rates, nothing frozen
        fixed={**PAPER_TRANSFER_FIXED, "n_transfer": 64, "freeze": "none"},
        description="Synthetic variants → experimental-like images: Dice before and after "
        "transfer on a few of them, one transfer set biased to small particles.",
    ),
)


HELDOUT_TEST = "experimental"  # the held-out domain every case is measured on
# (case, stage, transfer target): before transfer, after transfer on a few unbiased images,
# after transfer on as many images of small particles only
HELDOUT_CASES = (
    ("before", "pretrain", "experimental"),
    ("after", "transfer", "experimental"),
    ("after-biased", "transfer", "experimental-small"),
)


def heldout_table(ds: xr.Dataset, metric: str = "dice") -> xr.DataArray:
    """``metric`` on the experimental-like validation images of the ``heldout`` database, by
    synthetic variant (``pretrain_domain``), seed and case: ``before`` transfer (the model the
    pretraining kept), ``after`` transfer on a few experimental-like images and
    ``after-biased`` transfer on as many images of small particles only."""
    if ds.attrs.get("study") != "heldout":
        raise ValueError(
            f"study {ds.attrs.get('study')!r} is not the held-out study; allowed: heldout"
        )
    var = ds[metric_var(metric, "final")]
    test = match_indices(ds["eval_domain"], [HELDOUT_TEST])
    if not test:
        raise ValueError(f"the heldout database has no {HELDOUT_TEST!r} evaluation domain")
    parts = []
    for case, stage, target in HELDOUT_CASES:
        hit = match_indices(ds["target_domain"], [target])
        if not hit:
            continue
        da = var.isel(target_domain=hit[0], eval_domain=test[0]).sel(stage=stage, drop=True)
        parts.append(da.drop_vars(["target_domain", "eval_domain"]).expand_dims(case=[case]))
    table = xr.concat(parts, "case").transpose("pretrain_domain", "seed", "case")
    return table.rename(f"{metric} on {HELDOUT_TEST}")


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


RULES: tuple[Rule, ...] = (
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
)  # fmt: skip


# --- the error rates' scenarios (hrtem_book.power) ----------------------------------------------
def scenarios(coords: dict[str, dict]) -> dict[str, tuple[list[Scenario], Scenario]]:
    """Its rules' error-rate scenarios on ``coords`` (:func:`hrtem_book.studies.scenarios`)."""

    def g4(cell, st, ev, d):
        return d * (st == "pretrain" and cell["pretrain_domain"] in ("fixed-support", "large"))

    def g5(cell, st, ev, d):
        return -d * (st == "transfer")

    def g6(cell, st, ev, d):
        return d * (st == "transfer" and cell["target_domain"] == "experimental-small")

    return {
        "G4": ([NO_EFFECT], Scenario("fixed support and large particles each δ worse", g4)),
        "G5": ([NO_EFFECT], Scenario("every variant δ better after transfer", g5)),
        "G6": ([NO_EFFECT], Scenario("the size-biased transfer δ worse", g6)),
    }
