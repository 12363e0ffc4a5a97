"""The baseline study (Rangel DaCosta et al.): one training on a mixture of two defoci instead of
pretraining on one and transferring to the other.

A cell ``(domain_a, domain_b, mix="128:384")`` trains one model on 128 images of ``domain_a``
and 384 of ``domain_b``; the mirrored cell ``(domain_b, domain_a, "384:128")`` is the same model
(one config, one run), so the paper's 5 × 10 × 3 × 2 × 3 = 900 cells hold 720 distinct runs.
Its finding F6 compares each mixture with the transfers of the defocus study
(:mod:`hrtem_book.studies.defocus`) that saw as many target images.
"""

from __future__ import annotations

import numpy as np

from ..analysis import domain_name as _name
from ..analysis import log_final as _log_stage
from ..analysis import per_seed
from ..analysis import quiet as _quiet
from ..analysis import study_db as _db
from ..config import DataConfig
from ..database import on_domain
from ..evidence import NO_EFFECT, Contrast, NotMeasurable, Rule, Scenario
from ..series import match_index
from .defocus import PAPER_PRETRAIN_DEFOCI_NM
from .grid import MIXTURE, PAPER_SEEDS, StudySpec, parse_mix

# the rules' code is hashed into the rule set (findings.ruleset_sha) and names the shared
# analysis as it did when the rule set was fixed


def _paper_values(data: DataConfig, series: str) -> dict[str, tuple]:
    return {
        "domain_a": PAPER_PRETRAIN_DEFOCI_NM,
        "domain_b": data.domains(series),
        "mix": ("128:384", "256:256", "384:128"),
        "lr": (1e-3, 1e-4),
        "seed": PAPER_SEEDS,
    }


SPECS = (
    StudySpec(
        name="baseline",
        series="defocus",
        kind=MIXTURE,
        axes=("domain_a", "domain_b", "mix", "lr", "seed"),
        domain_axes=("domain_a", "domain_b"),
        paper=_paper_values,
        description="One stage on a mixture of two defoci; mix 'n_a:n_b' images of a and b.",
    ),
)


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
                n_b = parse_mix(mix)[1]
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


RULES: tuple[Rule, ...] = (
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
)  # fmt: skip


# --- the error rates' scenarios (hrtem_book.power) ----------------------------------------------
def scenarios(coords: dict[str, dict]) -> dict[str, tuple[list[Scenario], Scenario]]:
    """Its rules' error-rate scenarios on ``coords`` (:func:`hrtem_book.studies.scenarios`)."""

    def f6_null(cell, st, ev, d):
        return d * (st == "mixture")

    return {"F6": ([Scenario("the mixture δ worse than transfer", f6_null)], NO_EFFECT)}
