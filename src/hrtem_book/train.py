"""Training: one stage of the study's recipe, and the evaluation of a model on every domain.

One *stage* is the paper's recipe: Adam, cross-entropy over the two classes (background,
particle), minibatches of ``StageConfig.batch_size``, learning rate ×``lr_decay`` after every
epoch, optional D4 augmentation (every image in all 8 dihedral orientations per epoch) and
per-image standardisation (mean 0, variance 1). After every epoch the loss on the validation set
of *every* domain of the series is measured and kept.

Reported loss: the mean cross-entropy of the 2-class **logits** (``F.cross_entropy``), whose floor
is 0. The paper's network ended in a softmax and applied cross-entropy to probabilities, whose
floor is 0.3133 for two classes, and subtracted that constant; our numbers are not shifted.

Entry point: :func:`train_stage` trains a model in place for one stage and returns the stage
summary of the record (docs/ARCHITECTURE.md, "Training results"); the kinds of runs (pretrain,
transfer, mixture) are assembled from it in :mod:`hrtem_book.runs`.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import xarray as xr

from .config import StageConfig, config_hash
from .datasets import domain_tensors

EVAL_BATCH = 64  # images per forward pass when evaluating (no gradients)
# progress(stage, epoch, epochs, row): called after every epoch; row = one line of the table
Progress = Callable[[str, int, int, dict], None]


class _Diverged(Exception):
    """A non-finite loss; turned into a failed record, never raised past :func:`run`."""


# --- data ------------------------------------------------------------------------------------
def dataset_domains(ds: xr.Dataset) -> list:
    """Domain values present in a series dataset, in order of first appearance."""
    values = ds["domain"].values.tolist()
    return list(dict.fromkeys(values))


def standardize(images: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-image standardisation: every image [..., H, W] to mean 0 and variance 1."""
    mean = images.mean(dim=(-2, -1), keepdim=True)
    std = images.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (images - mean) / (std + eps)


def select(ds: xr.Dataset, domain, split: str, n: int | None = None):
    """Standardised images [n,1,H,W] float32 and masks [n,H,W] int64 of one (domain, split)."""
    images, masks = domain_tensors(ds, domain, split, n)
    return standardize(images), masks


# --- one stage -------------------------------------------------------------------------------
def d4(x: torch.Tensor, k: int) -> torch.Tensor:
    """Element ``k`` (0..7) of the dihedral group D4 on the last two axes: ``k % 4`` quarter
    turns, followed by a left-right mirror for ``k >= 4``."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def _batches(n: int, stage: StageConfig, gen: torch.Generator) -> Iterator[tuple]:
    """(image indices, D4 element per image) of every minibatch of one epoch.

    A last minibatch of a single image joins the one before: BatchNorm in training mode cannot
    normalise one image whose deepest feature map is 1×1 (the smoke model at 32²).
    """
    copies = 8 if stage.augment_d4 else 1
    order = torch.randperm(n * copies, generator=gen)
    starts = list(range(0, len(order), stage.batch_size))
    if len(starts) > 1 and len(order) - starts[-1] == 1:
        starts.pop()
    for start, stop in zip(starts, starts[1:] + [len(order)], strict=True):
        chunk = order[start:stop]
        yield chunk % n, chunk // n


def _augment(x: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Apply D4 element ``ks[i]`` (a CPU tensor) to image ``x[i]``; no device synchronisation."""
    if not bool(ks.any()):
        return x
    out = torch.empty_like(x)
    for k in ks.unique().tolist():
        rows = torch.nonzero(ks == k).flatten().to(x.device, non_blocking=True)
        out[rows] = d4(x[rows], k)
    return out


def autocast(device: torch.device):
    if device.type == "cuda":  # bf16 keeps fp32's range: no loss scaling needed
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# channels_last on every device: on CUDA it feeds the tensor cores; on this CPU (oneDNN) it made
# the narrow U-Net at 64² about 1.4× faster to train and 2× faster to evaluate (bench_train.py)
LAYOUT = torch.channels_last


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=LAYOUT) if x.dim() == 4 else x


