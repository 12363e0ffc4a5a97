"""The AST check of a built MyST site: MyST drops an embed whose label does not exist without
failing, so the built pages are read back and every embed, reference and cell output checked."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

_EMBED_REF = re.compile(r"#((?:app|txt):[\w.:-]+)")
_ERROR_MARK = "\u26d4"  # ⛔: mystmd's mark for an error (some never reach the exit status)


class BookCheckError(Exception):
    """The built book is incomplete: an embed, a reference or a notebook cell failed."""

    def __init__(self, problems: list[str], where: str = "book"):
        self.problems = problems
        super().__init__(
            f"{where}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems)
        )


def walk(node) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for child in node.get("children", []) or []:
            yield from walk(child)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def _embed_label(node: dict) -> str | None:
    source = node.get("source")
    if isinstance(source, dict) and str(source.get("label", "")).startswith(("app:", "txt:")):
        return source["label"]
    return None


def check_page(page: dict) -> tuple[list[str], set[str]]:
    """Problems in one page of ``_build/site/content`` and the embed labels it resolved."""
    where = page.get("location", page.get("slug", "?"))
    problems, resolved = [], set()
    for node in walk(page.get("mdast", {})):
        kind = node.get("type")
        label = _embed_label(node)
        if label is not None:
            source = node["source"]
            has_output = any(n.get("type") == "outputs" for n in walk(node.get("children", [])))
            if not str(source.get("location", "")).endswith(".ipynb"):
                problems.append(f"{where}: #{label} does not resolve to a notebook cell")
            elif not has_output:
                problems.append(f"{where}: #{label} resolves to a cell without output")
            else:
                resolved.add(label)
        if kind == "crossReference" and node.get("resolved") is not True:
            problems.append(f"{where}: unresolved cross-reference {node.get('identifier')!r}")
        if kind == "link" and str(node.get("url", "")).startswith("#"):
            problems.append(f"{where}: unresolved reference {node['url']!r}")
        if kind == "inlineExpression":
            result = node.get("result") or {}
            if result.get("status") != "ok" or not node.get("children"):
                why = result.get("ename") or result.get("status") or "no result"
                problems.append(
                    f"{where}: inline expression {node.get('value')!r} was not executed ({why})"
                )
        data = node.get("jupyter_data")
        if isinstance(data, dict) and data.get("output_type") == "error":
            problems.append(f"{where}: a cell raised {data.get('ename', 'an error')}")
    return problems, resolved


def check_site(site_dir: str | Path, chapters_dir: str | Path | None = None, log: str = "") -> None:
    """Raise :class:`BookCheckError` unless the built AST in ``site_dir/content`` is complete.

    Every ``#app:``/``#txt:`` embed must resolve to an executed notebook cell with output
    (MyST drops a missing one silently), every cross-reference must resolve, no cell may have
    raised, every embed named in the chapters' sources must appear resolved, and the build log
    must hold no error mark (mystmd reports some errors, e.g. an unreadable bibliography,
    without failing even under ``--strict``).
    """
    content = Path(site_dir) / "content"
    pages = sorted(content.glob("*.json"))
    if not pages:
        raise BookCheckError([f"no built pages in {content}"])
    problems, resolved = [], set()
    for path in pages:
        page_problems, page_resolved = check_page(json.loads(path.read_text()))
        problems += page_problems
        resolved |= page_resolved
    if chapters_dir is not None:
        for chapter in sorted(Path(chapters_dir).glob("*.md")):
            for label in sorted(set(_EMBED_REF.findall(chapter.read_text())) - resolved):
                problems.append(f"{chapter.name}: embed #{label} is missing from the built book")
    # the live error lines start with the mark; the closing summary repeats them as "- ⛔ …"
    problems += [f"myst: {ln.strip()}" for ln in log.splitlines() if ln.startswith(_ERROR_MARK)]
    if problems:
        raise BookCheckError(sorted(set(problems), key=problems.index), where=str(site_dir))
