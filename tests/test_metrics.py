"""Segmentation metrics against segmentation_models_pytorch's maintained implementation."""

from __future__ import annotations

import math

import pytest
import torch

from hrtem_book import metrics
from hrtem_book.models import build_model  # noqa: F401  (imports smp with the torchvision shim)

smp_metrics = pytest.importorskip("segmentation_models_pytorch.metrics")


def _random_case(seed: int, n: int = 6, px: int = 24):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 2, px, px, generator=gen)
    masks = (torch.rand(n, px, px, generator=gen) < 0.3).long()
    return logits, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_counts_match_smp(seed):
    logits, masks = _random_case(seed)
    ours = metrics.confusion(logits, masks)
    pred = logits.argmax(dim=1)
    # smp reads [N, C, H, W]: one channel, the particle class
    tp, fp, fn, tn = smp_metrics.get_stats(pred[:, None], masks[:, None], mode="binary")
    expected = torch.stack([t.flatten() for t in (tp, fp, fn, tn)], dim=1)
    assert torch.equal(ours, expected)
    assert int(ours.sum()) == masks.numel()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_micro_dice_and_iou_match_smp(seed):
    logits, masks = _random_case(seed)
    stats = metrics.confusion(logits, masks)
    pred = logits.argmax(dim=1)[:, None]
    tp, fp, fn, tn = smp_metrics.get_stats(pred, masks[:, None], mode="binary")
    f1 = float(smp_metrics.f1_score(tp, fp, fn, tn, reduction="micro"))
    iou = float(smp_metrics.iou_score(tp, fp, fn, tn, reduction="micro"))
    assert metrics.dice(stats) == pytest.approx(f1, rel=1e-6)
    assert metrics.iou(stats) == pytest.approx(iou, rel=1e-6)
    # the two are tied: IoU = Dice / (2 − Dice)
    d = metrics.dice(stats)
    assert metrics.iou(stats) == pytest.approx(d / (2 - d))


def test_perfect_and_empty_predictions():
    masks = torch.zeros(2, 8, 8, dtype=torch.long)
    masks[0, 2:5, 2:5] = 1
    perfect = torch.stack([1 - masks, masks], dim=1).float() * 10
    assert metrics.dice(metrics.confusion(perfect, masks)) == 1.0
    assert metrics.iou(metrics.confusion(perfect, masks)) == 1.0
    nothing = torch.stack([torch.ones_like(masks), torch.zeros_like(masks)], 1).float()
    assert metrics.dice(metrics.confusion(nothing, masks)) == 0.0
    # no particle anywhere and none predicted: nothing to find, nothing found
    empty = torch.zeros(1, 8, 8, dtype=torch.long)
    assert metrics.dice(metrics.confusion(nothing[1:], empty)) == 1.0


def test_loss_of_a_coin_flip_is_ln2():
    logits = torch.zeros(3, 2, 5, 5)
    masks = (torch.rand(3, 5, 5) < 0.5).long()
    losses = metrics.image_losses(logits, masks)
    assert torch.allclose(losses, torch.full((3,), math.log(2.0)))
    s = metrics.scores(losses, metrics.confusion(logits, masks))
    assert s["loss"] == pytest.approx(metrics.COIN_FLIP_LOSS)
