"""The figure notebooks' apps served live by Voilà on localhost (offline template)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ..layout import Layout
from ..profiles import Profile
from .build import link_shared, missing_studies, relative_to_notebooks
from .notebooks import execute_notebooks, figure_notebooks
from .processes import stop_process

VOILA_TEMPLATE = "hrtem-offline"  # book/jupyter/voila/templates/hrtem-offline


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
    ]
    if connection_dir is not None:
        connection_dir.mkdir(parents=True, exist_ok=True)
        cmd.append(f"--Voila.connection_dir_root={connection_dir}")
    jupyter_path = os.pathsep.join(
        p for p in (str(root / "book" / "jupyter"), os.environ.get("JUPYTER_PATH")) if p
    )
    return cmd, {**os.environ, "JUPYTER_PATH": jupyter_path}


def prepare_live(profile: Profile, root: str | Path = ".", reduction: str = "median") -> Path:
    """The notebooks with ``profile``'s parameters injected (not run), under ``_build/live``."""
    root = Path(root).resolve()
    layout = Layout(root, profile.name)
    notebooks = figure_notebooks(root)
    if not notebooks:
        raise FileNotFoundError(f"no figure notebooks in {root / 'notebooks'}; nothing to serve")
    results_dir = layout.results_dir
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
    stage = layout.live_stage
    nbs = execute_notebooks(
        notebooks, stage / "notebooks", values, prepare_only=True, log=lambda m: None
    )
    link_shared(root, stage)
    # the apps write their placeholder on start: keep them off the committed figures/
    (stage / "figures").mkdir(exist_ok=True)
    return nbs[0].parent


def serve_live(profile: Profile, root: str | Path = ".", port: int = 8866) -> int:
    """Serve every figure notebook's app with Voilà until interrupted (Ctrl-C)."""
    root = Path(root).resolve()
    folder = prepare_live(profile, root)
    connections = Layout(root, profile.name).live_connections
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
