"""The shape of the package: modules in data-flow order, each importing only upstream, and one
home (``layout``) for every path of the project folder."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hrtem_book"

# the pipeline, upstream first; a module may import only modules listed before it
ORDER = (
    "hrtem_book",  # __init__: the version only
    "hrtem_book._lazy",  # modules imported on first use (a refused command line never waits)
    "hrtem_book._torchvision",
    "hrtem_book.series",
    "hrtem_book.config",
    "hrtem_book.profiles",
    "hrtem_book.layout",
    "hrtem_book.records",
    "hrtem_book.structures",
    "hrtem_book.potentials",
    "hrtem_book.simulate",
    "hrtem_book.datasets",
    "hrtem_book.models",
    "hrtem_book.metrics",
    "hrtem_book.checkpoints",
    "hrtem_book.train",
    "hrtem_book.stacked",
    "hrtem_book.runs",
    "hrtem_book.database",  # the results database as read: variable names, queries
    "hrtem_book.evidence",  # the rule format, its intervals and decisions
    "hrtem_book.analysis",  # what every study's rules and views share
    "hrtem_book.studies.grid",  # what a study is: grid, kinds, the run of every cell
    "hrtem_book.studies.defocus",  # one module per study: grid, views, rules
    "hrtem_book.studies.baseline",
    "hrtem_book.studies.dose",
    "hrtem_book.studies.structure",
    "hrtem_book.studies.generalization",
    "hrtem_book.studies.heldout",
    "hrtem_book.studies",  # the registry of the studies
    "hrtem_book.executors",
    "hrtem_book.sweep",
    "hrtem_book.results",
    "hrtem_book.findings",  # the rules and their stamp (collect stamps the databases)
    "hrtem_book.power",
    "hrtem_book.testing",
    "hrtem_book.campaign",
    "hrtem_book.figures",
    "hrtem_book.figures._common",
    "hrtem_book.figures.generalization",
    "hrtem_book.figures.hyperparameters",
    "hrtem_book.figures.imaging_conditions",
    "hrtem_book.figures.structure",
    "hrtem_book.figures.companion",
    "hrtem_book.figures.architecture",
    "hrtem_book.figures.example_images",
    "hrtem_book.widgets",
    "hrtem_book.book.parameters",  # what a notebook or chapter declares, resolved
    "hrtem_book.book.pages",
    "hrtem_book.book.processes",
    "hrtem_book.book.check",
    "hrtem_book.book.browser",
    "hrtem_book.book.notebooks",
    "hrtem_book.book.build",
    "hrtem_book.book.live",
    "hrtem_book.book",
    "hrtem_book.commands",  # the pipeline's sub-commands: checks first, heavy modules after
    "hrtem_book.cli",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Every package module imported anywhere in the file (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    known = set(_modules())
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("hrtem_book")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("hrtem_book"):
                continue
            found.add(target)
            for alias in node.names:  # `from . import train` imports a module
                if f"{target}.{alias.name}" in known:
                    found.add(f"{target}.{alias.name}")
    return {m for m in found if m in known and m != name}


def test_every_module_has_a_place_in_the_pipeline():
    unplaced = sorted(set(_modules()) - set(ORDER))
    assert not unplaced, f"add {unplaced} to ORDER at its place in the data flow"


def test_modules_import_only_upstream_no_cycles():
    rank = {m: i for i, m in enumerate(ORDER)}
    problems = []
    for name, path in _modules().items():
        for target in sorted(_imports(name, path)):
            if rank[target] >= rank[name]:
                problems.append(f"{name} imports {target}, a later stage of the pipeline")
    assert not problems, "\n".join(problems)


# paths of the project folder: joined only in layout.py
LAYOUT_NAMES = re.compile(
    r"""/\s*["'](records|checkpoints|results|data|_build|\.chunks)["']"""
    r"""|["'](records|checkpoints|_build|\.chunks)["']"""
)


def test_no_project_path_is_joined_outside_the_layout_module():
    offenders = []
    for name, path in _modules().items():
        if name in ("hrtem_book.layout", "hrtem_book.cli"):  # cli: module names, not paths
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if LAYOUT_NAMES.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_series_names_are_not_branched_on_outside_the_series_module():
    """A new series is a spec in series.py, a new study a module of hrtem_book.studies: no
    `series == "structure"` or `study == "heldout"` branches elsewhere (a study module may
    name its own studies)."""
    pattern = re.compile(
        r"""(==|!=|\bin)\s*\(?["'](defocus|dose|structure|baseline|heldout|magnification|"""
        r"""substrate|generalization-\w+)["']"""
    )
    offenders = []
    for name, path in _modules().items():
        if name in ("hrtem_book.series", "hrtem_book.testing") or name.startswith(
            "hrtem_book.studies."
        ):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_a_chapter_kernel_imports_neither_the_build_step_nor_torch():
    """A chapter's `from hrtem_book.book import pages` (every chapter kernel of the book starts
    with it) loads the book package lazily: not the build step, the sweep or torch."""
    import subprocess
    import sys

    heavy = ("torch", "hrtem_book.sweep", "hrtem_book.book.build", "papermill")
    code = (
        "import sys; from hrtem_book.book import pages; "
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# the stopping and divergence rules of a stage (train.StoppingRule), the training loop
# (train.train_models, which the stacked engine runs too) and the direction of a metric
# (metrics.Metric) each have one home; no engine, figure or finding derives them again
RULE_PATTERNS = {
    "the plateau's improvement test": re.compile(r"\(1(\.0)? - [\w.]*min_delta\)"),
    "the plateau's patience test": re.compile(r">= [\w.]*patience\b"),
    "the divergence test": re.compile(r"> DIVERGED_LOSS\b"),
    "a metric's direction from its name": re.compile(r"""\b(metric|m)\s*[!=]=\s*["']loss["']"""),
    "a training loop over epochs": re.compile(r"for epoch in range\("),
}
RULE_HOMES = {
    "the plateau's improvement test": "hrtem_book.train",
    "the plateau's patience test": "hrtem_book.train",
    "the divergence test": "hrtem_book.train",
    "a metric's direction from its name": None,
    "a training loop over epochs": "hrtem_book.train",  # train_models: every engine's loop
}


def test_one_stopping_rule_and_one_home_of_a_metrics_direction():
    benchmarks = PACKAGE.parents[1] / "benchmarks"
    files = {**_modules(), **{f"benchmarks.{p.stem}": p for p in benchmarks.glob("*.py")}}
    found = {what: [] for what in RULE_PATTERNS}
    for name, path in files.items():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for what, pattern in RULE_PATTERNS.items():
                if pattern.search(line) and not line.lstrip().startswith("#"):
                    found[what].append((name, n))
    for what, where in found.items():
        home = RULE_HOMES[what]
        expected = [] if home is None else [home]
        assert [name for name, _ in where] == expected, (what, where)
