"""The four study grids of the paper, as data.

A study is a set of axes (the grid) plus settings held fixed. Every grid cell is one run config
(:mod:`hrtem_book.config`), identified by its ``config_hash``:

==========  ===============================================================  =================
study       axes (dims of the results database, ``seed`` last)              paper runs
==========  ===============================================================  =================
defocus     pretrain_domain, target_domain, n_transfer, pretrain_lr,          7,200 transfer on
            transfer_lr, freeze, seed                                        30 pretrainings
baseline    domain_a, domain_b, mix, lr, seed                                720 mixtures
dose        pretrain_domain, target_domain, freeze, seed                     180 transfer on 15
structure   pretrain_domain, target_domain, freeze, seed                     2,754 transfer on 54
==========  ===============================================================  =================

The companion's synthetic → experimental question is the ``heldout`` study: pretrainings on
synthetic variants (``pretrain_domain``: varied or fixed support thickness, small or large
particles only) transferred on a few images of an experimental-like domain (``target_domain``:
``experimental``, or ``experimental-small``, a transfer set biased to small particles), every
run evaluated on the experimental-like test images before and after transfer.

The companion study (Sytwu et al.) trains without transfer and tests everywhere: one
``generalization-<series>`` study per series (defocus, dose, structure, magnification, substrate)
with axes ``train_domain, seed``; each model is one pretraining on ``train_domain``, evaluated on
every domain of its series (the database's ``eval_domain`` is the test domain). A pretraining
whose config equals one of a transfer study (same series, domain, learning rate, seed, data,
model and stage) is the same run: its checkpoint is trained once and read by both.
``generalization`` names the whole group on the command line.

Domain values are defocus [nm], dose [e⁻/Å²] or structure names ``"<lattice>-<size>"``. Cells
where the target equals the pretraining domain are *excluded* (the paper transfers to the other
domains only). A baseline cell ``(domain_a, domain_b, mix="128:384")`` trains one model on
128 images of ``domain_a`` and 384 of ``domain_b``; the mirrored cell
``(domain_b, domain_a, "384:128")`` is the same model (one config, one run), so the
5 × 10 × 3 × 2 × 3 = 900 baseline cells hold 720 distinct runs. The paper's structure study
(18 sets, ordered pairs, 3 freeze options, 3 replicates) has exactly 18 · 17 · 3 · 3 = 2,754
runs; its text says "about 2,500".

A profile's ``studies`` mapping (study → axis or fixed setting → values) shrinks these grids; it
may replace values but never drop an axis, so every figure finds the dims it needs.
"""

from __future__ import annotations

import functools
import itertools
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .config import (
    FREEZE_OPTIONS,
    DataConfig,
    MixtureConfig,
    PretrainConfig,
    RunConfig,
    TransferConfig,
    config_hash,
    normalize_domain,
)
from .series import GENERALIZATION_SERIES, HELDOUT_MEASURED, HELDOUT_SYNTHETIC, get_series

STAGES_TRANSFER = ("pretrain", "transfer")
STAGES_MIXTURE = ("mixture",)
STAGES_PRETRAIN = ("pretrain",)
KINDS = {"transfer": STAGES_TRANSFER, "mixture": STAGES_MIXTURE, "pretrain": STAGES_PRETRAIN}
PAPER_SEEDS = (0, 1, 2)  # three replicates
PAPER_PRETRAIN_DEFOCI_NM = (-10.0, -5.0, 0.0, 5.0, 10.0)


def _transfer_paper_values(data: DataConfig, series: str) -> dict[str, tuple]:
    """Every ordered pair of the series' domains, all freezing options, three replicates."""
    domains = data.domains(series)
    return {
        "pretrain_domain": domains,
        "target_domain": domains,
        "freeze": FREEZE_OPTIONS,
        "seed": PAPER_SEEDS,
    }


def _defocus_paper_values(data: DataConfig, series: str) -> dict[str, tuple]:
    return {
        "pretrain_domain": PAPER_PRETRAIN_DEFOCI_NM,
        "target_domain": data.domains(series),
        "n_transfer": (64, 128, 256, 512),
        "pretrain_lr": (1e-3, 1e-4),
        "transfer_lr": (1e-4, 1e-5),
        "freeze": FREEZE_OPTIONS,
        "seed": PAPER_SEEDS,
    }


def _generalization_paper_values(data: DataConfig, series: str) -> dict[str, tuple]:
    """Every domain of the series as a training domain, three replicates."""
    return {"train_domain": data.domains(series), "seed": PAPER_SEEDS}


