"""Checkpoints of pretrainings: saved once, locked while being made, checked against their config.

A checkpoint lives at ``Layout.checkpoint_path(config_hash(cfg))`` and holds::

    {"format": 2, "config": <to_jsonable(cfg)>, "config_hash": str, "record": <the pretraining's
     record>, "state_dict": <weights, or None when the pretraining failed>, "content_sha256",
     "package_version", "git_commit", "torch_version", "created"}

``content_sha256`` is the SHA-256 of the config, the record and every tensor's name, dtype, shape
and bytes (:func:`content_digest`): a byte changed inside the weights after the file was written
(which the zip container does not notice) makes the checkpoint damaged, moved aside and made
again, instead of silently giving its transfers other numbers.

A failed pretraining is saved without weights, so that every transfer run that loads it fails at
once instead of retraining it. :func:`obtain` trains a missing checkpoint under a file lock, so
concurrent workers wait for one another instead of training the same pretraining twice.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .config import PretrainConfig, config_hash, to_jsonable
from .layout import Layout, atomic_write, file_lock, move_aside, provenance
from .records import RECORD_FORMAT

CHECKPOINT_FORMAT = 2  # 2: with content_sha256


class DamagedCheckpoint(ValueError):
    """A checkpoint file that cannot be read (truncated, not a checkpoint): derived data that
    :func:`obtain` moves aside and trains again."""


class ForeignCheckpoint(DamagedCheckpoint):
    """A readable checkpoint of another config under this config's name (copied or renamed by
    hand): foreign derived data, moved aside and trained again like a damaged one."""


def checkpoint_path(layout: Layout, cfg: PretrainConfig) -> Path:
    return layout.checkpoint_path(config_hash(cfg))


def content_digest(config: dict, record: dict, state_dict: dict | None) -> str:
    """SHA-256 of what a checkpoint holds: its config and record (as sorted JSON) and each
    tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps([config, record], sort_keys=True, default=str).encode())
    for name in sorted(state_dict or {}):
        tensor = state_dict[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{tensor.dtype}|{tuple(state_dict[name].shape)}|".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: Path, cfg: PretrainConfig, record: dict, state_dict: dict | None):
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "config": to_jsonable(cfg),
        "config_hash": config_hash(cfg),
        "record": record,
        "state_dict": state_dict,
        "content_sha256": content_digest(to_jsonable(cfg), record, state_dict),
        **provenance(),
        "torch_version": str(torch.__version__),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def _fields_differ(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _fields_differ(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def load_checkpoint(path: Path, cfg: PretrainConfig, device: str | torch.device = "cpu") -> dict:
    """The checkpoint at ``path``; a ValueError when it is unreadable or of another config."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "weights only load failed" in first.lower():  # not torch's advice to unpickle it
            first = "not a file of tensors that torch reads without running code"
        raise DamagedCheckpoint(f"checkpoint {path} is unreadable ({first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DamagedCheckpoint(
            f"checkpoint {path} is not a format-{CHECKPOINT_FORMAT} hrtem-book checkpoint"
        )
    try:
        digest = content_digest(ckpt["config"], ckpt["record"], ckpt["state_dict"])
    except (KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise DamagedCheckpoint(f"checkpoint {path} is malformed ({exc})") from None
    if digest != ckpt.get("content_sha256"):
        raise DamagedCheckpoint(
            f"checkpoint {path} differs from its content checksum (changed after it was written)"
        )
    record = ckpt.get("record")
    held = record.get("record_format") if isinstance(record, dict) else None
    if held != RECORD_FORMAT:  # written by older code: its record lacks what this one stores
        raise DamagedCheckpoint(
            f"checkpoint {path} holds a record of format {held!r}; this code writes {RECORD_FORMAT}"
        )
    want = to_jsonable(cfg)
    if ckpt["config"] != want:
        differ = ", ".join(_fields_differ(ckpt["config"], want)) or "?"
        raise ForeignCheckpoint(
            f"checkpoint {path} was written for config {ckpt['config_hash']}, "
            f"not {config_hash(cfg)} (fields differ: {differ})"
        )
    return ckpt


def obtain(
    layout: Layout,
    cfg: PretrainConfig,
    train: Callable[[], tuple[dict, dict | None]],
    device: str | torch.device = "cpu",
) -> dict:
    """The checkpoint of ``cfg``: loaded when present, else made once by ``train() -> (record,
    state_dict or None)`` under a lock and saved. A damaged checkpoint, or one of another config,
    is moved aside (one line on stderr) and made again: training is deterministic, so nothing is
    lost."""
    path = checkpoint_path(layout, cfg)
    lock = path.with_name(path.name + ".lock")
    if path.exists():
        try:
            return load_checkpoint(path, cfg, device)
        except DamagedCheckpoint:
            with file_lock(lock):
                try:  # another worker may have replaced it while we waited
                    return load_checkpoint(path, cfg, device)
                except DamagedCheckpoint as exc:
                    aside = move_aside(path)
                    print(f"{exc}; moved aside to {aside.name}, training it again",
                          file=sys.stderr)  # fmt: skip
    if not path.exists():
        with file_lock(lock):
            if not path.exists():  # another worker may have finished it while we waited
                record, state = train()
                save_checkpoint(path, cfg, record, state)
    return load_checkpoint(path, cfg, device)


def drop_failed_checkpoint(layout: Layout, cfg: PretrainConfig) -> bool:
    """Delete the checkpoint of a diverged pretraining before it is retried; True if deleted.

    Left in place, a retry would only reload that recorded failure. A checkpoint that holds
    weights (or cannot be read) is kept.
    """
    path = checkpoint_path(layout, cfg)
    if not path.is_file():
        return False
    try:
        ckpt = load_checkpoint(path, cfg)
    except ValueError:  # unreadable or another config: the run reports it when it starts
        return False
    if ckpt.get("state_dict") is not None:
        return False
    path.unlink(missing_ok=True)
    return True
