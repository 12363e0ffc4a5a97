"""Run records: one JSON file per finished run, built, written and read here only.

A record (format in docs/ARCHITECTURE.md, "Training results")::

    {"record_format": 2, "config_hash": str, "kind": "pretrain"|"transfer"|"mixture",
     "config": <to_jsonable(cfg)>,
     "status": "ok"|"failed", "error": str|None, "stages": {name: S},
     "trainable_params": int|None, "total_params": int|None,
     "package_version": str, "git_commit": str|None}

The sweep adds ``finished_at`` and ``host``. Records are written atomically
(:func:`hrtem_book.layout.atomic_write`) and filed under their config hash; a file whose content
names another hash is not that run's record.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import (
    MixtureConfig,
    PretrainConfig,
    RunConfig,
    TransferConfig,
    config_hash,
    to_jsonable,
)
from .layout import atomic_write_text, move_aside, provenance

# 2: metrics (loss, Dice, IoU), the stopping rule and the kept epoch; 3: the kept model's
# scores on the test images (test_<metric>), apart from the validation images that select it;
# 4: and on each test image (test_image_loss, test_image_counts: the images as a unit)
RECORD_FORMAT = 4
RECORD_STATUSES = ("ok", "failed")
RUN_TYPES = (PretrainConfig, TransferConfig, MixtureConfig)


def kind_of(cfg: RunConfig) -> str:
    """``cfg.kind`` — ``"pretrain"``, ``"transfer"`` or ``"mixture"`` — of a run config; a
    one-line ValueError for anything else."""
    if not isinstance(cfg, RUN_TYPES):
        raise ValueError(f"cannot run a {type(cfg).__name__}; allowed: Pretrain/Transfer/Mixture")
    return cfg.kind


def build_record(
    cfg: RunConfig,
    stages: dict,
    error: str | None,
    params: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The record of ``cfg``: its stage summaries, its error (None = ok) and (trainable, total)
    parameter counts of the model it ends with (None when no model was built)."""
    trainable, total = params if params is not None else (None, None)
    return {
        "record_format": RECORD_FORMAT,
        "config_hash": config_hash(cfg),
        "kind": kind_of(cfg),
        "config": to_jsonable(cfg),
        "status": "failed" if error else "ok",
        "error": error,
        "stages": stages,
        "trainable_params": trainable,
        "total_params": total,
        **provenance(),
    }


def failure_record(cfg: RunConfig, error: str) -> dict[str, Any]:
    """The record of a run that did not finish (no stages, no model)."""
    return {**build_record(cfg, {}, error), "git_commit": None}


def write_record(path: Path, record: dict) -> Path:
    """Write ``record`` as JSON atomically (temporary file, fsync, rename)."""
    text = json.dumps(record, indent=1, sort_keys=True, allow_nan=True)
    return atomic_write_text(path, text)


STAGES_OF_KIND = {t.kind: t.stage_names for t in RUN_TYPES}
_STAGE_CURVES = ("val_loss",)
_STAGE_VALUES = ("best_loss", "final_loss", "test_loss")


def record_problem(record: Any, run_id: str) -> str | None:
    """Why ``record`` is not a valid record of run ``run_id`` (None when it is)."""
    if not isinstance(record, dict):
        return f"a {type(record).__name__}, not a mapping"
    if record.get("record_format") != RECORD_FORMAT:
        return f"record_format {record.get('record_format')!r}, this code reads {RECORD_FORMAT}"
    if record.get("config_hash") != run_id:
        return f"config_hash {record.get('config_hash')!r} is not the file's {run_id!r}"
    if record.get("status") not in RECORD_STATUSES:
        return f"status {record.get('status')!r}; allowed: {', '.join(RECORD_STATUSES)}"
    kind = record.get("kind")
    if kind not in STAGES_OF_KIND:
        return f"kind {kind!r}; allowed: {', '.join(STAGES_OF_KIND)}"
    if not isinstance(record.get("config"), dict):
        return "config is not a mapping"
    stages = record.get("stages")
    if not isinstance(stages, dict):
        return f"stages is a {type(stages).__name__}, not a mapping"
    if record["status"] == "failed":
        return None if isinstance(record.get("error"), str) else "a failed record without error"
    missing = [s for s in STAGES_OF_KIND[kind] if s not in stages]
    if missing:
        return f"an ok {kind} record without stage(s) {missing}"
    for name, stage in stages.items():
        if not isinstance(stage, dict):
            return f"stage {name!r} is not a mapping"
        for key in (*_STAGE_CURVES, *_STAGE_VALUES):
            value = stage.get(key)
            if not isinstance(value, dict):
                return f"stage {name!r}: {key} is not a mapping of domains"
            for dom, v in value.items():
                ok = isinstance(v, list) if key in _STAGE_CURVES else isinstance(v, int | float)
                if not ok:
                    return f"stage {name!r}: {key}[{dom!r}] has the wrong type"
        if problem := _image_problem(name, stage):
            return problem
    return None


def _image_problem(name: str, stage: dict) -> str | None:
    """Why a stage's per-image test scores are malformed (None when they are not)."""
    losses, counts = stage.get("test_image_loss"), stage.get("test_image_counts")
    if not isinstance(losses, dict) or not isinstance(counts, dict):
        return f"stage {name!r}: test_image_loss / test_image_counts are not mappings of domains"
    if set(losses) != set(stage["test_loss"]) or set(counts) != set(losses):
        return f"stage {name!r}: per-image test scores not of the domains of test_loss"
    for dom, values in losses.items():
        rows = counts[dom]
        if not (isinstance(values, list) and isinstance(rows, list) and len(values) == len(rows)):
            return f"stage {name!r}: per-image test scores of {dom!r} of unequal lengths"
        if not all(isinstance(v, int | float) for v in values) or not all(
            isinstance(r, list) and len(r) == 3 and all(isinstance(c, int) for c in r) for r in rows
        ):
            return f"stage {name!r}: per-image test scores of {dom!r} have the wrong type"
    return None


def read_record(path: Path, log: Callable[[str], None] | None = None) -> dict | None:
    """The finished record at ``path``, or None if there is none.

    A file that is not a valid record (unreadable JSON, the wrong shape, filed under another
    run id) is moved aside to ``<name>.invalid-<time>`` — never deleted — and reported in one
    line through ``log``; the caller then redoes the run as if it had no record.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except ValueError as exc:
        problem = f"not JSON ({exc})"
    else:
        problem = record_problem(record, path.stem)
    if problem is None:
        return record
    aside = move_aside(path)
    (log or _stderr)(f"record {path} is invalid ({problem}); moved aside to {aside.name}")
    return None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
