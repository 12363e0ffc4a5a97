"""What a study is, as data: its grid (axes, fixed settings, the paper's values), its kind, and
the run config of every grid cell for a profile.

A study is a set of axes (the grid) plus settings held fixed. Every grid cell is one run config
(:mod:`hrtem_book.config`), identified by its ``config_hash``; cells where a transfer's target
(or a mixture's second domain) equals its first domain are *excluded* — they have no run. A
pretraining whose config equals one of another study (same series, domain, learning rate, seed,
data, model and stage) is the same run: its checkpoint is trained once and read by both.

A profile's ``studies`` mapping (study → axis or fixed setting → values) shrinks a grid; it may
replace values but never drop an axis, so every figure finds the dims it needs. The studies
themselves — each grid with the views, rules and numbers that read its database — are the
modules of this package (:mod:`hrtem_book.studies`).
"""

from __future__ import annotations

import functools
import itertools
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

from ..config import (
    FREEZE_OPTIONS,
    DataConfig,
    MixtureConfig,
    PretrainConfig,
    RunConfig,
    TransferConfig,
    config_hash,
    normalize_domain,
)
from ..series import get_series

PAPER_SEEDS = (0, 1, 2)  # three replicates
# the paper's settings of a transfer study that does not vary them
PAPER_TRANSFER_FIXED = {"pretrain_lr": 1e-4, "transfer_lr": 1e-5, "n_transfer": 128}


def transfer_paper_values(data: DataConfig, series: str) -> dict[str, tuple]:
    """Every ordered pair of the series' domains, all freezing options, three replicates."""
    domains = data.domains(series)
    return {
        "pretrain_domain": domains,
        "target_domain": domains,
        "freeze": FREEZE_OPTIONS,
        "seed": PAPER_SEEDS,
    }


class _Cells:
    """What a kind needs to make the run of a cell: the profile's configs, each domain's count
    of training images, and one object per pretraining (shared by the transfers that load it)."""

    def __init__(self, spec: StudySpec, profile) -> None:
        self.spec, self.profile = spec, profile
        self.series = get_series(spec.series)
        self.pretrain = functools.cache(self._pretrain)

    def n_train(self, domain) -> int:
        """Training images of ``domain`` (fewer for the recorded ones)."""
        return self.series.n_train(self.profile.data, domain)

    def _pretrain(self, domain, lr, seed) -> PretrainConfig:
        p = self.profile
        if p.n_pretrain > self.n_train(domain):
            raise ValueError(
                f"n_pretrain={p.n_pretrain} exceeds the {self.n_train(domain)} train images of "
                f"{domain!r}"
            )
        return PretrainConfig(
            data=p.data,
            series=self.spec.series,
            domain=domain,
            lr=lr,
            seed=seed,
            model=p.model,
            stage=p.stage,
            n_train=p.n_pretrain,
        )


class StudyKind:
    """How a grid cell becomes a run: the stages a study's database holds and the run config of
    a cell (None: the cell is excluded). One instance per kind; code asks the kind, never
    compares its name."""

    name: ClassVar[str]
    stages: ClassVar[tuple[str, ...]]
    excludes_diagonal: ClassVar[bool] = True  # a cell whose two domain axes agree has no run
    loads_pretraining: ClassVar[bool] = False  # its runs start from a pretraining's checkpoint

    def config(self, v: Mapping[str, Any], fixed: Mapping[str, Any], cells: _Cells):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Transfer(StudyKind):
    """Pretraining on ``pretrain_domain`` → transfer on ``target_domain``."""

    name, stages, loads_pretraining = "transfer", TransferConfig.stage_names, True

    def config(self, v, fixed, cells) -> TransferConfig | None:
        if v["pretrain_domain"] == v["target_domain"]:
            return None
        n_transfer = v.get("n_transfer", fixed.get("n_transfer"))
        if n_transfer > cells.n_train(v["target_domain"]):
            raise ValueError(
                f"n_transfer={n_transfer} exceeds the {cells.n_train(v['target_domain'])} train "
                f"images of {v['target_domain']!r}"
            )
        pretrain = cells.pretrain(
            v["pretrain_domain"], v.get("pretrain_lr", fixed.get("pretrain_lr")), v["seed"]
        )
        return TransferConfig(
            pretrain=pretrain,
            domain=v["target_domain"],
            n_train=n_transfer,
            lr=v.get("transfer_lr", fixed.get("transfer_lr")),
            freeze=v.get("freeze", fixed.get("freeze")),
            stage=cells.profile.transfer,
        )


