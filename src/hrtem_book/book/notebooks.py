"""The figure notebooks: their labels and parameters, execution with papermill, and the static
placeholders they write for the chapters' figures."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..database import REDUCTIONS
from .check import BookCheckError

Log = Callable[[str], None]
# a figure notebook reads a database and draws: 5-8 s at laptop scale, so two minutes means a
# freeze (papermill waiting for a reply its idle kernel already sent: seen in 3 of about 10
# executions of example_images.ipynb on 2026-12-07, cause unknown); `book --notebook-timeout-s`
NOTEBOOK_TIMEOUT_S = 120.0

_LABEL = re.compile(r"^\s*#\s*\|\s*label:\s*(\S+)", re.MULTILINE)
# a figure directive embedding an app: label: its options, then its caption up to the closing fence
_FIGURE_BLOCK = re.compile(
    r"^(:{3,})\{figure\}[ \t]+#(app:[\w.:-]+)[ \t]*\n((?:[ \t]*:[\w-]+:[^\n]*\n)*)(.*?)^\1[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_PLACEHOLDER = re.compile(r"^[ \t]*:placeholder:\s*(\S+)", re.MULTILINE)
# the code cell of an executable MyST page tagged "parameters": its options, then its body
_PAGE_PARAMETERS = re.compile(
    r"^(`{3,})\{code-cell\}[^\n]*\n((?:[ \t]*:[\w-]+:[^\n]*\n)*)(.*?)^\1[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_ASSIGNMENT = re.compile(r"^(\w+)\s*=.*$", re.MULTILINE)


def figure_notebooks(root: str | Path = ".") -> list[Path]:
    return sorted((Path(root) / "notebooks").glob("*.ipynb"))


def notebook_labels(path: str | Path) -> list[str]:
    """The ``# | label:`` of every code cell of a notebook."""
    nb = json.loads(Path(path).read_text())
    labels = []
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            src = cell.get("source", "")
            labels += _LABEL.findall(src if isinstance(src, str) else "".join(src))
    return labels


def declared_parameters(path: str | Path) -> dict:
    """Names and defaults of a notebook's ``parameters`` cell; a clear error if it has none."""
    import papermill

    params = papermill.inspect_notebook(str(path))
    if not params:
        raise ValueError(f"{path}: no cell tagged 'parameters'; every figure notebook needs one")
    return params


def notebook_parameters(path: Path, values: dict) -> dict:
    """The subset of ``values`` that the notebook declares (papermill would add the others)."""
    declared = declared_parameters(path)
    return {k: v for k, v in values.items() if k in declared and v is not None}


def _first_error(executed: Path) -> str | None:
    """``cell N raised Name: value`` for the first failed cell of an executed notebook."""
    try:
        nb = json.loads(executed.read_text())
    except (OSError, ValueError):
        return None
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                n = cell.get("execution_count")
                return f"cell {n} raised {output.get('ename')}: {output.get('evalue')}"
    return None


