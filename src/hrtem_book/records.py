"""Run records: one JSON file per finished run, built, written and read here only.

A record (format in docs/ARCHITECTURE.md, "Training results")::

    {"config_hash": str, "kind": "pretrain"|"transfer"|"mixture", "config": <to_jsonable(cfg)>,
     "status": "ok"|"failed", "error": str|None, "stages": {name: S},
     "trainable_params": int|None, "total_params": int|None,
     "package_version": str, "git_commit": str|None}

The sweep adds ``finished_at`` and ``host``. Records are written atomically
(:func:`hrtem_book.layout.atomic_write`) and filed under their config hash; a file whose content
names another hash is not that run's record.
"""

from __future__ import annotations

import json
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
from .layout import atomic_write_text, provenance

RECORD_STATUSES = ("ok", "failed")
KINDS = {PretrainConfig: "pretrain", TransferConfig: "transfer", MixtureConfig: "mixture"}


def kind_of(cfg: RunConfig) -> str:
    """``"pretrain"``, ``"transfer"`` or ``"mixture"``."""
    try:
        return KINDS[type(cfg)]
    except KeyError:
        raise ValueError(
            f"cannot run a {type(cfg).__name__}; allowed: Pretrain/Transfer/Mixture"
        ) from None


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


def read_record(path: Path) -> dict | None:
    """A finished record, or None if absent or unusable (then the run is redone and rewritten)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("config_hash") != Path(path).stem:
        return None
    if record.get("status") not in RECORD_STATUSES:
        return None
    return record
