"""The live imaging-conditions app in Voilà, driven in a real headless Chromium.

Debian's ``chromium`` (``make test`` installs it with apt-get) through Playwright for Python, with
``executable_path`` pointing at it: Playwright's own browser download is never used.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from hrtem_book import book, results
from hrtem_book.book.browser import CHROMIUM_FLAGS
from hrtem_book.book.processes import free_port, stop_process, wait_http
from hrtem_book.profiles import get_profile
from hrtem_book.studies import STUDY_NAMES
from hrtem_book.testing import synthetic_database

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "imaging_conditions.ipynb"
CHROMIUM = Path(os.environ.get("HRTEM_BOOK_CHROMIUM", "/usr/bin/chromium"))
FIGURE = ".widget-output img"  # widgets.FigureApp draws a PNG into an ipywidgets Output

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def voila_app(tmp_path):
    """Voilà serving the imaging-conditions page as `make live` stages it (caption, how-to,
    titled file name) against a synthetic database; yields (URL, Voilà's process)."""
    if not NOTEBOOK.is_file():
        pytest.fail(f"{NOTEBOOK} is missing")
    results_dir = tmp_path / "results"
    for study in STUDY_NAMES:
        results.save_database(synthetic_database(study), results_dir / f"{study}.nc")
    folder = book.live.prepare_live(
        get_profile("smoke"), ROOT, results_dir=results_dir, stage=tmp_path / "live",
        notebooks=[NOTEBOOK],
    )  # fmt: skip
    (nb,) = folder.glob("*.ipynb")
    assert nb.name.startswith("Figure 7.1 — Imaging conditions"), nb.name
    port = free_port()
    cmd, env = book.voila_command(nb, port, ROOT, connection_dir=tmp_path / "voila-connections")
    log = open(tmp_path / "voila.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, cwd=nb.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # a static file: requesting "/" would already start a kernel
        wait_http(f"http://127.0.0.1:{port}/voila/static/voila.js", proc, 90.0, "voila")
        yield f"http://127.0.0.1:{port}/", proc
    finally:
        stop_process(proc)
        log.close()


def kernels_alive(proc: subprocess.Popen) -> int:
    """Kernel processes of a Voilà server (they run in sessions of their own, as children)."""
    import psutil

    def is_kernel(child: psutil.Process) -> bool:
        # a kernel that has exited but not yet been reaped (a zombie) or is gone is not alive
        try:
            alive = child.status() != psutil.STATUS_ZOMBIE
            return alive and "ipykernel" in " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            return False

    return sum(is_kernel(c) for c in psutil.Process(proc.pid).children(recursive=True))


def wait_kernels(proc: subprocess.Popen, at_most: int, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while (n := kernels_alive(proc)) > at_most and time.monotonic() < deadline:
        time.sleep(0.5)
    return n


def test_imaging_conditions_app_redraws_on_reduction_and_filter(voila_app, tmp_path):
    url, voila = voila_app
    if not CHROMIUM.exists():
        pytest.skip(f"no chromium at {CHROMIUM}: `make test` installs Debian's (apt-get install)")
    playwright = pytest.importorskip("playwright.sync_api")
    requests: list[str] = []
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_FLAGS))
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url, timeout=120_000)
            page.wait_for_selector(FIGURE, timeout=120_000)
            # a student sees the figure's caption from the book and how to use the controls
            text = page.inner_text("body")
            caption = book.chapter_placeholders([ROOT / "chapters" / "07_imaging_conditions.md"])
            first_words = " ".join(caption["app:imaging-conditions"][1].split()[:8])
            assert first_words in " ".join(text.split()), text[:500]
            assert "Ctrl- or Shift-click selects several" in text
            assert "Reduction mode" in text
            # the lists are wide enough to read (not a ~25 px sliver)
            widths = page.locator(".widget-select-multiple select").evaluate_all(
                "els => els.map(e => e.getBoundingClientRect().width)"
            )
            assert widths and min(widths) > 60, widths

            def figure_src() -> str:
                return page.locator(FIGURE).first.get_attribute("src")

            def wait_for_new_figure(previous: str) -> str:
                page.wait_for_function(
                    "([sel, prev]) => { const i = document.querySelector(sel);"
                    " return i && i.src !== prev; }",
                    arg=[FIGURE, previous],
                    timeout=60_000,
                )
                return figure_src()

            first = figure_src()
            assert first.startswith("data:image/png")

            # Reduction mode: median → max redraws the figure in place
            reduction = page.locator(".widget-dropdown", has_text="Reduction mode").locator(
                "select"
            )
            assert reduction.input_value() == "median"
            reduction.select_option(label="max")
            after_reduction = wait_for_new_figure(first)

            # a filter: keep only the first seed (replicates differ, so the statistic changes)
            seeds = page.locator(".widget-select-multiple", has_text="seed (replicate)").locator(
                "select"
            )
            labels = seeds.locator("option").all_text_contents()
            assert len(labels) > 1, labels
            seeds.select_option(label=labels[:1])
            after_filter = wait_for_new_figure(after_reduction)

            # the Metric: loss → Dice redraws with the other variable
            metric = page.locator(".widget-dropdown", has_text="Metric").locator("select")
            assert metric.input_value() == "cross-entropy loss"
            metric.select_option(label="Dice score")
            after_metric = wait_for_new_figure(after_filter)

            # every filter is labelled in words with its unit, never with a dimension name
            labels = page.locator(".widget-select-multiple .widget-label").all_text_contents()
            assert "pretraining defocus [nm]" in labels and "seed (replicate)" in labels, labels
            assert not {"pretrain_domain", "n_transfer", "transfer_lr", "seed"} & set(labels)

            assert len({first, after_reduction, after_filter, after_metric}) == 4
            page.screenshot(path=str(tmp_path / "imaging_conditions_app.png"), full_page=True)

            # at most one kernel per open page: a second page starts its own, closing the
            # first shuts the first one down
            assert kernels_alive(voila) == 1
            second = browser.new_page()
            second.goto(url, timeout=120_000)
            second.wait_for_selector(FIGURE, timeout=120_000)
            assert kernels_alive(voila) == 2
            page.goto("about:blank")  # leaving the page: its beforeunload shuts the kernel
            page.close()
            assert wait_kernels(voila, at_most=1) == 1
            second.goto("about:blank")
            second.close()
        finally:
            browser.close()
    assert (tmp_path / "imaging_conditions_app.png").stat().st_size > 10_000
    # one kernel per open page: the closed page's kernel is gone, the open one's alive
    assert wait_kernels(voila, at_most=0) == 0
    external = [u for u in requests if not u.startswith(("http://127.0.0.1", "data:", "ws://"))]
    assert external == [], f"the page requested external resources: {external}"