def _baseline_paper_values(data: DataConfig, series: str) -> dict[str, tuple]:
    return {
        "domain_a": PAPER_PRETRAIN_DEFOCI_NM,
        "domain_b": data.domains(series),
        "mix": ("128:384", "256:256", "384:128"),
        "lr": (1e-3, 1e-4),
        "seed": PAPER_SEEDS,
    }


@dataclass(frozen=True)
class StudySpec:
    """Shape of one study: its axes (database dims), stages, fixed settings and the paper's
    axis values (``paper(data, series) -> {axis: values}``)."""

    name: str
    series: str  # dataset series the runs train on
    # "transfer" (pretrain → transfer), "mixture" (one stage on two domains) or "pretrain" (one
    # stage on one domain, evaluated on all)
    kind: str
    axes: tuple[str, ...]
    domain_axes: tuple[str, ...]  # axes whose values are domains of ``series``
    paper: Callable[[DataConfig, str], dict[str, tuple]] = _transfer_paper_values
    fixed: dict[str, Any] = field(default_factory=dict)  # settings held constant (paper values)
    description: str = ""

    @property
    def stages(self) -> tuple[str, ...]:
        return KINDS[self.kind]


_TRANSFER_FIXED = {"pretrain_lr": 1e-4, "transfer_lr": 1e-5, "n_transfer": 128}

STUDIES: dict[str, StudySpec] = {
    "defocus": StudySpec(
        name="defocus",
        series="defocus",
        kind="transfer",
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
        paper=_defocus_paper_values,
        description="Transfer between defoci [nm]: data size, learning rates, freezing.",
    ),
    "baseline": StudySpec(
        name="baseline",
        series="defocus",
        kind="mixture",
        axes=("domain_a", "domain_b", "mix", "lr", "seed"),
        domain_axes=("domain_a", "domain_b"),
        paper=_baseline_paper_values,
        description="One stage on a mixture of two defoci; mix 'n_a:n_b' images of a and b.",
    ),
    "dose": StudySpec(
        name="dose",
        series="dose",
        kind="transfer",
        axes=("pretrain_domain", "target_domain", "freeze", "seed"),
        domain_axes=("pretrain_domain", "target_domain"),
        fixed=dict(_TRANSFER_FIXED),
        description="Transfer between electron doses [e⁻/Å²].",
    ),
    "structure": StudySpec(
        name="structure",
        series="structure",
        kind="transfer",
        axes=("pretrain_domain", "target_domain", "freeze", "seed"),
        domain_axes=("pretrain_domain", "target_domain"),
        fixed=dict(_TRANSFER_FIXED),
        description="Transfer between crystal structures and particle sizes.",
    ),
}
for _series in GENERALIZATION_SERIES:
    STUDIES[f"generalization-{_series}"] = StudySpec(
        name=f"generalization-{_series}",
        series=_series,
        kind="pretrain",
        axes=("train_domain", "seed"),
        domain_axes=("train_domain",),
        paper=_generalization_paper_values,
        fixed={"pretrain_lr": _TRANSFER_FIXED["pretrain_lr"]},
        description=f"Trained on one {_series} domain, tested on every one (no transfer).",
    )


def _heldout_paper_values(data: DataConfig, series: str) -> dict[str, tuple]:
    """Every synthetic variant as pretraining, each experimental-like domain as target."""
    return {
        "pretrain_domain": HELDOUT_SYNTHETIC,
        "target_domain": HELDOUT_MEASURED,
        "seed": PAPER_SEEDS,
    }


STUDIES["heldout"] = StudySpec(
    name="heldout",
    series="heldout",
    kind="transfer",
    axes=("pretrain_domain", "target_domain", "seed"),
    domain_axes=("pretrain_domain", "target_domain"),
    paper=_heldout_paper_values,
    # the companion's transfer to a few experimental images: the study's rates, nothing frozen
    fixed={**_TRANSFER_FIXED, "n_transfer": 64, "freeze": "none"},
    description="Synthetic variants → experimental-like images: Dice before and after transfer "
    "on a few of them, one transfer set biased to small particles.",
)
STUDY_NAMES = tuple(STUDIES)
# names that stand for several studies on the command line
STUDY_GROUPS = {
    "generalization": tuple(s for s in STUDY_NAMES if STUDIES[s].kind == "pretrain"),
    "all": STUDY_NAMES,
}


