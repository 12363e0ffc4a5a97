"""Segmentation metrics of the particle class: cross-entropy, Dice (F1) and IoU, per domain.

A model's prediction is the arg-max of its two logits (background 0, particle 1). For a set of
images the pixel counts are summed over all images first (the "micro" reduction of
``segmentation_models_pytorch.metrics``), then

    Dice = 2 TP / (2 TP + FP + FN),     IoU = TP / (TP + FP + FN),

so a domain's Dice is the overlap of all its predicted and true particle pixels. A set without
any true or predicted particle pixel has Dice = IoU = 1 (nothing to find, nothing found).
:func:`confusion` computes the counts of every image in one batched pass; ``tests/test_metrics.py``
checks them against ``smp.metrics.get_stats`` and the scores against ``smp.metrics.f1_score`` /
``iou_score``.

The loss is the mean per-pixel cross-entropy of the logits (floor 0); a model that predicts only
the class prior of the laptop images (≈ 38 % particle) scores ≈ 0.66, a coin flip ln 2 ≈ 0.69.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported on first use: the book's pages read the names only
    import torch

METRICS = ("loss", "dice", "iou")
HIGHER_IS_BETTER = {"loss": False, "dice": True, "iou": True}
METRIC_TITLES = {"loss": "cross-entropy loss", "dice": "Dice score", "iou": "IoU"}
METRIC_NAMES = {"loss": "loss", "dice": "Dice", "iou": "IoU"}  # short, for titles
COIN_FLIP_LOSS = math.log(2.0)  # cross-entropy of a 50/50 prediction of two classes


def image_losses(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel cross-entropy of every image ``[N]`` (logits ``[N, 2, H, W]``)."""
    import torch.nn.functional as F

    ce = F.cross_entropy(logits.float(), masks, reduction="none")
    return ce.mean(dim=(-2, -1))


def confusion(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Pixel counts (TP, FP, FN, TN) of the particle class for every image: int64 ``[N, 4]``."""
    import torch

    pred = logits.argmax(dim=1).bool()
    true = masks.bool()
    tp = (pred & true).flatten(1).sum(1)
    fp = (pred & ~true).flatten(1).sum(1)
    fn = (~pred & true).flatten(1).sum(1)
    tn = (~pred & ~true).flatten(1).sum(1)
    return torch.stack([tp, fp, fn, tn], dim=1).long()


def dice(stats: torch.Tensor) -> float:
    """Dice of summed counts ``stats[..., 4]`` (micro reduction)."""
    tp, fp, fn, _ = stats.reshape(-1, 4).sum(0).double().tolist()
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2 * tp / denom


def iou(stats: torch.Tensor) -> float:
    """IoU of summed counts ``stats[..., 4]`` (micro reduction)."""
    tp, fp, fn, _ = stats.reshape(-1, 4).sum(0).double().tolist()
    denom = tp + fp + fn
    return 1.0 if denom == 0 else tp / denom


def scores(losses: torch.Tensor, stats: torch.Tensor) -> dict[str, float]:
    """``{"loss", "dice", "iou"}`` of a set of images from per-image losses and counts."""
    return {
        "loss": float(losses.double().mean()) if len(losses) else math.nan,
        "dice": dice(stats),
        "iou": iou(stats),
    }