class Mixture(StudyKind):
    """One stage on a mixture of ``domain_a`` and ``domain_b`` (``mix`` = ``"n_a:n_b"``)."""

    name, stages = "mixture", MixtureConfig.stage_names

    def config(self, v, fixed, cells) -> MixtureConfig | None:
        if v["domain_a"] == v["domain_b"]:
            return None
        n_a, n_b = parse_mix(v["mix"])
        if n_a > cells.n_train(v["domain_a"]) or n_b > cells.n_train(v["domain_b"]):
            raise ValueError(f"mix={v['mix']!r} needs more than the train images of "
                             f"{v['domain_a']!r} ({cells.n_train(v['domain_a'])}) and "
                             f"{v['domain_b']!r} ({cells.n_train(v['domain_b'])})")  # fmt: skip
        # canonical order (sorted domains) so the mirrored cell is the same config
        pairs = sorted([(v["domain_a"], n_a), (v["domain_b"], n_b)], key=lambda p: p[0])
        p = cells.profile
        return MixtureConfig(
            data=p.data,
            series=cells.spec.series,
            domains=(pairs[0][0], pairs[1][0]),
            n_images=(pairs[0][1], pairs[1][1]),
            lr=v["lr"],
            seed=v["seed"],
            model=p.model,
            stage=p.stage,
        )


class Pretrain(StudyKind):
    """One stage on ``train_domain`` from scratch, evaluated on every domain."""

    name, stages, excludes_diagonal = "pretrain", PretrainConfig.stage_names, False

    def config(self, v, fixed, cells) -> PretrainConfig:
        return cells.pretrain(v["train_domain"], fixed["pretrain_lr"], v["seed"])


TRANSFER, MIXTURE, PRETRAIN = Transfer(), Mixture(), Pretrain()


@dataclass(frozen=True)
class StudySpec:
    """Shape of one study: its axes (database dims), kind, fixed settings and the paper's
    axis values (``paper(data, series) -> {axis: values}``)."""

    name: str
    series: str  # dataset series the runs train on
    kind: StudyKind
    axes: tuple[str, ...]
    domain_axes: tuple[str, ...]  # axes whose values are domains of ``series``
    paper: Callable[[DataConfig, str], dict[str, tuple]] = transfer_paper_values
    fixed: dict[str, Any] = field(default_factory=dict)  # settings held constant (paper values)
    description: str = ""

    @property
    def stages(self) -> tuple[str, ...]:
        return self.kind.stages

    def paper_values(self, data: DataConfig) -> dict[str, tuple]:
        """The paper's axis values; domain axes default to every domain of ``data``."""
        return self.paper(data, self.series)


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
    coords = spec.paper_values(data)
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


def resolve(spec: StudySpec, profile) -> StudyGrid:
    """Resolve ``spec`` for a :class:`~hrtem_book.profiles.Profile` (its ``studies`` entry)."""
    overrides = dict(profile.studies.get(spec.name, {}))
    coords, fixed = _resolve_values(spec, profile.data, overrides)
    make = _Cells(spec, profile)
    cells: dict[tuple, RunConfig] = {}
    for cell in itertools.product(*(coords[a] for a in spec.axes)):
        cfg = spec.kind.config(dict(zip(spec.axes, cell, strict=True)), fixed, make)
        if cfg is not None:
            cells[cell] = cfg
    return StudyGrid(
        spec=spec,
        coords=coords,
        fixed=fixed,
        eval_domains=profile.data.domains(spec.series),
        cells=cells,
    )
