"""The numbers and sentences the chapters state, computed from the results databases.

Each chapter of the book is an executable MyST page: a hidden cell calls one function of this
module and the prose quotes its attributes through inline ``{eval}`` expressions, so the
rendered text holds the numbers of the database the book was built with — and, for every
finding of the study, its verdict (:mod:`hrtem_book.findings`). Functions return a
:class:`Numbers` namespace of ready-to-print strings; nothing here draws.

    t = pages.imaging_conditions("../results/laptop", "median")
    # chapter: "The database holds {eval}`t.runs` finished transfer runs ..."
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import xarray as xr

from .. import evidence
from .. import findings as findings_mod
from ..database import on_domain
from ..figures import plural
from ..figures._common import format_value
from ..figures.generalization import ood_numbers
from ..figures.hyperparameters import cost_by_freeze, grouped_losses
from ..figures.imaging_conditions import baseline_numbers, heatmap_numbers, study_counts
from ..figures.structure import domains_of_size, size_numbers
from ..layout import analysis_cache
from ..profiles import PROFILES, get_profile
from ..results import generalization_databases, load_databases
from ..series import fixed_support_nm, get_series
from ..studies import generalization as generalization_study
from ..studies import heldout as heldout_study

# models of the published study, per study (its text and tables)
# (the companion study's abstract gives no model counts)
PAPER_MODELS = {"defocus": "7,200", "baseline": "720", "dose": "180", "structure": "≈2,500"}


class Numbers(SimpleNamespace):
    """Attributes are strings for the prose (``t.runs``), or findings (``t.F["F1"]``)."""


def f3(x: float) -> str:
    """A loss or score with three decimals ("n/a" when undefined)."""
    return "n/a" if not math.isfinite(x) else f"{x:.3f}"


def pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:.0f} %"


def signed(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:+.3f}"


def by_seed(fn, ds: xr.Dataset, *args, **kwargs) -> list:
    """``fn(ds, ...)`` on the models of each seed alone: one result per seed."""
    return [fn(ds.isel(seed=[i]), *args, **kwargs) for i in range(ds.sizes["seed"])]


def iv(values, fmt=f3) -> str:
    """A number the text states from the database: the mean over seeds of the per-seed values
    and its 95 % Student-t interval (the verdicts' own :func:`~hrtem_book.evidence.t_interval`):
    ``"0.870 [0.850, 0.890]"``; one seed has no interval and says so."""
    mean, low, high = evidence.t_interval(np.asarray(list(values), float))
    if not math.isfinite(mean):
        return "n/a"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{fmt(mean)} (one seed, no interval)"
    return f"{fmt(mean)} [{fmt(low)}, {fmt(high)}]"


VERDICT_ORDER = evidence.VERDICTS
VERDICT_WORD = {  # how a tally says a verdict that one finding has
    evidence.HOLDS: "holds",
    evidence.FAILS: "does not",
    evidence.INCONCLUSIVE: "is inconclusive at this scale",
    evidence.UNMEASURABLE: "cannot be tested on its grid",
    evidence.STALE: "was not scored (a database of another rule set)",
}
VERDICT_WORDS = {  # how a tally says each verdict
    evidence.HOLDS: "hold",
    evidence.FAILS: "do not",
    evidence.INCONCLUSIVE: "are inconclusive at this scale",
    evidence.UNMEASURABLE: "cannot be tested on its grid",
    evidence.STALE: "were not scored (databases of another rule set)",
}


def verdict_sentence(f: evidence.Finding) -> str:
    """The finding's numbers and its verdict, as one passage of prose."""
    if f.verdict in (evidence.UNMEASURABLE, evidence.STALE):
        return f.summary
    if f.verdict == evidence.INCONCLUSIVE:
        return f"{f.summary} In this build the finding is inconclusive at this scale."
    return f"{f.summary} In this build the study's finding {f.verdict}."


def _findings(dbs: dict, results_dir: str | Path) -> dict[str, dict[str, evidence.Finding]]:
    """Every finding under the loss and under Dice; the bootstrap over test images is done once
    per build and kept beside the databases (:func:`findings.cached_image_variances`)."""
    folder = Path(results_dir)
    return {
        m: findings_mod.evaluate(dbs, m, findings_mod.cached_image_variances(
            dbs, m, analysis_cache(folder, f"image-variances-{m}")))
        for m in ("loss", "dice")
    }  # fmt: skip


# --- chapters ---------------------------------------------------------------------------------
def overview(results_dir: str | Path, profile: str) -> Numbers:
    """Abstract and recipes: the size of the build and the tally of the findings."""
    dbs = load_databases(results_dir)
    return _overview(dbs, _findings(dbs, results_dir), profile)


def _profile_of(dbs: dict) -> str:
    """The profile the databases were built with ("" when there are none)."""
    first = next(iter(dbs.values()), None)
    return str(first.attrs.get("profile")) if first is not None else ""


def prepare(results_dir: str | Path) -> None:
    """Compute once what the chapters read and would otherwise each compute (the findings'
    bootstrap over test images; the rules' error rates on the build's profile), so that
    chapters executed side by side find it done."""
    from .. import power

    dbs = load_databases(results_dir)
    _findings(dbs, results_dir)
    profile = _profile_of(dbs)
    if profile in PROFILES:
        power.cached_table(profile, analysis_cache(Path(results_dir), "power"))


def _overview(dbs: dict, found: dict, profile: str) -> Numbers:
    """:func:`overview` of databases already loaded and findings already evaluated."""
    counts = {s: study_counts(ds) for s, ds in dbs.items()}
    total = sum(c["runs"] for c in counts.values())
    n = len(found["loss"])

    def tally(metric: str) -> str:
        count = {v: sum(f.verdict == v for f in found[metric].values()) for v in VERDICT_ORDER}
        parts = [f"{count[v]} {(VERDICT_WORD if count[v] == 1 else VERDICT_WORDS)[v]}"
                 for v in VERDICT_ORDER
                 if count[v] or v in (evidence.HOLDS, evidence.FAILS)]  # fmt: skip
        return f"{', '.join(parts[:-1])} and {parts[-1]}"

    first = next(iter(dbs.values()), None)
    return Numbers(
        profile=profile,
        compute=compute_sentence(dbs),
        total=f"{total:,}",
        per_study=", ".join(f"{s}: {c['runs']:,}" for s, c in counts.items()),
        n_findings=str(n),
        n_pretrain=str(first.attrs.get("n_pretrain", "?")) if first is not None else "?",
        tally=(
            f"of the {n} findings of the study and its companion, {tally('loss')} under the "
            f"loss; under the Dice score {tally('dice')}"
        ),
    )


def compute_sentence(dbs: dict[str, xr.Dataset]) -> str:
    """How the databases' models computed: ``"in fp32 on cpu (AVX2), torch 2.13.0+cpu"``."""
    precisions, machines = set(), set()
    for ds in dbs.values():
        precisions |= {str(v) for k, v in ds.attrs.items() if k.endswith("_precision")}
        machines |= {m for m in str(ds.attrs.get("trained_on", "unrecorded")).split("; ") if m}
    machines.discard("unrecorded")
    where = "; ".join(sorted(machines)) or "machines that were not recorded"
    return f"in {' and '.join(sorted(precisions)) or 'unrecorded precision'} on {where}"


def reading(results_dir: str | Path) -> Numbers:
    """Chapter 5: examples taken from the database (its largest transfer set)."""
    ds = load_databases(results_dir)["defocus"]
    return Numbers(largest_n=str(int(ds["n_transfer"].values.max())))


def study_table(results_dir: str | Path):
    """Finished, failed and missing runs per study beside the published model counts."""
    import pandas as pd

    rows = []
    for study, ds in load_databases(results_dir).items():
        c = study_counts(ds)
        stops = ds["stop_reason"].values.astype(str)
        stops = stops[stops != ""]
        plateau = float(np.mean(stops == "plateau")) if stops.size else math.nan
        rows.append(
            {
                "study": study,
                "finished runs": f"{c['runs']:,}",
                "failed": f"{c['failed']:,}",
                "missing": f"{c['missing']:,}",
                "stages stopped on a plateau": pct(plateau),
                "published models": PAPER_MODELS.get(study, "–"),
            }
        )
    return pd.DataFrame(rows).style.hide(axis="index")


def datasets(profile: str) -> Numbers:
    """Chapter 2: what the profile simulates."""
    data = get_profile(profile).data
    sim = data.sim
    return Numbers(
        profile=profile,
        field=f"{sim.field_nm:g} nm",
        sampling=f"{sim.sampling_A:g} Å",
        gpts=f"{sim.gpts}²",
        phonons=plural(sim.n_phonons, "frozen-phonon configuration"),
        image=f"{sim.image_px}²",
        pixel=f"{sim.pixel_A:g} Å",
        kv=f"{sim.energy_eV / 1e3:g} kV",
        n_train=str(data.n_train),
        n_val=str(data.n_val),
        n_test=str(data.n_test),
        defoci=", ".join(f"{d:g}" for d in data.defoci_nm) + " nm",
        defocus_dose=f"{data.defocus_series_dose:g} e⁻/Å²",
        doses=", ".join(f"{d:g}" for d in data.doses) + " e⁻/Å²",
        dose_defocus=f"{data.dose_series_defocus_nm:g} nm",
        lattices=", ".join(data.lattices),
        small=f"{data.small_radius_nm[0]:g}–{data.small_radius_nm[1]:g} nm",
        large=f"{data.large_radius_nm[0]:g}–{data.large_radius_nm[1]:g} nm",
        magnifications=", ".join(f"{p:g}" for p in data.magnification_pixels_A) + " Å",
        fields=", ".join(f"{sim.image_px * p / 10:g}" for p in data.magnification_pixels_A) + " nm",
        substrates=", ".join(f"{t:g}" for t in data.substrate_thickness_nm) + " nm",
        fixed_support=f"{fixed_support_nm(data):g} nm",
        measured=_measured_text(data.measured),
    )


def _measured_text(m) -> str:
    """The experimental-like specimen and instrument (config.MeasuredImaging) in one phrase."""
    return (
        f"scenes of their own on {_range(m.support_nm)} nm of amorphous carbon under "
        f"{_range(m.contamination_nm)} nm of contamination, a focus offset of up to "
        f"±{m.defocus_range_nm:g} nm that no label records, C_s = {m.cs_A / 1e4:+g} µm, "
        f"{m.astigmatism_A / 10:g} nm of two-fold astigmatism, "
        f"{m.drift_A:g} Å of drift, a background of {100 * m.background_fraction:g} % of the "
        f"beam (gradient up to ±{100 * m.background_gradient:g} %), a detector gain of shape "
        f"{m.gain_shape:g} (DQE(0) {m.gain_shape / (m.gain_shape + 1):.2f}), MTF "
        f"{m.mtf_at_nyquist:g} at Nyquist and {m.read_noise_e:g} e⁻ of read noise"
    )


def _range(r) -> str:
    return f"{r[0]:g}–{r[1]:g}"


def lattice_table():
    """The lattice parameters of the structure series (package data), as a table."""
    import pandas as pd

    from ..structures import LATTICES

    rows = [
        {
            "lattice": lat.name,
            "structure": lat.kind,
            "a [Å]": f"{lat.a_A:.4f}",
            "c [Å]": f"{lat.c_A:.4f}" if lat.c_A is not None else "–",
            "species": ", ".join(lat.species),
            "label blur σ [Å]": f"{lat.label_blur_A:g}",
        }
        for lat in LATTICES.values()
    ]
    return pd.DataFrame(rows).style.hide(axis="index")


def _stage_text(stage, what: str) -> str:
    aug = {"d4": "all 8 D4 orientations of every image", "d4-random": "one random D4 "
           "orientation per image", "none": "no augmentation"}[stage.augment]  # fmt: skip
    rule = (
        f"stops once its in-domain validation loss has not improved by {100 * stage.min_delta:g} % "
        f"for {stage.patience} epochs (counted from epoch {stage.min_epochs}), at most "
        f"{stage.max_epochs} epochs, and keeps its best epoch"
        if stage.patience is not None
        else f"runs {stage.max_epochs} epochs and keeps its best"
    )
    bn = (
        ", its BatchNorm statistics recomputed from its training images before every evaluation"
        if stage.recalibrate_bn
        else ""
    )
    return (
        f"{what} trains in batches of {stage.batch_size} with {aug} per epoch, "
        f"{stage.precision}, a learning rate ×{stage.lr_decay:g} per epoch{bn}, and {rule}"
    )


def architecture(profile: str) -> Numbers:
    """Chapter 3: parameter counts of the built models and the stage settings."""
    from ..figures.architecture import model_summary

    def sentence(name: str) -> str:
        s = model_summary(PROFILES[name].model)
        enc, dec, head = (s["parts"][k] for k in ("encoder", "decoder", "head"))
        kept = sum(s["trainable"]["encoder"].values())
        return (
            f"the {name} model ({s['encoder']}) has {s['total']:,} parameters — encoder "
            f"{enc:,} ({100 * enc / s['total']:.0f} %), decoder {dec:,}, head {head:,} — and "
            f"freezing its encoder leaves {kept:,} trainable ({100 * (1 - kept / s['total']):.0f}"
            f" % fewer)"
        )

    p = get_profile(profile)
    names = list(dict.fromkeys([profile, "paper"]))
    stages = _stage_text(p.stage, "A pretraining or mixture stage")
    if p.transfer is not p.stage:
        stages += "; " + _stage_text(p.transfer, "a transfer stage")
    return Numbers(
        models="; ".join(sentence(n) for n in names),
        stages=stages,
        n_pretrain=str(p.n_pretrain),
    )


def _grouped(ds: xr.Dataset, by: list[str], reduction: str, metric: str) -> str:
    """Median target value per group, per seed, stated with its interval over seeds."""

    def medians(d: xr.Dataset) -> dict[str, float]:
        groups = grouped_losses(d, by, reduce=reduction, metric=metric)
        return {k: float(np.median(v)) if v.size else math.nan for k, v in groups.items()}

    seeds = by_seed(medians, ds)
    return "; ".join(f"{k} {iv(s[k] for s in seeds)}" for k in seeds[0])


def hyperparameters(results_dir: str | Path, reduction: str) -> Numbers:
    """Chapter 6: target-domain loss and Dice by transfer setting; findings 3 and 4."""
    dbs = load_databases(results_dir)
    ds = dbs["defocus"]
    found = _findings(dbs, results_dir)
    cost = cost_by_freeze(ds, reduce=reduction)
    cost_seeds = by_seed(cost_by_freeze, ds, reduce=reduction)
    full = cost["none"]

    def fewer(c: dict) -> str:
        share = 1 - c["trainable_params"] / full["trainable_params"]
        return f" ({100 * share:.0f} % fewer than with nothing frozen)" if share > 0 else ""

    cost_text = "; ".join(
        f"freezing {o}: {c['trainable_params'] / 1e6:.3f} M trainable parameters{fewer(c)}, "
        f"{iv((1e3 * x[o]['time_per_image_s'] for x in cost_seeds), lambda v: f'{v:.2f}')} ms "
        "per image and epoch"
        for o, c in cost.items()
    )
    out = Numbers(cost=cost_text, F=found["loss"], Fd=found["dice"])
    for name, by in (("size", ["n_transfer"]), ("freeze", ["freeze"]),
                     ("lr", ["pretrain_lr", "transfer_lr"])):  # fmt: skip
        setattr(out, f"{name}_loss", _grouped(ds, by, reduction, "loss"))
        setattr(out, f"{name}_dice", _grouped(ds, by, reduction, "dice"))
    pairs = [
        f"{format_value(float(a))} / {format_value(float(b))}"
        for a in ds["pretrain_lr"].values
        for b in ds["transfer_lr"].values
    ]
    out.lr_design = (
        f"This build trained a single pair, {pairs[0]}: no finding reads the learning rates, "
        "and this profile keeps one pair to stay within its time budget (the gpu "
        "profile runs the study's four), so the figure compares that pair with no transfer, "
        "not rates with each other."
        if len(pairs) == 1
        else f"This build trained {len(pairs)} pairs: {', '.join(pairs)}."
    )
    out.f3 = verdict_sentence(found["loss"]["F3"])
    out.f4 = verdict_sentence(found["loss"]["F4"])
    out.f3_dice = found["dice"]["F3"].verdict
    out.f4_dice = found["dice"]["F4"].verdict
    return out


def _heatmap_text(n: dict[str, Any], seeds: list[dict], unit: str, what: str) -> str:
    """``n``: the heatmap numbers of the whole database (which pair, which domain); ``seeds``:
    the same numbers per seed (the values and their intervals)."""
    fmt = (lambda v: f"{v:g} {unit}".strip()) if unit else str  # noqa: E731

    def at(key: str, f=f3) -> str:
        return iv((x[key] for x in seeds), f)

    return (
        f"the target-domain {what}, averaged over the off-diagonal cells of the maps, is "
        f"{at('before')} after pretraining and {at('after')} after transfer; transfer "
        f"improves {at('improved', pct)} of the (pretraining, target) pairs. The worst pair before "
        f"transfer is {fmt(n['worst_pair'][0])} → {fmt(n['worst_pair'][1])}; after transfer, "
        f"pretraining at {fmt(n['best_pretrain'])} does best on average"
    )


def imaging_conditions(results_dir: str | Path, reduction: str) -> Numbers:
    """Chapter 7: defocus heatmaps and the mixture baseline; findings 1, 2, 6 and 7."""
    dbs = load_databases(results_dir)
    ds = dbs["defocus"]
    found = _findings(dbs, results_dir)
    n = heatmap_numbers(ds, reduce=reduction)
    nd = heatmap_numbers(ds, reduce=reduction, metric="dice")
    b = baseline_numbers(dbs["baseline"], ds, reduce=reduction)
    base = dbs["baseline"]
    b_seeds = [baseline_numbers(base.isel(seed=[i]), ds.sel(seed=[base["seed"].values[i]]),
                                reduce=reduction) for i in range(base.sizes["seed"])]  # fmt: skip
    return Numbers(
        runs=plural(n["runs"], "finished transfer run"),
        failed=str(n["failed"]),
        missing=str(n["missing"]),
        heat_loss=_heatmap_text(n, by_seed(heatmap_numbers, ds, reduce=reduction), "nm", "loss"),
        heat_dice=_heatmap_text(
            nd, by_seed(heatmap_numbers, ds, reduce=reduction, metric="dice"), "nm", "Dice"
        ),
        mixtures=plural(b["runs"], "finished mixture"),
        baseline=(
            f"Over {plural(b['comparisons'], '(pair, mixture) comparison')} of the {reduction} "
            f"loss on domain b with the transfer a → b as drawn (the {reduction} over every "
            f"transfer setting), the mixture does better in {b['mixture_wins']}; the median "
            f"difference mixture − transfer is {iv((x['median_gap'] for x in b_seeds), signed)} "
            "(finding F6 compares, pair by pair, each "
            "mixture with the transfers that saw as many target images instead)"
        ),
        curve_pairs=_curve_pairs(base, ds),
        F=found["loss"],
        Fd=found["dice"],
        **{k.lower(): verdict_sentence(found["loss"][k]) for k in ("F1", "F2", "F6", "F7")},
    )


STUDY_CURVE_PAIR_NM = (-10.0, 5.0)  # the study's example of a mixture curve (a → b)


def _curve_pairs(base, transfer) -> str:
    """Which (a → b) pairs the mixture curves of this build show, and where the study's own
    example pair is among them."""
    a0, b0 = STUDY_CURVE_PAIR_NM
    pairs = [(a, b) for a in base["domain_a"].values.tolist()
             for b in base["domain_b"].values.tolist() if a != b]  # fmt: skip
    names = ", ".join(f"{a:g} → {b:g} nm" for a, b in pairs).replace("-", "−")
    if (a0, b0) in pairs:
        return f"This build's pairs are {names}, the study's example among them."
    targets = {b for a, b in pairs if a == a0} or {b for _, b in pairs}
    nearest = sorted(targets, key=lambda b: (abs(b - b0), b))
    near = " and ".join((f"+{b:g}" if b > 0 else f"{b:g}").replace("-", "−") + " nm"
                        for b in nearest[:2])  # fmt: skip
    return (
        f"The study's own example pair, −10 → +5 nm, needs a defocus this profile does not "
        f"simulate; this build's pairs are {names}, whose targets {near} are the nearest to it."
    )


def ood(results_dir: str | Path, reduction: str) -> Numbers:
    """Chapter 8: spread, OOD and in-distribution gaps."""
    ds = load_databases(results_dir, ["defocus"])["defocus"]

    def text(metric: str) -> str:
        n = ood_numbers(ds, reduce=reduction, metric=metric)
        seeds = by_seed(ood_numbers, ds, reduce=reduction, metric=metric)

        def at(key: str, f=f3) -> str:
            return iv((x[key] for x in seeds), f)

        idg = (
            f"the median in-distribution gap after transfer is {at('id_gap', signed)}"
            if math.isfinite(n["id_gap"])
            else "the in-distribution gap is undefined: no target is also a pretraining domain"
        )
        return (
            f"over {n['configurations']:,} configurations the median spread S is "
            f"{at('spread_before')} after pretraining and {at('spread_after')} after "
            f"transfer (median shift {at('spread_shift', signed)}; it grew for "
            f"{at('spread_grew', pct)} of them); the median OOD gap is {at('ood_before')} "
            f"before and {at('ood_after')} after transfer; {idg}"
        )

    return Numbers(loss=text("loss"), dice=text("dice"))


def noise_structure(results_dir: str | Path, reduction: str) -> Numbers:
    """Chapter 9: dose and structure heatmaps and the size histograms; findings 5 and 8."""
    dbs = load_databases(results_dir)
    found = _findings(dbs, results_dir)
    dose, structure = dbs["dose"], dbs["structure"]
    n = heatmap_numbers(dose, reduce=reduction)
    small = {
        "pretrain_domain": domains_of_size(structure, "pretrain_domain", "small"),
        "target_domain": domains_of_size(structure, "target_domain", "small"),
    }
    s = heatmap_numbers(structure, select=small, reduce=reduction)
    sizes = by_seed(size_numbers, structure, reduce=reduction)
    size_text = "; ".join(
        f"{pair}: {iv(x['before'][pair] for x in sizes)} before, "
        f"{iv(x['after'][pair] for x in sizes)} after transfer"
        for pair in sizes[0]["after"]
    )
    return Numbers(
        dose_runs=plural(n["runs"], "finished transfer run"),
        dose_heat=_heatmap_text(
            n, by_seed(heatmap_numbers, dose, reduce=reduction), "e⁻/Å²", "loss"
        ),  # fmt: skip
        structure_runs=plural(s["runs"], "finished transfer run"),
        lattice_heat=_heatmap_text(
            s, by_seed(heatmap_numbers, structure, select=small, reduce=reduction), "", "loss"
        ),
        sizes=size_text,
        F=found["loss"],
        Fd=found["dice"],
        f5=verdict_sentence(found["loss"]["F5"]),
        f8=verdict_sentence(found["loss"]["F8"]),
    )


def _deviation_text(name: str, n: dict, seeds: list[dict], unit: str) -> str:
    """The series' mean Dice deviation from the in-domain ideal and its worst pair (chosen on
    the whole database, ``n``), each as the mean over seeds (``seeds``: the gaps of each seed
    alone, on the error scale) with its interval."""
    a, b = n["worst_pair"]
    pair = f"{a:g} → {b:g} {unit}".strip() if isinstance(a, float) else f"{a} → {b}"
    mean = iv((-g["mean_gap"] for g in seeds), signed)
    worst = iv((-g["gaps"].get(n["worst_pair"], math.nan) for g in seeds), signed)
    return f"{name}: {mean} on average, worst {pair} ({worst})"


def companion(results_dir: str | Path, reduction: str) -> Numbers:
    """Chapter "Generalization without transfer": the companion study's matrices, the training
    dynamics, the held-out study and G1-G6, D1-D2."""
    from ..figures.companion import companion_numbers

    dbs = load_databases(results_dir)
    found = _findings(dbs, results_dir)
    gen = generalization_databases(results_dir)
    models = sum(int((ds["status"].values == "ok").sum()) for ds in gen.values())
    nd = companion_numbers(gen, "dice")
    gaps = {s: by_seed(generalization_study.generalization_gaps, gen[s], "dice") for s in nd}
    # the mean in-domain Dice over each series' domains, per seed
    ideal_text = "; ".join(
        f"{s}: {iv(float(np.mean(list(g['ideal'].values()))) for g in gaps[s])}" for s in nd
    )
    order = sorted(nd, key=lambda s: nd[s]["mean_deviation"])
    return Numbers(
        models=plural(models, "model"),
        series=", ".join(gen),
        ideal=ideal_text,
        deviations="; ".join(_deviation_text(s, nd[s], gaps[s], get_series(s).unit) for s in order),
        hardest=order[0] if order else "n/a",
        F=found["loss"],
        Fd=found["dice"],
        **{k.lower(): verdict_sentence(found["dice"][k]) for k in COMPANION_FINDINGS},
        heldout=heldout_numbers(dbs.get("heldout")),
        **_first_epoch_numbers(gen),
    )


COMPANION_FINDINGS = ("G1", "G2", "G3", "G4", "G5", "G6", "D1", "D2")


def _first_epoch_numbers(gen: dict) -> dict[str, str]:
    """The Dice of the models trained without transfer on their own domain: after the first
    epoch (validation images) and as kept (test images), each the mean over the models of a
    seed, with the interval over seeds."""
    first, kept = [], []
    for ds in gen.values():
        history = ds["history_dice"].sel(stage="pretrain", epoch=generalization_study.EARLY_EPOCH)
        first.append(on_domain(history, "train_domain").transpose("seed", ...).values)
        final = ds["final_dice"].sel(stage="pretrain")
        kept.append(on_domain(final, "train_domain").transpose("seed", ...).values)
    if not first:
        return {"first_epoch": "n/a", "kept": "n/a"}
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        per_seed = [np.nanmean(np.concatenate(v, axis=1), axis=1) for v in (first, kept)]
    return {"first_epoch": iv(per_seed[0]), "kept": iv(per_seed[1])}


def heldout_numbers(ds) -> Numbers:
    """The held-out study in words: its models and the Dice on the experimental-like images by
    case (median over variants and seeds)."""

    if ds is None:
        return Numbers(models="no models", before="n/a", after="n/a", biased="n/a", n="n/a",
                       variants="n/a", sizes="n/a", small="n/a")  # fmt: skip
    table = heldout_study.heldout_table(ds, "dice")

    def case(c: str) -> str:  # median over the variants, per seed
        if c not in table["case"].values:
            return "n/a"
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return iv(np.nanmedian(table.sel(case=c).values, axis=0))

    runs = int((ds["status"].values == "ok").sum())
    profile = PROFILES.get(str(ds.attrs.get("profile")))
    return Numbers(
        models=plural(runs, "transfer run"),
        variants=", ".join(str(v) for v in ds["pretrain_domain"].values.tolist()),
        before=case("before"),
        after=case("after"),
        biased=case("after-biased"),
        n=str(int(ds.attrs["n_transfer"])) if "n_transfer" in ds.attrs else "a few",
        sizes=_radii(_heldout_radii(profile.data, "experimental")) if profile else "n/a",
        small=_radii(_heldout_radii(profile.data, "experimental-small")) if profile else "n/a",
    )


def _heldout_radii(data, domain) -> tuple[float, float]:
    return get_series("heldout").scene(data, domain)[1]


def _radii(r) -> str:
    return f"radii {_range(r)} nm"


def findings(results_dir: str | Path) -> Numbers:
    """Chapter "Findings": every finding under the loss and under Dice, each rule's error rates
    on the build's profile, and the rule set's stamp."""
    from .. import power

    dbs = load_databases(results_dir)
    found = _findings(dbs, results_dir)
    profile = _profile_of(dbs)
    keys = findings_mod.RULE_KEYS
    table = {name: dict.fromkeys(keys, "n/a")
             for name in ("false_pass", "power", "false_fail", "reach", "planted")}  # fmt: skip
    powers = {}
    if profile in PROFILES:  # the error rates on the build's own grid
        rates = power.cached_table(profile, analysis_cache(Path(results_dir), "power"))
        for key in keys:
            r = rates[key]
            if math.isfinite(r["power"]):
                powers[key] = r["power"]
            table["false_pass"][key], table["power"][key] = pct(r["false_pass"]), pct(r["power"])
            table["false_fail"][key], table["planted"][key] = pct(r["false_fail"]), r["effect"]
            scale = evidence.SCALES[r["scale"]]
            most = max(power.DETECTABLE_SCALES) * scale.delta
            table["reach"][key] = (
                evidence.effect_text(scale.name, r["reach"]) if math.isfinite(r["reach"])
                else f"beyond {evidence.effect_text(scale.name, most)}"
                if math.isfinite(r["power"]) else "n/a"
            )  # fmt: skip
    return Numbers(
        F=found["loss"],
        Fd=found["dice"],
        sha=findings_mod.ruleset_sha(),
        date=findings_mod.RULESET_DATE,
        delta=evidence.pct_change(evidence.DELTA),
        delta_abs=evidence.pct_change(evidence.DELTA).lstrip("+"),
        n_powered=(f"{sum(r >= 0.8 for r in powers.values())} of {len(keys)}" if powers else "n/a"),
        confidence=f"{evidence.CONFIDENCE:.0%}",
        rho_delta=f"{evidence.RHO_DELTA:.1f}",
        source={r.key: _source_text(r) for r in findings_mod.RULES},
        stamps=_stamps(dbs),
        regime=regime(profile) if profile in PROFILES else "",
        n_test=_n_test(dbs),
        **table,
        **_overview(dbs, found, profile).__dict__,
    )


def _n_test(dbs: dict) -> str:
    """The test images per domain behind the build's per-image scores (``"16"``), or "n/a"."""
    counts = {
        int(ds["image_loss"].notnull().sum("test_image").max())
        for ds in dbs.values() if "image_loss" in ds
    }  # fmt: skip
    counts.discard(0)
    return "–".join(str(n) for n in sorted(counts)) if counts else "n/a"


def _source_text(rule) -> str:
    seed, locator = rule.source
    if not seed:
        return "a statement of the published study that is not among our excerpts of it"
    return f"excerpt {seed} of ../shared/seeds, the sentence with “{locator}”"


def _stamps(dbs: dict) -> str:
    stale = findings_mod.stale(dbs)
    if not stale:
        return f"every database of this build carries it ({len(dbs)} of {len(dbs)})"
    return (
        f"{len(dbs) - len(stale)} of {len(dbs)} databases carry it; "
        + ", ".join(f"{s} carries {v}" for s, v in stale.items())
        + " and is not scored"
    )


def regime(profile: str) -> str:
    """Where the profile sits against the study (the ``paper`` profile) in quantities that
    govern the findings: electrons per pixel, particle radius in pixels, transfer set against
    pretraining — all from the two configurations."""
    p, paper = get_profile(profile), get_profile("paper")
    px, study_px = p.data.sim.pixel_A, paper.data.sim.pixel_A
    doses = list(p.data.doses)
    fixed = (p.data.defocus_series_dose, p.data.structure_series_dose)
    study_fixed = (paper.data.defocus_series_dose, paper.data.structure_series_dose)
    r = p.data.series_radius_nm
    sizes = p.studies.get("defocus", {}).get("n_transfer", ())
    sizes = sizes if isinstance(sizes, tuple) else (sizes,)
    share = ", ".join(f"{n}/{p.n_pretrain}" for n in sizes) or "n/a"

    def per_px(values, pixel) -> str:
        return ", ".join(f"{d * pixel**2:g}" for d in values)

    return (
        f"At {px:g} Å per pixel the {profile} dose series ({', '.join(f'{d:g}' for d in doses)} "
        f"e⁻/Å²) puts {per_px(doses, px)} electrons on a pixel; the study's "
        f"({', '.join(f'{d:g}' for d in paper.data.doses)} e⁻/Å² at {study_px:g} Å) put "
        f"{per_px(paper.data.doses, study_px)}. The other series, at {fixed[0]:g} and "
        f"{fixed[1]:g} e⁻/Å², put {per_px(fixed, px)} electrons on a pixel where the study's put "
        f"{per_px(study_fixed, study_px)}: their images are far cleaner than the study's, a "
        "regime we did not match. A particle of "
        f"radius {r[0]:g}–{r[1]:g} nm spans {10 * r[0] / px:g}–{10 * r[1] / px:g} pixels here and "
        f"{10 * r[0] / study_px:g}–{10 * r[1] / study_px:g} at the study's sampling. Transfer sets "
        f"hold {share} of the pretraining images (the study: 64 to 512 of 512)."
    )  # fmt: skip