def execute_notebooks(
    notebooks: Iterable[Path],
    out_dir: Path,
    values: dict,
    *,
    prepare_only: bool = False,
    jobs: int = 1,
    log: Log = print,
    timeout_s: float = NOTEBOOK_TIMEOUT_S,
) -> list[Path]:
    """Run each notebook with papermill (cwd = its folder) into ``out_dir``; return the outputs.

    ``values`` are offered to every notebook; each gets those its parameters cell declares.
    ``prepare_only`` injects the parameters without running anything. Otherwise each notebook
    runs in its own ``papermill`` process, ``jobs`` at a time: papermill's client is not
    thread-safe (two executions in threads of one process hung here, a kernel idle and its
    client waiting for a reply forever). A notebook still running after ``timeout_s`` seconds
    is stopped with its kernel and run once more (the same freeze was seen across processes
    too, rarely); a second overrun fails the build in one line.
    """
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = list(notebooks)
    if prepare_only:
        for nb in notebooks:
            papermill.execute_notebook(
                str(nb),
                str(out_dir / nb.name),
                parameters=notebook_parameters(nb, values),
                prepare_only=True,
                progress_bar=False,
            )
        return [out_dir / nb.name for nb in notebooks]

    def run(nb: Path) -> Path:
        out = out_dir / nb.name
        cmd = [sys.executable, "-m", "papermill", str(nb), str(out), "--cwd", str(nb.parent)]
        cmd += ["-k", "python3", "--no-progress-bar", "--log-level", "ERROR"]
        cmd += ["-y", json.dumps(notebook_parameters(nb, values))]  # JSON is YAML
        t0 = time.perf_counter()
        for attempt in (1, 2):
            try:
                proc = _run_bounded(cmd, timeout_s)
                break
            except subprocess.TimeoutExpired:
                problem = f"{nb.name} still running after {timeout_s:.0f} s (try {attempt} of 2)"
                if attempt == 2:
                    raise BookCheckError([f"{problem}: stopped"], where=str(nb)) from None
                log(f"book: {problem}: stopped with its kernel, running it again")
        if proc.returncode:
            tail = proc.stdout.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            reason = _first_error(out) or f"papermill failed: {tail[0]}"
            raise BookCheckError([f"{reason} (output: {out})"], where=str(nb))
        log(f"book: executed {nb.name} in {time.perf_counter() - t0:.1f} s")
        return out

    # threads only wait on the papermill processes
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(run, notebooks))


def _run_bounded(cmd: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """``cmd`` with its output captured; past ``timeout_s`` it is killed with every process it
    started (a kernel runs in a session of its own) and TimeoutExpired raised."""
    import psutil  # ipykernel's dependency, so present wherever notebooks run

    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(psutil.Error):
                tree = psutil.Process(proc.pid).children(recursive=True)
                for p in [psutil.Process(proc.pid), *tree]:
                    with contextlib.suppress(psutil.Error):
                        p.kill()
                psutil.wait_procs(tree, timeout=10)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def chapter_placeholders(chapters: Iterable[Path]) -> dict[str, tuple[Path, str]]:
    """``app:`` label → (placeholder image, caption) of each ``:::{figure} #app:`` in chapters."""
    found = {}
    for chapter in chapters:
        for _, label, options, caption in _FIGURE_BLOCK.findall(chapter.read_text()):
            m = _PLACEHOLDER.search(options)
            if m:
                found[label] = ((chapter.parent / m.group(1)).resolve(), caption)
    return found


def placeholder_reduction(path: Path) -> str | None:
    """The reduction recorded in a placeholder PNG's text chunk (widgets.save_placeholder)."""
    from PIL import Image

    with Image.open(path) as image:
        return getattr(image, "text", {}).get("reduction")


def check_placeholders(chapters: Iterable[Path], since: float) -> list[str]:
    """Problems with the placeholders: missing, not rewritten since ``since`` (epoch s), or
    drawn with a reduction that their caption does not name."""
    problems = []
    for label, (path, caption) in sorted(chapter_placeholders(chapters).items()):
        if not path.is_file():
            problems.append(f"placeholder of #{label} not written: {path}")
            continue
        if path.stat().st_mtime < since:
            problems.append(f"placeholder of #{label} not rewritten by its notebook: {path}")
        reduction = placeholder_reduction(path)
        if reduction in REDUCTIONS and not re.search(rf"\b{reduction}\b", caption, re.I):
            problems.append(
                f"placeholder of #{label} shows the {reduction} but its caption does not say so"
            )
    return problems


def inject_page_parameters(text: str, values: dict) -> str:
    """An executable MyST page (a chapter) with the assignments of its ``parameters`` code cell
    set to ``values`` — the page-level twin of papermill's parameter injection. Names the cell
    does not assign are ignored; a page without such a cell is returned unchanged."""

    def rewrite(match: re.Match) -> str:
        fence, options, body = match.group(1), match.group(2), match.group(3)
        if "parameters" not in options:
            return match.group(0)

        def assign(line: re.Match) -> str:
            name = line.group(1)
            return f"{name} = {values[name]!r}" if name in values else line.group(0)

        head = match.group(0)[: match.start(2) - match.start(0)]
        return head + options + _ASSIGNMENT.sub(assign, body) + fence

    return _PAGE_PARAMETERS.sub(rewrite, text, count=0)
