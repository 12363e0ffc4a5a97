"""The book build: database step, papermill execution, offline MyST build and its AST check.

Planted faults (a missing ``#app:`` target, a broken cross-reference, a failing cell) are built in
a tiny book in ``tmp_path`` so that each build takes seconds; the real book is built once against
synthetic databases (``testing.synthetic_database``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
import time
import zlib
from pathlib import Path

import nbformat
import pytest
from conftest import smoke_project

from hrtem_book import book, findings, results
from hrtem_book.cli import main
from hrtem_book.layout import Layout
from hrtem_book.profiles import PROFILES, get_profile
from hrtem_book.studies import STUDY_NAMES
from hrtem_book.testing import synthetic_database

SMOKE = get_profile("smoke")

ROOT = Path(__file__).resolve().parents[1]
needs_myst = pytest.mark.skipif(
    shutil.which("myst") is None and not (Path(sys.executable).parent / "myst").exists(),
    reason="mystmd is not installed (make setup installs the book extra)",
)


def _png(width: int = 4, height: int = 3, reduction: str | None = None) -> bytes:
    """A valid greyscale PNG (MyST refuses a missing or broken placeholder under --strict),
    optionally with the ``reduction`` text chunk that widgets.save_placeholder writes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    raw = b"".join(b"\x00" + bytes(range(width)) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    text = chunk(b"tEXt", b"reduction\x00" + reduction.encode()) if reduction else b""
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + text
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def synthetic_results(tmp_path_factory) -> Path:
    """A small valid database for every study, as the notebooks read it."""
    folder = tmp_path_factory.mktemp("results") / "smoke"
    for study in STUDY_NAMES:
        results.save_database(synthetic_database(study), folder / f"{study}.nc")
    return folder


# --- the tiny planted book --------------------------------------------------------------------
MYST_YML = """\
version: 1
project:
  title: Planted
  jupyter: true
  numbering: {figure: true}
  error_rules:
    - rule: reference-target-resolves
      severity: error
  toc:
    - file: chapters/a.md
    - pattern: notebooks/*.ipynb
"""

CHAPTER = """\
# Chapter

See [](#fig-x).

:::{figure} #app:x
:label: fig-x
:placeholder: ../figures/x.png
Median over seeds.
:::

The count is ![](#txt:count).
"""


def _notebook(extra_cells: tuple[str, ...] = ()) -> nbformat.NotebookNode:
    cells = [
        nbformat.v4.new_code_cell(
            'profile = "laptop"\nresults_dir = "../results/laptop"\nreduction = "median"\n'
            'figure_dir = "../figures"',
            metadata={"tags": ["parameters"]},
        ),
        nbformat.v4.new_code_cell(
            "from pathlib import Path\nPath(figure_dir).mkdir(exist_ok=True)\n"
            f"Path(figure_dir, 'x.png').write_bytes({_png(reduction='median')!r})"
        ),
        nbformat.v4.new_code_cell(
            "# | label: app:x\nfrom IPython.display import Image, display\n"
            "print(profile, reduction)\ndisplay(Image(filename=str(Path(figure_dir, 'x.png'))))"
        ),
        nbformat.v4.new_code_cell(
            "# | label: txt:count\nfrom IPython.display import Markdown\n"
            "Markdown(f'**{len(sorted(Path(results_dir).glob(\"*.nc\")))}** databases')"
        ),
        *(nbformat.v4.new_code_cell(src) for src in extra_cells),
    ]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nb


def _tiny_book(root: Path, chapter: str = CHAPTER, extra_cells: tuple[str, ...] = ()) -> Path:
    for sub in ("chapters", "notebooks", "figures"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "myst.yml").write_text(MYST_YML)
    (root / "refs.bib").write_text("")
    shutil.copytree(ROOT / "book", root / "book")  # the offline template config, not the book
    (root / "chapters" / "a.md").write_text(chapter)
    nbformat.write(_notebook(extra_cells), root / "notebooks" / "x.ipynb")
    (root / "figures" / "x.png").write_bytes(_png())
    return root


def _build_tiny(root: Path, results_dir: Path):
    return book.build_book(SMOKE, root, results_dir=results_dir, offline=True, log=lambda m: None)


@needs_myst
@pytest.mark.slow
def test_tiny_book_builds_offline_and_embeds_resolve(tmp_path, synthetic_results):
    root = _tiny_book(tmp_path / "b")
    result = _build_tiny(root, synthetic_results)
    assert result.kind == "site"
    pages = {p.stem: json.loads(p.read_text()) for p in (result.path / "content").glob("*.json")}
    text = json.dumps(pages)
    # the injected parameters reached the MyST execution: the app cell printed the profile
    assert "smoke median" in text
    # the txt: embed carries the number computed from the database (four studies)
    assert f"**{len(STUDY_NAMES)}** databases" in text
    assert (root / "_build" / "book" / "smoke" / "_build" / "papermill" / "x.ipynb").is_file()
    # MyST kept papermill's outputs (the notebook ran once) and did not execute it again
    staged = json.loads((root / "_build" / "book" / "smoke" / "notebooks" / "x.ipynb").read_text())
    assert staged["metadata"]["execute"] == {"skip": True} and "papermill" in staged["metadata"]


PLANTED = {  # fault → what the check must report
    "[](#fig-x)": ("[](#fig-nothere)", "'#fig-nothere'"),  # broken cross-reference
    "#app:x\n": ("#app:nothere\n", "#app:nothere"),  # missing app: target
    "#txt:count": ("#txt:nothere", "#txt:nothere"),  # missing txt: target
}


@needs_myst
@pytest.mark.slow
def test_every_build_executes_the_chapters_anew(tmp_path):
    """MyST keeps a page's outputs while the page's source is unchanged: a chapter whose cells
    read a database that changed since would state the old numbers. A second build of the same
    sources states the new value."""
    value = tmp_path / "value.txt"
    chapter = (
        "---\nkernelspec:\n  name: python3\n  display_name: Python 3\n---\n\n"
        + CHAPTER
        + f"\n```{{code-cell}} python\n:tags: [remove-cell]\nfrom pathlib import Path\n"
        f"value = Path({str(value)!r}).read_text()\n```\n\nThe value is {{eval}}`value`.\n"
    )
    root = _tiny_book(tmp_path / "b", chapter=chapter)
    stage = book.stage_book(root, tmp_path / "stage", book.figure_notebooks(root))
    for text in ("first-value", "second-value"):
        value.write_text(text)
        kind, site = book.build_site(stage, offline=True, log=lambda m: None)
        page = (site / "content" / "index.json").read_text()  # the first page: chapters/a.md
        assert text in page and kind == "site"


@needs_myst
@pytest.mark.slow
def test_planted_chapter_faults_each_fail_the_check(tmp_path):
    chapter = CHAPTER
    for good, (bad, _) in PLANTED.items():
        assert good in chapter
        chapter = chapter.replace(good, bad)
    root = _tiny_book(tmp_path / "b", chapter=chapter)
    # papermill is not under test here: stage the sources and build (one build, three faults)
    stage = book.stage_book(root, tmp_path / "stage", book.figure_notebooks(root))
    with pytest.raises(book.BookCheckError) as err:
        book.build_site(stage, offline=True, log=lambda m: None)
    for _, expected in PLANTED.values():
        assert any(expected in p for p in err.value.problems), (expected, err.value.problems)


@needs_myst
@pytest.mark.slow
def test_failing_cell_fails_papermill_and_the_myst_check(tmp_path, synthetic_results):
    root = _tiny_book(tmp_path / "b", extra_cells=("raise RuntimeError('planted')",))
    with pytest.raises(book.BookCheckError, match="RuntimeError: planted"):
        _build_tiny(root, synthetic_results)
    # the same fault met by `myst --execute` (papermill skipped): the build and the check fail
    stage = book.stage_book(root, tmp_path / "stage", book.figure_notebooks(root))
    with pytest.raises(book.BookCheckError) as err:
        book.build_site(stage, offline=True, log=lambda m: None)
    assert "RuntimeError" in str(err.value) or "status 1" in str(err.value)


HANG_ONCE = (
    "import os, time\n"
    "from pathlib import Path\n"
    "if not Path('tried').exists():  # the first run freezes as a lost kernel reply would\n"
    "    Path('tried').write_text(str(os.getpid()))\n"
    "    time.sleep(3600)"
)


def test_a_frozen_notebook_is_stopped_with_its_kernel_and_run_again(tmp_path):
    import psutil

    root = _tiny_book(tmp_path / "b", extra_cells=(HANG_ONCE,))
    (nb,) = book.figure_notebooks(root)
    lines: list[str] = []
    (out,) = book.execute_notebooks([nb], tmp_path / "out", {}, log=lines.append, timeout_s=12)
    assert out.is_file()
    assert any("still running after 12 s (try 1 of 2)" in line for line in lines), lines
    frozen_kernel = int((nb.parent / "tried").read_text())
    assert not psutil.pid_exists(frozen_kernel) or (
        psutil.Process(frozen_kernel).status() == psutil.STATUS_ZOMBIE
    )
    # a notebook that overruns twice fails the build in one line
    with pytest.raises(book.BookCheckError, match="still running after 0 s .try 2 of 2.: stopped"):
        book.execute_notebooks([nb], tmp_path / "out", {}, log=lines.append, timeout_s=0.2)


# --- the AST check on hand-made pages (no build) ------------------------------------------------
def _page(*nodes) -> dict:
    return {"location": "/chapters/a.md", "mdast": {"type": "root", "children": list(nodes)}}


def test_check_page_accepts_resolved_embed_and_reference():
    embed = {
        "type": "embed",
        "source": {"label": "txt:n", "location": "/notebooks/x.ipynb"},
        "children": [{"type": "outputs", "children": [{"type": "output"}]}],
    }
    xref = {"type": "crossReference", "identifier": "fig-x", "resolved": True}
    problems, resolved = book.check_page(_page(embed, xref))
    assert problems == [] and resolved == {"txt:n"}


@pytest.mark.parametrize(
    "node, message",
    [
        ({"type": "_lift", "source": {"label": "app:gone"}}, "#app:gone does not resolve"),
        (
            {"type": "embed", "source": {"label": "txt:n", "location": "/n.ipynb"}, "children": []},
            "without output",
        ),
        ({"type": "crossReference", "identifier": "eq-1"}, "unresolved cross-reference 'eq-1'"),
        ({"type": "link", "url": "#sec-x", "children": []}, "unresolved reference '#sec-x'"),
        (
            {"type": "output", "jupyter_data": {"output_type": "error", "ename": "KeyError"}},
            "raised KeyError",
        ),
    ],
)
def test_check_page_reports_each_fault(node, message):
    problems, _ = book.check_page(_page(node))
    assert len(problems) == 1 and message in problems[0]


def test_check_page_reports_an_unexecuted_inline_expression():
    done = {"type": "inlineExpression", "value": "n", "result": {"status": "ok"},
            "children": [{"type": "text", "value": "96"}]}  # fmt: skip
    assert book.check_page(_page(done)) == ([], set())
    for node in (
        {"type": "inlineExpression", "value": "n"},  # no kernel reached the page
        {"type": "inlineExpression", "value": "n", "result": {"status": "error",
                                                               "ename": "NameError"}},
    ):  # fmt: skip
        problems, _ = book.check_page(_page(node))
        assert len(problems) == 1 and "inline expression 'n' was not executed" in problems[0]


PAGE = """\
---
kernelspec: {name: python3, display_name: Python 3}
---

```{code-cell} python
:tags: [parameters, remove-cell]
profile = "laptop"
results_dir = "../results/laptop"
other = 1
```

```{code-cell} python
profile = "untouched"
```

Text {eval}`profile`.
"""


def test_page_parameters_are_injected_into_the_parameters_cell_only():
    out = book.inject_page_parameters(PAGE, {"profile": "smoke", "results_dir": "/r", "x": 2})
    assert "profile = 'smoke'\nresults_dir = '/r'\nother = 1\n```" in out
    assert 'profile = "untouched"' in out and "x = 2" not in out
    assert book.inject_page_parameters("no cells here", {"profile": "smoke"}) == "no cells here"


def _toc_chapters() -> list[Path]:
    import yaml

    toc = yaml.safe_load((ROOT / "myst.yml").read_text())["project"]["toc"]
    return [ROOT / entry["file"] for entry in toc if "file" in entry]


def _frontmatter(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text().split("---")[1])


def test_chapters_number_their_figures_by_their_place_in_the_book():
    """Figures read "Figure 7.1" in chapter 7 (the study's book numbers them per chapter); the
    abstract is unnumbered, so chapter n is the n-th page after it."""
    chapters = _toc_chapters()
    assert _frontmatter(chapters[0])["numbering"]["title"] is False  # the abstract
    for n, chapter in enumerate(chapters[1:], start=1):
        numbering = _frontmatter(chapter)["numbering"]
        # per kind: a page-wide enumerator would also number the title "n.n"
        assert "enumerator" not in numbering, chapter.name
        for kind in ("figure", "equation", "table"):
            assert numbering[kind]["enumerator"] == f"{n}.%s", (chapter.name, kind)


def test_computed_prose_comes_from_executed_pages_not_text_outputs():
    """Every number in the chapters' prose is an inline expression of an executable page with a
    parameters cell (a notebook's Markdown output would render as a monospace box)."""
    for chapter in _toc_chapters():
        text = chapter.read_text()
        assert "#txt:" not in text, chapter.name
        if "{eval}" in text:
            assert _frontmatter(chapter)["kernelspec"]["name"] == "python3", chapter.name
            assert ":tags: [parameters, remove-cell]" in text, chapter.name


def test_check_site_reports_embeds_named_in_chapters_but_absent(tmp_path):
    content = tmp_path / "site" / "content"
    content.mkdir(parents=True)
    (content / "a.json").write_text(json.dumps(_page({"type": "text", "value": "no embeds"})))
    chapters = tmp_path / "chapters"
    chapters.mkdir()
    (chapters / "a.md").write_text(":::{figure} #app:lost\n:label: fig-l\n:::\n")
    with pytest.raises(book.BookCheckError, match="#app:lost is missing"):
        book.check_site(tmp_path / "site", chapters)
    # and an error that mystmd printed without failing (e.g. an unreadable bibliography)
    with pytest.raises(book.BookCheckError, match="Error reading file"):
        book.check_site(tmp_path / "site", None, log="\u26d4\ufe0f refs.bib Error reading file")
    book.check_site(tmp_path / "site", None, log="  - \u26a0\ufe0f a warning only")


@pytest.mark.parametrize("reduction, ok", [("median", True), ("max", False), (None, True)])
def test_placeholder_reduction_must_be_named_by_its_caption(tmp_path, reduction, ok):
    (tmp_path / "chapters").mkdir()
    (tmp_path / "figures").mkdir()
    chapter = tmp_path / "chapters" / "a.md"
    chapter.write_text(CHAPTER)  # caption: "Median over seeds."
    (tmp_path / "figures" / "x.png").write_bytes(_png(reduction=reduction))
    ((path, caption),) = book.chapter_placeholders([chapter]).values()
    assert path == tmp_path / "figures" / "x.png" and "Median over seeds" in caption
    problems = book.check_placeholders([chapter], since=0.0)
    assert (
        problems == []
        if ok
        else ["placeholder of #app:x shows the max but its caption " + "does not say so"]
    )
    # a placeholder older than the build start was not rewritten by its notebook
    stale = book.check_placeholders([chapter], since=time.time() + 10)
    assert any("not rewritten" in p for p in stale)


def test_theme_unavailable_recognises_the_offline_failure():
    offline = (
        "🔍 Querying template metadata from https://api.mystmd.org/templates/site/myst/book-theme\n"
        "request to https://api.mystmd.org/templates/site/myst/book-theme failed, reason: "
        "getaddrinfo ENOTFOUND api.mystmd.org"
    )
    assert book.theme_unavailable(1, offline)
    assert not book.theme_unavailable(0, offline)
    assert not book.theme_unavailable(1, '⛔️ a.md No target for internal reference "#x"')


# --- database step and defaults ----------------------------------------------------------------
def test_default_profile_prefers_a_shipped_database(tmp_path, monkeypatch):
    # the shipped profile must be a defined profile too (see the next test)
    monkeypatch.setitem(PROFILES, book.SHIPPED_PROFILE, PROFILES["laptop"])
    assert book.default_profile(tmp_path) == book.DEFAULT_PROFILE
    shipped = tmp_path / "results" / book.SHIPPED_PROFILE
    shipped.mkdir(parents=True)
    for study in STUDY_NAMES[:-1]:
        (shipped / f"{study}.nc").touch()
    assert book.default_profile(tmp_path) == book.DEFAULT_PROFILE  # incomplete: not shipped
    (shipped / f"{STUDY_NAMES[-1]}.nc").touch()
    assert book.default_profile(tmp_path) == book.SHIPPED_PROFILE


def test_shipped_databases_of_an_undefined_profile_are_not_chosen(tmp_path, monkeypatch):
    """Databases committed under results/<shipped>/ are used only once that profile exists:
    `make book` must never pick a name that get_profile rejects."""
    # the book's view of the profiles without the shipped one (PROFILES itself keeps its order:
    # other tests read the order of its names in error messages)
    from hrtem_book.book import parameters

    defined = {k: v for k, v in PROFILES.items() if k != book.SHIPPED_PROFILE}
    monkeypatch.setattr(parameters, "PROFILES", defined)
    shipped = Layout(tmp_path, book.SHIPPED_PROFILE).results_dir
    shipped.mkdir(parents=True)
    for study in STUDY_NAMES:
        (shipped / f"{study}.nc").touch()
    assert book.default_profile(tmp_path) == book.DEFAULT_PROFILE
    get_profile(book.default_profile(tmp_path))  # always a defined profile


def test_ensure_database_sweeps_only_when_incomplete(tmp_path, monkeypatch):
    from hrtem_book import sweep

    calls = []

    def fake_sweep(studies, profile, root, **kw):
        calls.append(("sweep", tuple(studies), profile.name))

    def fake_collect(profile, root, studies=None, log=None):
        calls.append(("collect", profile.name))
        for study in STUDY_NAMES:
            path = Layout(root, profile.name).database_path(study)
            if not path.exists():
                results.save_database(synthetic_database(study), path)

    monkeypatch.setattr(sweep, "run_sweep", fake_sweep)
    monkeypatch.setattr(findings, "collect", fake_collect)
    layout = Layout(tmp_path, "smoke")
    results.save_database(synthetic_database("defocus"), layout.database_path("defocus"))
    out = book.ensure_database(SMOKE, tmp_path, log=lambda m: None)
    assert out == tmp_path / "results" / "smoke"
    assert calls == [
        ("sweep", tuple(s for s in STUDY_NAMES if s != "defocus"), "smoke"),
        ("collect", "smoke"),
    ]
    calls.clear()
    book.ensure_database(SMOKE, tmp_path, log=lambda m: None)
    assert calls == []  # complete: nothing runs
    # a damaged database (a truncated file) is moved aside and rebuilt from the records
    path = layout.database_path("dose")
    path.write_bytes(path.read_bytes()[:500])
    lines: list[str] = []
    book.ensure_database(SMOKE, tmp_path, log=lines.append)
    assert calls == [("sweep", ("dose",), "smoke"), ("collect", "smoke")]
    assert any("moved aside" in line and "rebuilding it from the records" in line for line in lines)
    assert len(list(path.parent.glob("dose.nc.invalid-*"))) == 1


def test_error_rates_are_simulated_beside_the_sweep_at_the_lowest_priority(tmp_path, monkeypatch):
    """The rules' error rates (they need no result) are made by a child at nice 19 into the cache
    the chapters' numbers read, which then need not make them again; an error in the build stops
    the child and leaves nothing behind."""
    from hrtem_book import power
    from hrtem_book.book import processes

    cache = tmp_path / "results" / "smoke" / ".cache-power.json"
    with processes.error_rates_beside("smoke", cache) as child:
        assert os.getpriority(os.PRIO_PROCESS, child.proc.pid) == processes.IDLE_NICE
        child.hurry()
        child.wait()
    assert child.proc.returncode == 0 and cache.is_file()
    made = power.table("smoke")
    monkeypatch.setattr(power, "table", lambda profile: pytest.fail("error rates made again"))
    # (as JSON: a rule the smoke grid cannot measure has NaN rates, and NaN != NaN)
    assert json.dumps(power.cached_table("smoke", cache)) == json.dumps(made)

    # the laptop's take ~20 s: an error in the block stops the child long before
    other = tmp_path / "other" / ".cache-power.json"
    with pytest.raises(RuntimeError), processes.error_rates_beside("laptop", other) as child:
        raise RuntimeError("the sweep failed")
    assert child.proc.returncode is not None and child.proc.returncode < 0
    assert list(other.parent.iterdir()) == []


def test_bad_inputs_fail_with_one_clear_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown reduction 'avg'; allowed: min, mean"):
        book.build_book(SMOKE, tmp_path, results_dir=tmp_path, reduction="avg")
    # the profile is resolved once, at the command line
    assert main(["book", "--profile", "nope", "--root", str(tmp_path)]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err
    (tmp_path / "notebooks").mkdir()
    shutil.copy(ROOT / "notebooks" / "imaging_conditions.ipynb", tmp_path / "notebooks")
    with pytest.raises(FileNotFoundError, match="no database for defocus"):
        book.build_book(SMOKE, tmp_path, results_dir=tmp_path)


def test_notebook_without_parameters_cell_is_refused(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    nbformat.write(nb, tmp_path / "n.ipynb")
    with pytest.raises(ValueError, match="no cell tagged 'parameters'"):
        book.declared_parameters(tmp_path / "n.ipynb")


# --- the real book ----------------------------------------------------------------------------
def test_every_figure_notebook_is_thin_and_labelled():
    """Conventions the build relies on: a parameters cell with the shared names, embeddable
    (app:/txt:) labels, no committed outputs, and cell ids unique across the book (MyST makes
    them page identifiers and warns on each one two notebooks share)."""
    cell_ids: dict[str, str] = {}
    for nb in book.figure_notebooks(ROOT):
        for cell in nbformat.read(nb, 4).cells:
            assert cell.id not in cell_ids, f"{nb.name} repeats {cell_ids.get(cell.id)}'s {cell.id}"
            cell_ids[cell.id] = nb.name
        # each declares what it uses (example_images reads no database); the build passes only those
        assert "profile" in book.declared_parameters(nb), nb.name
        labels = book.notebook_labels(nb)
        assert any(label.startswith(("app:", "txt:")) for label in labels), nb.name
        assert all(not c.get("outputs") for c in nbformat.read(nb, 4).cells), f"{nb} has outputs"


def test_no_notebook_or_chapter_names_a_profile_the_build_injects_it(tmp_path):
    """The parameter contract is book.parameters': every parameters cell leaves the profile
    (and its results folder) to the build, and a notebook run alone resolves the defaults."""
    literal = re.compile(rf"""["']({"|".join(map(re.escape, PROFILES))})["']""")
    pages = [*book.figure_notebooks(ROOT), *sorted((ROOT / "chapters").glob("*.md"))]
    for page in pages:
        text = page.read_text()
        assert not literal.search(text), f"{page.name} names a profile: {literal.search(text)[0]}"
        if "profile = " in text:
            assert "profile, results_dir = resolve(profile, results_dir)" in text or (
                "profile = resolve(profile).profile" in text
            ), page.name
    assert book.resolve() == (book.DEFAULT_PROFILE, str(Path("..") / "results" / "laptop"))
    assert book.resolve("smoke", "/r") == ("smoke", "/r")
    assert book.resolve(None, root=str(tmp_path)).results_dir == str(
        tmp_path / "results" / book.DEFAULT_PROFILE
    )
    with pytest.raises(ValueError, match="unknown profile"):
        book.resolve("lapptop")


# this workplace's offline copy of the MyST book-theme (../shared/tools); elsewhere myst fetches it
THEME_INSTALLER = ROOT.parent / "shared" / "tools" / "install-book-theme"
CHROMIUM = Path(os.environ.get("HRTEM_BOOK_CHROMIUM", "/usr/bin/chromium"))
# the chapters whose screenshots the test leaves for a reader to look at
SCREENSHOT_CHAPTERS = ("7", "10", "11")


def _pages_by_enumerator(site: Path) -> dict[str, str]:
    """Chapter number → the page's URL path in the HTML site, from the built AST."""
    out = {}
    for path in (site / "content").glob("*.json"):
        page = json.loads(path.read_text())
        enumerator = page.get("frontmatter", {}).get("enumerator")
        if enumerator:
            out[str(enumerator)] = f"{path.stem}/"
    return out


def _notebook_pages(site: Path) -> dict[str, str]:
    """Notebook file name → its page's URL path (MyST renames a slug a chapter already took)."""
    out = {}
    for path in (site / "content").glob("*.json"):
        location = json.loads(path.read_text()).get("location", "")
        if location.endswith(".ipynb"):
            out[Path(location).name] = f"{path.stem}/"
    return out


@needs_myst
@pytest.mark.slow
@pytest.mark.browser
def test_real_book_from_a_real_smoke_sweep(tmp_path, smoke_data):
    """`make book PROFILE=smoke` end to end in a copy of the book: the missing database is made
    by the real sweep (training and collect, on the session's simulated series), every notebook
    runs under papermill against it, the placeholders are rewritten, and the real
    `myst build --html` of the whole book (with the book-theme from ../shared/tools, or fetched)
    passes the AST check. Then the
    HTML is served on loopback and read in Chromium: every figure of every page shows a loaded
    image, and no page shows a kernel-connection box, an unexecuted expression, a citation
    without a year, doubled parentheses or a Python repr. Screenshots of chapters 7, 10 and 11
    are left in _build/html-check/ for a reader. (`jupyter-book build --html` passes the same
    reading in the next test, on a small book.)"""
    root = tmp_path / "book"
    root.mkdir()
    for name in book.BOOK_SOURCES:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, root / name)
    notebooks = book.figure_notebooks(root)
    assert notebooks, "no figure notebooks"
    smoke_project(root, smoke_data)  # the session's simulated series (simulation has its tests)
    started = time.time() - 1.0
    installer = THEME_INSTALLER if THEME_INSTALLER.is_file() else None
    # a smoke notebook runs in seconds: a frozen one (a lost kernel reply, seen under load) is
    # stopped and run again after 90 s rather than 10 minutes
    result = book.build_book(SMOKE, root, theme_installer=installer, notebook_timeout_s=90)
    placeholders = book.chapter_placeholders(sorted((root / "chapters").glob("*.md")))
    assert placeholders and all(p.stat().st_mtime >= started for p, _ in placeholders.values())
    assert book.missing_studies(root / "results" / "smoke") == []
    assert sorted(p.name for p in result.notebooks) == sorted(p.name for p in notebooks)
    site = result.stage / "_build" / "site"
    built = {p.stem for p in (site / "content").glob("*.json")}
    assert len(built) >= len(notebooks) + 1
    # numbering as the reader sees it: chapter 7 is "7", its figures "7.1", "7.2"; the abstract
    # and the notebook pages (an appendix) take no number
    page = json.loads((site / "content" / "imaging-conditions.json").read_text())
    assert page["frontmatter"]["enumerator"] == "7"
    figures = [n["enumerator"] for n in book.check.walk(page["mdast"])
               if n.get("type") == "container" and n.get("kind") == "figure"]  # fmt: skip
    assert figures and all(e.startswith("7.") for e in figures), figures
    abstract = json.loads((site / "content" / "index.json").read_text())
    assert "enumerator" not in abstract["frontmatter"]
    nb_pages = _notebook_pages(site)
    assert sorted(nb_pages) == sorted(nb.name for nb in notebooks)
    for path in nb_pages.values():
        matter = json.loads((site / "content" / f"{path[:-1]}.json").read_text())["frontmatter"]
        assert "enumerator" not in matter, path

    if result.kind != "html":
        pytest.skip("no HTML: neither ../shared/tools/install-book-theme nor the network")
    if not CHROMIUM.exists():
        pytest.skip(f"no chromium at {CHROMIUM}: `make test` installs Debian's (apt-get install)")
    pytest.importorskip("playwright.sync_api")
    from hrtem_book.book.browser import read_site, site_problems

    chapters = _pages_by_enumerator(site)
    shots_dir = ROOT / "_build" / "html-check"
    shots = {chapters[c]: shots_dir / f"chapter-{c}.png" for c in SCREENSHOT_CHAPTERS}
    pages = read_site(result.path, CHROMIUM, screenshots=shots)
    assert not site_problems(pages), "\n".join(site_problems(pages))
    read = {p.path: p for p in pages}
    # every figure the chapters declare is on its page, with its image
    declared = sum(len(book.notebooks._FIGURE_BLOCK.findall(c.read_text()))
                   for c in (root / "chapters").glob("*.md"))  # fmt: skip
    shown = sum(len(read[chapters[c]].figures) for c in chapters if chapters[c] in read)
    assert shown >= declared > 0, (shown, declared)
    # every notebook page shows its app as an image too
    for name, path in nb_pages.items():
        assert read[path].images >= 1, name
    assert all(path.is_file() and path.stat().st_size > 0 for path in shots.values())


@needs_myst
@pytest.mark.slow
@pytest.mark.browser
def test_jupyter_book_builds_html_that_reads_like_mysts(tmp_path, synthetic_results):
    """`--engine jupyter-book` (Jupyter Book 2, the same MyST engine) builds a book's HTML that
    passes the same reading in Chromium as `myst build --html`, page for page (a small book:
    the whole book's reading is the test above)."""
    if not CHROMIUM.exists() or not THEME_INSTALLER.is_file():
        pytest.skip("needs chromium and ../shared/tools/install-book-theme")
    pytest.importorskip("playwright.sync_api")
    from hrtem_book.book.browser import read_site, site_problems

    root = _tiny_book(tmp_path / "b")
    # as the book's myst.yml: a site (the book-theme) and no compute button
    yml = (
        MYST_YML.replace("jupyter: true", "jupyter: false")
        + "site:\n  options:\n    logo_text: x\n"
    )
    (root / "myst.yml").write_text(yml)
    sites = {}
    result = book.build_book(
        SMOKE, root, results_dir=synthetic_results, theme_installer=THEME_INSTALLER,
        engine="myst", log=lambda m: None,
    )  # fmt: skip
    for engine in book.ENGINES:  # the same staged book (papermill ran once), built by each
        if engine != "myst":
            kind, path = book.build_site(result.stage, offline=False, engine=engine,
                                         log=lambda m: None)  # fmt: skip
        else:
            kind, path = result.kind, result.path
        assert kind == "html", engine
        pages = read_site(path, CHROMIUM)
        assert not site_problems(pages), (engine, site_problems(pages))
        assert sum(len(p.figures) for p in pages) >= 1, engine
        sites[engine] = sorted(p.path for p in pages)
    assert sites["jupyter-book"] == sites["myst"]