def get_study(name: str) -> StudySpec:
    """The named study spec, or a clear error listing the allowed names."""
    try:
        return STUDIES[name]
    except KeyError:
        raise ValueError(f"unknown study {name!r}; allowed: {', '.join(STUDIES)}") from None


def paper_values(study: str, data: DataConfig) -> dict[str, tuple]:
    """The paper's axis values; domain axes default to every domain of ``data``."""
    spec = get_study(study)
    return spec.paper(data, spec.series)


def parse_mix(mix: str) -> tuple[int, int]:
    """``"128:384"`` → (128, 384): images of domain_a and domain_b in a baseline mixture."""
    try:
        a, b = (int(p) for p in str(mix).split(":"))
    except ValueError:
        raise ValueError(f"mix={mix!r} is not allowed: write 'n_a:n_b', e.g. '128:384'") from None
    if a < 0 or b < 0 or a + b == 0:
        raise ValueError(f"mix={mix!r}: image counts must be >= 0 and not both 0")
    return a, b


@dataclass(frozen=True)
class StudyGrid:
    """A study resolved for one profile: axis values, fixed settings and the run of every cell.

    ``cells`` maps a cell (values in ``spec.axes`` order) to its run config; excluded cells
    (target = pretraining domain) are absent. ``runs`` holds each distinct config once (mirrored
    baseline cells share one), ``pretrains`` the pretrainings the transfer runs load.
    """

    spec: StudySpec
    coords: dict[str, tuple]
    fixed: dict[str, Any]
    eval_domains: tuple
    cells: dict[tuple, RunConfig]

    @cached_property
    def hashes(self) -> dict[tuple, str]:
        """Config hash (run id) of every cell."""
        return {cell: config_hash(cfg) for cell, cfg in self.cells.items()}

    @cached_property
    def runs(self) -> dict[str, RunConfig]:
        """Distinct run configs of the grid by config hash (insertion = grid order)."""
        out: dict[str, RunConfig] = {}
        for cell, cfg in self.cells.items():
            out.setdefault(self.hashes[cell], cfg)
        return out

    @cached_property
    def pretrains(self) -> dict[str, PretrainConfig]:
        """Distinct pretrainings that the transfer runs of this grid load."""
        seen: dict[int, PretrainConfig] = {}  # one object per pretraining (see build_grid)
        for cfg in self.cells.values():
            if cfg.loads is not None:
                seen.setdefault(id(cfg.loads), cfg.loads)
        return {config_hash(p): p for p in seen.values()}


_FIXED_TYPES = {"pretrain_lr": float, "transfer_lr": float, "n_transfer": int}


def _fixed_value(study: str, key: str, value: Any) -> Any:
    """A fixed setting as the type its axis would have (so 1 and 1.0 give one config hash)."""
    cast = _FIXED_TYPES.get(key)
    if cast is None:
        return value
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or (cast is int and value != int(value)):
        kind = "an integer" if cast is int else "a number"
        raise ValueError(
            f"study {study!r}: {key}={value!r} is a fixed setting here; allowed: one value, {kind}"
        )
    return cast(value)


def _resolve_values(spec: StudySpec, data: DataConfig, overrides: dict) -> tuple[dict, dict]:
    coords = paper_values(spec.name, data)
    fixed = dict(spec.fixed)
    for key, values in overrides.items():
        if key in coords:
            vals = tuple(values) if isinstance(values, list | tuple) else (values,)
            if not vals:
                raise ValueError(f"study {spec.name!r}: axis {key!r} needs at least one value")
            coords[key] = vals
        elif key in fixed:
            fixed[key] = _fixed_value(spec.name, key, values)
        else:
            allowed = ", ".join(list(coords) + list(fixed))
            raise ValueError(
                f"study {spec.name!r} has no axis or setting {key!r}; allowed: {allowed}"
            )
    available = data.domains(spec.series)
    for axis in spec.domain_axes:
        vals = tuple(normalize_domain(spec.series, v) for v in coords[axis])
        missing = [v for v in vals if v not in available]
        if missing:
            raise ValueError(
                f"study {spec.name!r}: {axis} values {missing} are not domains of the profile's "
                f"{spec.series} series; allowed: {list(available)}"
            )
        coords[axis] = vals
    for axis in ("pretrain_lr", "transfer_lr", "lr"):
        if axis in coords:
            coords[axis] = tuple(float(v) for v in coords[axis])
    for axis in ("n_transfer", "seed"):
        if axis in coords:
            coords[axis] = tuple(int(v) for v in coords[axis])
    for axis in ("freeze", "mix"):
        if axis in coords:
            coords[axis] = tuple(str(v) for v in coords[axis])
    for name, values in coords.items():
        if len(set(values)) != len(values):
            raise ValueError(f"study {spec.name!r}: axis {name!r} repeats values {values}")
    return coords, fixed