@dataclass(frozen=True)
class EvalSet:
    """Validation images of several domains, concatenated so one pass evaluates them all."""

    images: torch.Tensor  # [N,1,H,W], standardised, on the model's device
    masks: torch.Tensor  # [N,H,W] int64
    groups: dict[str, slice]  # str(domain) -> its rows

    @classmethod
    def from_sets(cls, sets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> EvalSet:
        groups, start = {}, 0
        for key, (_, masks) in sets.items():
            groups[key] = slice(start, start + len(masks))
            start += len(masks)
        images = torch.cat([xy[0] for xy in sets.values()]) if sets else torch.empty(0, 1, 1, 1)
        masks = torch.cat([xy[1] for xy in sets.values()]) if sets else torch.empty(0, 1, 1)
        return cls(images, masks.long(), groups)


@torch.no_grad()
def image_losses(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel cross-entropy of the logits of every image [N] (model in eval mode)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), EVAL_BATCH):
        with autocast(images.device):
            logits = model(images[start : start + EVAL_BATCH])
        ce = F.cross_entropy(logits.float(), masks[start : start + EVAL_BATCH], reduction="none")
        out.append(ce.mean(dim=(-2, -1)))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean per-pixel cross-entropy of the logits over a set of equally sized images."""
    return float(image_losses(model, images, masks).double().mean())


def evaluate_domains(model: torch.nn.Module, eval_set: EvalSet) -> dict[str, float]:
    """Mean loss per domain of ``eval_set`` from one pass over all its images."""
    losses = image_losses(model, eval_set.images, eval_set.masks).double().cpu()
    return {key: float(losses[rows].mean()) for key, rows in eval_set.groups.items()}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports kilobytes: the process's peak resident set, not this stage's alone
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _generator(seed: int, name: str) -> torch.Generator:
    """A shuffling generator per (seed, stage), independent of torch's global RNG."""
    return torch.Generator().manual_seed(int(config_hash({"seed": seed, "stage": name}), 16))


def train_stage(
    model: torch.nn.Module,
    train_set: tuple[torch.Tensor, torch.Tensor],
    eval_set: EvalSet,
    stage: StageConfig,
    lr: float,
    seed: int,
    name: str,
    progress: Progress | None = None,
) -> tuple[dict, str | None]:
    """Train ``model`` in place for one stage; returns (stage summary S, error or None).

    ``train_set`` and ``eval_set`` must already be on the model's device. Only parameters with
    ``requires_grad`` are optimised (freezing is applied beforehand). ``train_time_s`` is the
    stage's wall time, per-epoch evaluation included; ``peak_memory_mb`` is the CUDA allocator's
    peak during the stage, or on the CPU the process's peak resident set so far.
    """
    images, masks = train_set
    device = images.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=stage.lr_decay)
    gen = _generator(seed, name)
    summary = {
        "train_loss": [],
        "val_loss": {key: [] for key in eval_set.groups},
        "best_loss": {},
        "final_loss": {},
        "train_time_s": 0.0,
        "peak_memory_mb": 0.0,
        "epochs_run": 0,
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    error = None
    start = time.perf_counter()
    try:
        for epoch in range(1, stage.epochs + 1):
            model.train()
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            for idx, ks in _batches(len(images), stage, gen):
                idx = idx.to(device, non_blocking=True)
                x = _augment(images[idx], ks)
                y = _augment(masks[idx], ks)
                with autocast(device):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach().double() * len(idx)
            train_loss = float(loss_sum) / (len(images) * (8 if stage.augment_d4 else 1))
            lr_used = schedule.get_last_lr()[0]
            if not math.isfinite(train_loss):
                raise _Diverged(f"non-finite training loss ({train_loss}) in {name} epoch {epoch}")
            schedule.step()
            val = evaluate_domains(model, eval_set)
            bad = [key for key, v in val.items() if not math.isfinite(v)]
            if bad:
                raise _Diverged(f"non-finite validation loss on {bad[0]} in {name} epoch {epoch}")
            summary["train_loss"].append(train_loss)
            for key, v in val.items():
                summary["val_loss"][key].append(v)
            summary["epochs_run"] = epoch
            if progress is not None:
                row = {"train_loss": train_loss, "val_loss": val, "lr": lr_used}
                row["time_s"] = time.perf_counter() - start
                progress(name, epoch, stage.epochs, row)
    except _Diverged as exc:
        error = str(exc)
    summary["train_time_s"] = time.perf_counter() - start
    summary["peak_memory_mb"] = _peak_memory_mb(device)
    for key, history in summary["val_loss"].items():
        if history:
            summary["best_loss"][key] = min(history)
            summary["final_loss"][key] = history[-1]
    return summary, error


def set_threads_from_env() -> None:
    """``torch.set_num_threads($HRTEM_BOOK_THREADS)`` when that variable is set."""
    value = os.environ.get("HRTEM_BOOK_THREADS")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"HRTEM_BOOK_THREADS={value!r}; allowed: a positive integer")
        torch.set_num_threads(int(value))


__all__ = [
    "train_stage",
    "evaluate",
    "evaluate_domains",
    "EvalSet",
    "standardize",
    "d4",
    "select",
]
