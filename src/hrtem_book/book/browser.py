"""The built HTML book as a reader sees it: served on loopback and read in a real Chromium.

The AST check (:mod:`hrtem_book.book.check`) cannot see what the theme draws: whether a figure
slot shows an image or the theme's "a Jupyter kernel connection is required" box, whether a
citation lacks its year ("n.d."), or whether generated prose doubled a parenthesis.
:func:`read_site` serves a ``myst build --html`` folder on 127.0.0.1, opens every page in
headless Chromium (Debian's, driven by Playwright; never a downloaded browser) and reports, per
page, its figures (each with whether an image inside it loaded) and the text a reader would
object to (:data:`FORBIDDEN`). :func:`site_problems` turns that into one line per problem.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_FLAGS = (
    "--no-sandbox",  # CI containers run as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
# text no page of the book may contain: what the reader sees where an output, a citation or a
# generated sentence went wrong
FORBIDDEN = {
    "kernel connection is required": "a widget output without its static image",
    "Unexecuted inline expression": "an inline {eval} that was not computed",
    "n.d.": "a citation without its year",
    "((": "doubled parentheses",
    ".).": "a sentence ending twice",
    " others,": "an author list cut to 'others'",
}
# a Python object's repr printed as text: VBox(children=..., <module.Class object at 0x...>
PYTHON_REPR = re.compile(r"\b[A-Z]\w*\(children=|object at 0x[0-9a-f]+|<hrtem_book\.")


@dataclass
class Page:
    """What a reader finds on one page."""

    path: str  # relative URL, e.g. "imaging-conditions/"
    title: str
    figures: list[dict] = field(default_factory=list)  # {"id", "images", "loaded"}
    text: str = ""  # the visible text of the article
    compute_buttons: int = 0  # controls that offer a kernel (there is none to connect to)
    images: int = 0  # images on the page that loaded


def html_pages(site: Path) -> list[str]:
    """The relative URLs of the pages of a built site (every ``index.html``), the root first."""
    site = Path(site)
    pages = []
    for index in sorted(site.rglob("index.html")):
        rel = index.parent.relative_to(site)
        if rel.parts and rel.parts[0] in ("build", "_static"):
            continue
        pages.append("" if not rel.parts else rel.as_posix() + "/")
    return sorted(pages, key=lambda p: (p != "", p))


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """A static HTTP server on 127.0.0.1 (a free port) for ``folder``; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # no access log on stderr
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


_READ_PAGE = """() => {
  const main = document.querySelector('article') || document.querySelector('main') || document.body;
  const loaded = i => i.complete && i.naturalWidth > 0;
  // figures, not tables (MyST draws a table in a <figure> too)
  const figures = Array.from(main.querySelectorAll('figure'))
    .filter(f => !f.querySelector('table'))
    .map(f => {
      const imgs = Array.from(f.querySelectorAll('img'));
      return {id: f.id || '', images: imgs.length, loaded: imgs.filter(loaded).length};
    });
  const images = Array.from(main.querySelectorAll('img')).filter(loaded).length;
  // math is drawn twice offline (formatted and as source text), and the bibliography keeps
  // its own punctuation ("2nd ed.)."): leave both out of the text
  const clone = main.cloneNode(true);
  clone.querySelectorAll('.katex, math, .math, [class*="math"], #references, .citation-list')
    .forEach(e => e.remove());
  const compute = document.querySelectorAll(
    '[title*="Enable compute"], [aria-label*="computing interface"], [title*="Launch"]').length;
  return {title: document.title, figures: figures, text: clone.innerText, compute: compute,
          images: images};
}"""


def read_site(
    site: Path,
    chromium: str | Path,
    *,
    screenshots: dict[str, Path] | None = None,
    timeout_s: float = 60.0,
) -> list[Page]:
    """Open every page of the HTML site ``site`` in headless Chromium and read it.

    ``screenshots`` maps a page path (as :func:`html_pages` gives it) to a PNG file to write of
    the whole page. No request leaves 127.0.0.1 (the theme's CDN stylesheets simply fail).
    """
    from playwright.sync_api import sync_playwright

    pages: list[Page] = []
    with serve(Path(site)) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=list(CHROMIUM_FLAGS))
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            # only loopback: anything else (fonts, KaTeX from a CDN) is refused at once
            context.route(
                re.compile(r"^(?!https?://127\.0\.0\.1[:/])"), lambda route: route.abort()
            )
            tab = context.new_page()
            for path in html_pages(site):
                tab.goto(base + path, wait_until="load", timeout=timeout_s * 1000)
                with contextlib.suppress(Exception):  # pages without images have no wait
                    tab.wait_for_load_state("networkidle", timeout=timeout_s * 1000)
                tab.wait_for_function(
                    "() => Array.from(document.images).every(i => i.complete)",
                    timeout=timeout_s * 1000,
                )
                info = tab.evaluate(_READ_PAGE)
                page = Page(
                    path, info["title"], info["figures"], info["text"], info["compute"],
                    info["images"],
                )  # fmt: skip
                pages.append(page)
                if screenshots and path in screenshots:
                    screenshots[path].parent.mkdir(parents=True, exist_ok=True)
                    tab.screenshot(path=str(screenshots[path]), full_page=True)
        finally:
            browser.close()
    return pages


def site_problems(pages: list[Page]) -> list[str]:
    """One line per problem a reader would see: a figure without a loaded image, forbidden
    text, a Python repr."""
    problems = []
    for page in pages:
        where = page.path or "/"
        for fig in page.figures:
            if fig["loaded"] < 1:
                problems.append(f"{where}: figure #{fig['id']} shows no loaded image")
        for needle, what in FORBIDDEN.items():
            at = page.text.find(needle)
            if at >= 0:
                context = page.text[max(0, at - 40) : at + 40].replace("\n", " ")
                problems.append(f"{where}: {what}: …{context}…")
        if page.compute_buttons:
            problems.append(f"{where}: {page.compute_buttons} compute button(s) with no kernel")
        m = PYTHON_REPR.search(page.text)
        if m:
            context = page.text[max(0, m.start() - 30) : m.end() + 30].replace("\n", " ")
            problems.append(f"{where}: a Python repr: …{context}…")
    return problems
