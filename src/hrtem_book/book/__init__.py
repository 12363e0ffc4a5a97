"""The book: figure notebooks → MyST site → AST check, and the live apps.

    hrtem-book book                        # laptop profile (or the shipped gpu database)
    hrtem-book book --profile smoke        # any profile; `make book PROFILE=smoke`
    hrtem-book book --check-only           # re-check the last built site
    hrtem-book live --profile laptop       # the notebooks' apps in Voilà on localhost

:func:`build_book` makes sure the results databases exist (running the sweep where one is
missing), executes the figure notebooks with papermill, builds the staged book with MyST and
checks the built AST (:mod:`.build` explains each step).

One module per job: :mod:`.notebooks` (labels, parameters, papermill, placeholders),
:mod:`.build` (database step, staging, myst), :mod:`.check` (the AST check), :mod:`.live`
(Voilà) and :mod:`.processes` (servers started and stopped by PID).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# what the package offers, by the submodule that holds it; imported on first use (PEP 562), so
# that a chapter's `from hrtem_book.book import pages` does not import the build step and,
# through the sweep, torch (about 2 s of every chapter kernel's start)
_EXPORTS = {
    "build": ("BOOK_SOURCES", "ENGINES", "BuildResult", "build_book", "build_site",
              "ensure_database", "stage_book", "theme_unavailable"),
    "check": ("BookCheckError", "check_page", "check_site"),
    "live": ("prepare_live", "serve_live", "voila_command"),
    "notebooks": ("NOTEBOOK_TIMEOUT_S", "chapter_placeholders", "check_placeholders",
                  "declared_parameters", "execute_notebooks", "figure_notebooks",
                  "inject_page_parameters", "notebook_labels"),
    "parameters": ("DEFAULT_PROFILE", "SHIPPED_PROFILE", "default_profile", "missing_studies",
                   "resolve"),
}  # fmt: skip
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBMODULES = ("browser", "build", "check", "live", "notebooks", "pages", "parameters", "processes")

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME, *_SUBMODULES})


# --- command line --------------------------------------------------------------------------
def _cli_book(args: argparse.Namespace) -> int:
    from ..layout import Layout, myst_build_dir
    from ..profiles import get_profile, pin_cpu
    from .parameters import default_profile

    root = Path(args.root).resolve()
    profile = get_profile(args.profile or default_profile(root))
    # before torch is imported (StageConfig.cpu_isa); the sweep's workers inherit it
    pin_cpu(profile)
    from .build import build_book
    from .check import BookCheckError, check_site

    if args.check_only:
        site = myst_build_dir(Layout.of(root, profile).book_stage) / "site"
        if not (site / "content").is_dir():
            raise FileNotFoundError(
                f"no built site in {site}; build it first with `hrtem-book book --profile "
                f"{profile.name}`"
            )
        try:
            check_site(site, site.parent.parent / "chapters")
        except BookCheckError as exc:
            print(f"hrtem-book book: FAILED: {exc}", file=sys.stderr)
            return 1
        print(f"book: the site in {site} passes the AST check")
        return 0
    offline = {"auto": None, "yes": True, "no": False}[args.offline]
    if not 0 < args.notebook_timeout_s < float("inf"):
        raise ValueError(
            f"--notebook-timeout-s {args.notebook_timeout_s:g}; allowed: a positive number of "
            "seconds"
        )
    try:
        result = build_book(
            profile,
            root,
            results_dir=args.results_dir,
            reduction=args.reduction,
            offline=offline,
            theme_installer=args.theme_installer,
            engine=args.engine,
            notebook_timeout_s=args.notebook_timeout_s,
        )
    except BookCheckError as exc:
        print(f"hrtem-book book: FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"book: profile {profile.name!r}: {result.describe()}")
    if result.kind == "site":
        print(
            "book: for the HTML book run `make book` on a machine with network access "
            "(it needs the book-theme from api.mystmd.org), or give --theme-installer"
        )
    return 0


def _cli_live(args: argparse.Namespace) -> int:
    from ..profiles import get_profile
    from .live import serve_live
    from .parameters import default_profile

    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}; allowed: a TCP port 1..65535")
    root = Path(args.root).resolve()
    return serve_live(get_profile(args.profile or default_profile(root)), root, args.port)


def register_cli(subparsers) -> None:
    from ..database import REDUCTIONS
    from .build import ENGINES
    from .notebooks import NOTEBOOK_TIMEOUT_S
    from .parameters import DEFAULT_PROFILE

    p = subparsers.add_parser(
        "book",
        help="execute the figure notebooks and build the book (HTML, or the checked offline site)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--profile", help=f"results profile (default: {DEFAULT_PROFILE}, or gpu if shipped)"
    )
    p.add_argument("--root", default=".", help="project folder holding myst.yml")
    p.add_argument(
        "--results-dir", help="use this database folder as is (default results/<profile>)"
    )
    p.add_argument("--reduction", default="median", choices=REDUCTIONS)
    p.add_argument(
        "--offline",
        default="auto",
        choices=("auto", "yes", "no"),
        help="auto: HTML with the book-theme, the offline site if it cannot be fetched",
    )
    p.add_argument(
        "--theme-installer",
        help="a script that puts the MyST book-theme into a book folder (`SCRIPT BOOK_DIR`), for "
        "the HTML build without network (make book passes ../shared/tools/install-book-theme)",
    )
    p.add_argument(
        "--engine",
        default="myst",
        choices=ENGINES,
        help="the tool that builds the HTML: mystmd (myst) or Jupyter Book 2 (jupyter-book)",
    )
    p.add_argument(
        "--notebook-timeout-s",
        type=float,
        default=NOTEBOOK_TIMEOUT_S,
        help="a figure notebook still running after this many seconds is stopped with its "
        f"kernel and run once more (default {NOTEBOOK_TIMEOUT_S:g}; raise it for large databases)",
    )
    p.add_argument("--check-only", action="store_true", help="only check the last built site")
    p.set_defaults(func=_cli_book)

    p = subparsers.add_parser("live", help="serve the figure notebooks' apps with Voilà")
    p.add_argument("--profile", help="results profile (default as for `book`)")
    p.add_argument("--root", default=".", help="project folder holding notebooks/")
    p.add_argument("--port", type=int, default=8866)
    p.set_defaults(func=_cli_live)
