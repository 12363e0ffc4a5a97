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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported on first use: the book's pages read the names only
    import torch

COIN_FLIP_LOSS = math.log(2.0)  # cross-entropy of a 50/50 prediction of two classes


@dataclass(frozen=True)
class Metric:
    """One score of a model on a set of images: what it is called, which way is better, the
    values it can take and how it is computed from :func:`image_losses` and :func:`confusion`.
    Code asks a metric these questions instead of comparing its name."""

    name: str  # the key in records and databases: "loss", "dice", "iou"
    title: str  # for axis labels and sentences: "cross-entropy loss"
    short: str  # for titles: "loss", "Dice"
    unit: str  # the database's units attribute
    higher_is_better: bool
    upper: float  # values lie in [0, upper]
    score: Callable  # (per-image losses [N], per-image counts [N, 4]) -> float

    @property
    def allowed(self) -> str:
        """Its range in words: ``">= 0"`` or ``"in [0, 1]"``."""
        return ">= 0" if math.isinf(self.upper) else f"in [0, {self.upper:g}]"

    @property
    def error_name(self) -> str:
        """Its error scale (lower is better) in words: ``"loss"``, ``"1 − Dice"``."""
        return f"1 − {self.short}" if self.higher_is_better else self.short

    def error(self, value):
        """``value`` on the error scale (lower is better): the loss, or 1 − Dice / 1 − IoU;
        numbers and arrays alike."""
        return 1.0 - value if self.higher_is_better else value

    def value(self, error):
        """Back from :meth:`error`'s scale to the metric."""
        return 1.0 - error if self.higher_is_better else error

    def worse(self, a, b):
        """``a`` minus ``b`` oriented so that positive means ``a`` is worse than ``b``."""
        return b - a if self.higher_is_better else a - b

    @property
    def best(self) -> Callable:
        """``max`` or ``min``: the best of several values."""
        return max if self.higher_is_better else min


def _mean_loss(losses: torch.Tensor, stats: torch.Tensor) -> float:
    return float(losses.double().mean()) if len(losses) else math.nan


def _dice(losses: torch.Tensor, stats: torch.Tensor) -> float:
    return dice(stats)


def _iou(losses: torch.Tensor, stats: torch.Tensor) -> float:
    return iou(stats)


METRIC = {
    m.name: m
    for m in (
        Metric("loss", "cross-entropy loss", "loss", "cross-entropy", False, math.inf, _mean_loss),
        Metric("dice", "Dice score", "Dice", "1", True, 1.0, _dice),
        Metric("iou", "IoU", "IoU", "1", True, 1.0, _iou),
    )
}
METRICS = tuple(METRIC)  # the names, in the order of every table


def get_metric(name: str) -> Metric:
    """The metric called ``name``, or a one-line ValueError listing the allowed names."""
    try:
        return METRIC[name]
    except (KeyError, TypeError):
        raise ValueError(f"metric={name!r}; allowed: {', '.join(METRICS)}") from None


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
    return {name: m.score(losses, stats) for name, m in METRIC.items()}
