"""The studies, one module each: its grid, its database views, its findings as rules.

==========================  ===============================================  ==================
module                      studies (axes of the database, ``seed`` last)     paper runs
==========================  ===============================================  ==================
:mod:`.defocus`             defocus: pretrain_domain, target_domain,          7,200 transfer on
                            n_transfer, pretrain_lr, transfer_lr, freeze      30 pretrainings
:mod:`.baseline`            baseline: domain_a, domain_b, mix, lr            720 mixtures
:mod:`.dose`                dose: pretrain_domain, target_domain, freeze     180 transfer on 15
:mod:`.structure`           structure: pretrain_domain, target_domain,       2,754 transfer on
                            freeze                                           54
:mod:`.generalization`      generalization-<series>: train_domain            (the companion's)
:mod:`.heldout`             heldout: pretrain_domain, target_domain          (the companion's)
==========================  ===============================================  ==================

A study module holds ``SPECS`` (its :class:`~.grid.StudySpec` objects), ``RULES`` (its findings
as :class:`~hrtem_book.evidence.Rule` data), optionally ``GROUPS`` (names that stand for several
of its studies on the command line) and the views its rules and figures read. This module
gathers them in one registry (:data:`STUDIES`, :data:`RULES`) that the sweep, the database, the
findings and the book read; :func:`register` adds a study module to it (the recipe in
``docs/ARCHITECTURE.md``). What the studies share lives below them: the grid and its kinds in
:mod:`.grid`, the analysis in :mod:`hrtem_book.analysis`, the rule format in
:mod:`hrtem_book.evidence`.

Domain values are defocus [nm], dose [e⁻/Å²], pixel size [Å], support thickness [nm] or names
(``"<lattice>-<size>"``, the held-out variants).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from types import ModuleType

from ..evidence import Rule, Scenario
from . import baseline, defocus, dose, generalization, heldout, structure
from .grid import (
    MIXTURE,
    PAPER_SEEDS,
    PRETRAIN,
    TRANSFER,
    StudyGrid,
    StudyKind,
    StudySpec,
    parse_mix,
    resolve,
)

__all__ = [
    "MIXTURE", "PAPER_SEEDS", "PRETRAIN", "RULES", "STUDIES", "STUDY_GROUPS", "STUDY_NAMES",
    "TRANSFER", "StudyGrid", "StudyKind", "StudySpec", "build_grid", "expand_studies",
    "get_study", "paper_values", "parse_mix", "register", "registered", "scenarios",
]  # fmt: skip

# the book's order: the transfer study's findings (F), the companion's (G), its dynamics (D)
_FAMILIES = ("F", "G", "D")

STUDIES: dict[str, StudySpec] = {}
STUDY_GROUPS: dict[str, tuple[str, ...]] = {}
RULES: tuple[Rule, ...] = ()
_MODULES: list[ModuleType] = []


def _rule_order(rule: Rule) -> tuple:
    family = rule.key.rstrip("0123456789")
    rank = _FAMILIES.index(family) if family in _FAMILIES else len(_FAMILIES)
    return rank, family, int(rule.key[len(family) :] or 0)


def _rebuild() -> None:
    global RULES
    STUDIES.clear()
    STUDY_GROUPS.clear()
    for module in _MODULES:
        for spec in module.SPECS:
            STUDIES[spec.name] = spec
        STUDY_GROUPS.update(getattr(module, "GROUPS", {}))
    STUDY_GROUPS["all"] = tuple(STUDIES)
    RULES = tuple(sorted((r for m in _MODULES for r in m.RULES), key=_rule_order))


def register(module: ModuleType) -> None:
    """Add a study module (``SPECS``, ``RULES``, optional ``GROUPS``) to the registry; a study
    name or rule key that is taken already is refused."""
    names = {s.name for s in module.SPECS}
    keys = {r.key for r in module.RULES}
    taken = (names & set(STUDIES)) | (names & set(STUDY_GROUPS)) | (keys & {r.key for r in RULES})
    if taken:
        raise ValueError(f"study module {module.__name__}: {sorted(taken)} are taken already")
    _MODULES.append(module)
    _rebuild()


@contextlib.contextmanager
def registered(module: ModuleType) -> Iterator[ModuleType]:
    """:func:`register` for the duration of a ``with`` block (a study defined in a test)."""
    register(module)
    try:
        yield module
    finally:
        _MODULES.remove(module)
        _rebuild()


for _module in (defocus, baseline, dose, structure, generalization, heldout):
    register(_module)
STUDY_NAMES = tuple(STUDIES)  # the book's studies, in its order


def scenarios(key: str, coords: dict[str, dict]) -> tuple[list[Scenario], Scenario]:
    """Rule ``key``'s null scenarios and smallest claimed effect on ``coords`` (study → axis
    values), from the ``scenarios(coords)`` of the study module that holds the rule, which maps
    each of its rules' keys to them; :mod:`hrtem_book.power` plants them in the simulated
    databases that measure the rule's error rates (a plant returns the log error added to a
    cell, stage and evaluation domain)."""
    for module in _MODULES:
        if any(r.key == key for r in module.RULES) and hasattr(module, "scenarios"):
            return module.scenarios(coords)[key]
    raise ValueError(f"rule {key!r}; allowed: {', '.join(r.key for r in RULES)}")


def get_study(name: str) -> StudySpec:
    """The named study spec, or a clear error listing the allowed names."""
    try:
        return STUDIES[name]
    except KeyError:
        raise ValueError(f"unknown study {name!r}; allowed: {', '.join(STUDIES)}") from None


def paper_values(study: str, data) -> dict[str, tuple]:
    """The paper's axis values of ``study``; domain axes default to every domain of ``data``."""
    return get_study(study).paper_values(data)


def build_grid(study: str, profile) -> StudyGrid:
    """Resolve ``study`` for a :class:`~hrtem_book.profiles.Profile` (its ``studies`` entry)."""
    return resolve(get_study(study), profile)


def expand_studies(studies: str | Sequence[str]) -> list[str]:
    """Study names, with each group name (``all``, ``generalization``) replaced by its studies."""
    names = [studies] if isinstance(studies, str) else list(studies)
    out: list[str] = []
    for name in names:
        if name in STUDY_GROUPS:
            out.extend(STUDY_GROUPS[name])
        elif name in STUDIES:
            out.append(name)
        else:
            allowed = ", ".join([*STUDIES, *STUDY_GROUPS])
            raise ValueError(f"unknown study {name!r}; allowed: {allowed}")
    return list(dict.fromkeys(out))
