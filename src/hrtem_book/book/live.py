"""The figure notebooks' apps served live by Voilà on localhost (offline template)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from ..layout import Layout
from ..profiles import Profile
from .build import link_shared, relative_to_notebooks
from .notebooks import (
    _FIGURE_BLOCK,
    chapter_placeholders,
    execute_notebooks,
    figure_notebooks,
    notebook_labels,
)
from .parameters import missing_studies
from .processes import stop_process

VOILA_TEMPLATE = "hrtem-offline"  # book/jupyter/voila/templates/hrtem-offline
CULL_IDLE_S = 120  # a kernel with no open page is shut down after this many idle seconds


def voila_command(
    target: Path, port: int, root: str | Path = ".", connection_dir: Path | None = None
) -> tuple[list[str], dict]:
    """The Voilà command line serving ``target`` (a notebook or a folder) offline on localhost,
    and the environment that makes the book's template findable."""
    root = Path(root).resolve()
    cmd = [
        sys.executable,
        "-m",
        "voila",
        str(target),
        "--no-browser",
        f"--port={port}",
        "--Voila.ip=127.0.0.1",
        f"--template={VOILA_TEMPLATE}",
        # a closed page's kernel goes: Voilà shuts it down on the page's `beforeunload`, and a
        # kernel left without a connection (a crashed tab) is culled after two idle minutes
        f"--MappingKernelManager.cull_idle_timeout={CULL_IDLE_S}",
        "--MappingKernelManager.cull_interval=30",
        "--MappingKernelManager.cull_connected=False",
        # Voilà's page posts that shutdown with an _xsrf field read from a cookie that Voilà
        # 0.5 never sets, so the server refused it (403) and every visit left its kernel behind
        # (~200 MB); the server listens on 127.0.0.1 only
        "--Voila.tornado_settings=disable_check_xsrf=True",
    ]
    if connection_dir is not None:
        connection_dir.mkdir(parents=True, exist_ok=True)
        cmd.append(f"--Voila.connection_dir_root={connection_dir}")
    jupyter_path = os.pathsep.join(
        p for p in (str(root / "book" / "jupyter"), os.environ.get("JUPYTER_PATH")) if p
    )
    return cmd, {**os.environ, "JUPYTER_PATH": jupyter_path}


HOW_TO = (
    "**How to use it.** Pick values in the lists to choose which models enter the figure "
    "(Ctrl- or Shift-click selects several); the figure redraws after every change.\n"
    "*Reduction mode* sets how the models that share a cell, box or bar are summarised "
    "(median, mean, min or max); *Metric* switches between the loss and the Dice score."
)
# MyST roles that mean nothing outside the book (citations, cross-references)
_ROLE = re.compile(r"\s*\{(?:cite:[pt]|cite|numref|ref|eq)\}`[^`]*`")


def figure_numbers(chapters: list[Path]) -> dict[str, str]:
    """``app:`` label → ``"7.1"``: the chapter number (its file name's prefix) and the place of
    the figure in the chapter, as the book numbers them."""
    out = {}
    for chapter in chapters:
        number = int(chapter.name.split("_", 1)[0]) if chapter.name[:2].isdigit() else None
        labels = [m[1] for m in _FIGURE_BLOCK.findall(chapter.read_text())]
        for i, label in enumerate(labels, 1):
            out[label] = f"{number}.{i}" if number else str(i)
    return out


def live_title(title: str, number: str | None) -> str:
    """The file name (without suffix) of a live page: ``Figure 7.1 — <title>``."""
    title = re.sub(r"[:/\\]+", ",", title).strip(" ,")
    return f"Figure {number} — {title}" if number else title


def decorate_live_notebook(path: Path, caption: str | None, number: str | None) -> Path:
    """Rewrite a staged notebook for a student opening it live: its heading, the figure's
    caption from the book and two lines of how-to above the controls; renamed to its title."""
    nb = json.loads(path.read_text())
    first = next((c for c in nb["cells"] if c.get("cell_type") == "markdown"), None)
    text = "".join(first["source"]) if first else ""
    heading = next((ln for ln in text.splitlines() if ln.startswith("#")), f"# {path.stem}")
    title = heading.lstrip("# ").strip()
    parts = [f"# {live_title(title, number)}"]
    if caption:
        parts.append(" ".join(_ROLE.sub("", caption).split()))
    parts.append(HOW_TO)
    cell = {"cell_type": "markdown", "metadata": {}, "source": "\n\n".join(parts)}
    if first is not None:
        cell["id"] = first.get("id", "live-head")
        nb["cells"][nb["cells"].index(first)] = cell
    else:
        nb["cells"].insert(0, {**cell, "id": "live-head"})
    target = path.with_name(live_title(title, number) + path.suffix)
    target.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    if target != path:
        path.unlink()
    return target


def prepare_live(
    profile: Profile,
    root: str | Path = ".",
    reduction: str = "median",
    *,
    results_dir: str | Path | None = None,
    stage: Path | None = None,
    notebooks: list[Path] | None = None,
) -> Path:
    """The notebooks with ``profile``'s parameters injected (not run), each headed by its
    figure's caption and a how-to and named by its title, under ``_build/live`` (or
    ``stage``); ``results_dir`` and ``notebooks`` default to the profile's and all of them."""
    root = Path(root).resolve()
    layout = Layout.of(root, profile)
    notebooks = figure_notebooks(root) if notebooks is None else list(notebooks)
    if not notebooks:
        raise FileNotFoundError(f"no figure notebooks in {root / 'notebooks'}; nothing to serve")
    results_dir = Path(results_dir or layout.results_dir)
    if missing := missing_studies(results_dir):
        raise FileNotFoundError(
            f"no database for {', '.join(missing)} in {results_dir}; run `make book "
            f"PROFILE={profile.name}` (or `hrtem-book sweep`/`collect`) first"
        )
    values = {
        "profile": profile.name,
        "results_dir": relative_to_notebooks(results_dir, root),
        "reduction": reduction,
    }
    stage = Path(stage or layout.live_stage)
    folder = stage / "notebooks"
    if folder.is_dir():
        shutil.rmtree(folder)  # renamed pages of an earlier run must not linger
    nbs = execute_notebooks(notebooks, folder, values, prepare_only=True, log=lambda m: None)
    chapters = sorted((root / "chapters").glob("*.md"))
    captions = {label: caption for label, (_, caption) in chapter_placeholders(chapters).items()}
    numbers = figure_numbers(chapters)
    for nb in nbs:
        label = next((x for x in notebook_labels(nb) if x.startswith("app:")), None)
        decorate_live_notebook(nb, captions.get(label), numbers.get(label))
    link_shared(root, stage)
    # the apps write their placeholder on start: keep them off the committed figures/
    (stage / "figures").mkdir(exist_ok=True)
    return folder


def serve_live(profile: Profile, root: str | Path = ".", port: int = 8866) -> int:
    """Serve every figure notebook's app with Voilà until interrupted (Ctrl-C)."""
    root = Path(root).resolve()
    folder = prepare_live(profile, root)
    connections = Layout.of(root, profile).live_connections
    cmd, env = voila_command(folder, port, root, connections)
    print(f"live: serving {folder} at http://127.0.0.1:{port}/ (Ctrl-C stops)", flush=True)
    proc = subprocess.Popen(cmd, cwd=folder, env=env)
    # SIGTERM (a CI job ending, `kill`) stops Voilà and its kernels like Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_process(proc)