def build_grid(study: str, profile) -> StudyGrid:
    """Resolve ``study`` for a :class:`~hrtem_book.profiles.Profile` (its ``studies`` entry)."""
    spec = get_study(study)
    overrides = dict(profile.studies.get(study, {}))
    coords, fixed = _resolve_values(spec, profile.data, overrides)
    data, model, stage = profile.data, profile.model, profile.stage
    transfer_stage = profile.transfer
    series = get_series(spec.series)

    def n_train(domain) -> int:  # training images of a domain (fewer for the recorded ones)
        return series.n_train(data, domain)

    @functools.cache  # one object per pretraining, shared by its transfer runs
    def pretrain(domain, lr, seed) -> PretrainConfig:
        if profile.n_pretrain > n_train(domain):
            raise ValueError(
                f"n_pretrain={profile.n_pretrain} exceeds the {n_train(domain)} train images of "
                f"{domain!r}"
            )
        return PretrainConfig(
            data=data,
            series=spec.series,
            domain=domain,
            lr=lr,
            seed=seed,
            model=model,
            stage=stage,
            n_train=profile.n_pretrain,
        )

    cells: dict[tuple, RunConfig] = {}
    for cell in itertools.product(*(coords[a] for a in spec.axes)):
        v = dict(zip(spec.axes, cell, strict=True))
        if spec.kind == "pretrain":
            cells[cell] = pretrain(v["train_domain"], fixed["pretrain_lr"], v["seed"])
            continue
        if spec.kind == "mixture":
            if v["domain_a"] == v["domain_b"]:
                continue
            n_a, n_b = parse_mix(v["mix"])
            if n_a > n_train(v["domain_a"]) or n_b > n_train(v["domain_b"]):
                raise ValueError(f"mix={v['mix']!r} needs more than the train images of "
                                 f"{v['domain_a']!r} ({n_train(v['domain_a'])}) and "
                                 f"{v['domain_b']!r} ({n_train(v['domain_b'])})")  # fmt: skip
            # canonical order (sorted domains) so the mirrored cell is the same config
            pairs = sorted([(v["domain_a"], n_a), (v["domain_b"], n_b)], key=lambda p: p[0])
            cells[cell] = MixtureConfig(
                data=data,
                series=spec.series,
                domains=(pairs[0][0], pairs[1][0]),
                n_images=(pairs[0][1], pairs[1][1]),
                lr=v["lr"],
                seed=v["seed"],
                model=model,
                stage=stage,
            )
            continue
        if v["pretrain_domain"] == v["target_domain"]:
            continue
        n_transfer = v.get("n_transfer", fixed.get("n_transfer"))
        if n_transfer > n_train(v["target_domain"]):
            raise ValueError(
                f"n_transfer={n_transfer} exceeds the {n_train(v['target_domain'])} train images "
                f"of {v['target_domain']!r}"
            )
        cells[cell] = TransferConfig(
            pretrain=pretrain(
                v["pretrain_domain"], v.get("pretrain_lr", fixed.get("pretrain_lr")), v["seed"]
            ),
            domain=v["target_domain"],
            n_train=n_transfer,
            lr=v.get("transfer_lr", fixed.get("transfer_lr")),
            freeze=v.get("freeze", fixed.get("freeze")),
            stage=transfer_stage,
        )
    return StudyGrid(
        spec=spec,
        coords=coords,
        fixed=fixed,
        eval_domains=data.domains(spec.series),
        cells=cells,
    )


def expand_studies(studies: str | Sequence[str]) -> list[str]:
    """Study names, with each group name (``all``, ``generalization``) replaced by its studies."""
    names = [studies] if isinstance(studies, str) else list(studies)
    out: list[str] = []
    for name in names:
        if name in STUDY_GROUPS:
            out.extend(STUDY_GROUPS[name])
        elif name in STUDY_NAMES:
            out.append(name)
        else:
            allowed = ", ".join([*STUDY_NAMES, *STUDY_GROUPS])
            raise ValueError(f"unknown study {name!r}; allowed: {allowed}")
    return list(dict.fromkeys(out))
