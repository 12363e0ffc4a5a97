"""The stacked engine gives what training each model alone gives (CPU, float32, BatchNorm).

One step is exact to float rounding (forward, loss, gradients, BatchNorm statistics). Over
epochs the two drift apart at the level of rounding amplified by Adam — its first steps move a
weight whose gradient is ~0 by ±lr, whichever way the rounding went — so whole trainings are
compared at 5e-2 relative: below the differences between seeds (1e-1 and more). The one-step
gradients are compared by their relative norm per tensor, since a BatchNorm weight's gradient
is a sum with much cancellation. The whole-training test uses a learning rate of 1e-3: at 3e-3
on this 8-image toy set the curves of the encoder-frozen models drifted apart by 7 % by the
fourth epoch — the same float noise, amplified by a chaotic descent.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from hrtem_book import stacked, train
from hrtem_book.config import StageConfig
from hrtem_book.models import build_model, freeze
from hrtem_book.profiles import NARROW_MODEL
from hrtem_book.testing import synthetic_series

STAGE = StageConfig(max_epochs=4, batch_size=4, augment="d4-random", n_eval=4, patience=1)
RTOL = 5e-2
SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def sets():
    ds = synthetic_series(n_train=8, n_val=4)
    to = [train.to_device(t, torch.device("cpu")) for t in train.select(ds, 10.0, "train", 8)]
    evals = {str(d): train.select(ds, d, "val", 4) for d in (-10.0, 0.0, 10.0)}
    ev = train.EvalSet.from_sets(evals)
    ev = replace(ev, images=train.to_device(ev.images, torch.device("cpu")))
    return tuple(to), ev


def _models(option: str = "none") -> list[torch.nn.Module]:
    out = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        model = build_model(NARROW_MODEL).to(memory_format=train.LAYOUT)
        out.append(freeze(model, option))
    return out


def _strip(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("train_time_s", "eval_time_s",
                                                          "peak_memory_mb")}  # fmt: skip


@pytest.mark.parametrize(
    "option, recalibrate", [("none", False), ("encoder", False), ("none", True), ("decoder", True)]
)
def test_a_stack_trains_each_model_as_if_alone(sets, option, recalibrate):
    train_set, eval_set = sets
    stage = replace(STAGE, recalibrate_bn=recalibrate)
    monitor = {"10.0": 1.0}
    alone_models = _models(option)
    alone = [
        train.train_stage(m, train_set, eval_set, stage, 1e-3, s, "transfer", monitor)
        for m, s in zip(alone_models, SEEDS, strict=True)
    ]
    stacked_models = _models(option)
    together = stacked.train_stack(
        stacked_models, [train_set] * 3, eval_set, stage, 1e-3, SEEDS, "transfer", monitor
    )
    for (a, err_a), (b, err_b) in zip(alone, together, strict=True):
        assert err_a is err_b is None
        a, b = _strip(a), _strip(b)
        # the stopping rule saw the same curve: same epochs, same kept epoch, same reason
        assert (a["epochs_run"], a["best_epoch"], a["stop_reason"]) == (
            b["epochs_run"], b["best_epoch"], b["stop_reason"],
        )  # fmt: skip
        torch.testing.assert_close(
            torch.tensor(b["train_loss"]), torch.tensor(a["train_loss"]), rtol=RTOL, atol=1e-4
        )
        for key in a["val_loss"]:
            torch.testing.assert_close(
                torch.tensor(b["val_loss"][key]), torch.tensor(a["val_loss"][key]),
                rtol=RTOL, atol=1e-4,
            )  # fmt: skip


@pytest.mark.parametrize("option", ["none", "encoder", "decoder"])
def test_one_step_is_exact_batchnorm_included(sets, option):
    """Forward, loss, gradients and BatchNorm running statistics of one training step."""
    (images, masks), _ = sets
    alone, together = _models(option), _models(option)
    stack = stacked.Stack(together)
    stack.train(True)
    x, y = images[:4], masks[:4]
    logits = stack.forward(torch.stack([x] * 3))
    loss = sum(torch.nn.functional.cross_entropy(logits[m], y) for m in range(3))
    loss.backward()
    for m, model in enumerate(alone):
        model.train()
        out = model(x)
        torch.testing.assert_close(logits[m], out, rtol=1e-3, atol=1e-4)  # kernel rounding
        torch.nn.functional.cross_entropy(out, y).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                g = stack.params[name].grad[m]
                error = float((g - p.grad).norm() / p.grad.norm().clamp_min(1e-12))
                assert error < 1e-2, (name, error)
            else:
                assert stack.params[name].grad is None
        for name, b in model.named_buffers():
            if b.is_floating_point():
                torch.testing.assert_close(stack.buffers[name][m], b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("option", ["none", "encoder", "decoder"])
def test_recalibrated_statistics_are_those_of_the_training_images(sets, option):
    """Precise BN: every BatchNorm layer that trains ends with the mean and (unbiased) variance
    of its input over the training images; a frozen part keeps its statistics; the momentum is
    restored; a stack recalibrates each model as alone."""
    (images, _), _ = sets
    (model,) = _models(option)[:1]
    before = {n: b.clone() for n, b in model.named_buffers()}
    inputs = {}
    norms = {m: n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.setdefault(m, a[0].detach()))
             for m in norms]  # fmt: skip
    train.recalibrate_bn(model, images)
    for h in hooks:
        h.remove()
    frozen_prefix = {"none": None, "encoder": "encoder.", "decoder": "decoder."}[option]
    for m, name in norms.items():
        assert m.momentum == 0.1
        if frozen_prefix and name.startswith(frozen_prefix):
            torch.testing.assert_close(m.running_mean, before[f"{name}.running_mean"])
            continue
        x = inputs[m].double()
        torch.testing.assert_close(m.running_mean.double(), x.mean((0, 2, 3)), rtol=1e-4,
                                   atol=1e-5)  # fmt: skip
        torch.testing.assert_close(m.running_var.double(), x.var((0, 2, 3), unbiased=True),
                                   rtol=1e-3, atol=1e-5)  # fmt: skip
    together = _models(option)
    stack = stacked.Stack(together)
    stack.recalibrate_bn([(images, None)] * 3, "fp32")
    for m, alone in enumerate(_models(option)):
        train.recalibrate_bn(alone, images)
        for name, b in alone.named_buffers():
            if b.is_floating_point():
                torch.testing.assert_close(stack.buffers[name][m], b, rtol=1e-4, atol=1e-5)


def test_stacking_is_deterministic_on_the_cpu(sets):
    train_set, eval_set = sets
    runs = []
    for _ in range(2):
        out = stacked.train_stack(
            _models(), [train_set] * 3, eval_set, STAGE, 3e-3, SEEDS, "pretrain", {"10.0": 1.0}
        )
        runs.append([_strip(s) for s, _ in out])
    assert runs[0] == runs[1]


def test_models_of_different_freezing_cannot_stack(sets):
    train_set, eval_set = sets
    models = _models() + [freeze(_models()[0], "encoder")]
    with pytest.raises(ValueError, match="one architecture and one freezing option"):
        stacked.train_stack(models, [train_set] * 4, eval_set, STAGE, 1e-3, [0, 1, 2, 3],
                            "transfer", {"10.0": 1.0})  # fmt: skip


def test_recalibration_reads_only_the_first_images_it_is_given(sets):
    """``StageConfig.recalibrate_images``: the kept model's statistics are those of the first
    n training images, in the plain and the stacked engine alike."""
    train_set, eval_set = sets
    n = len(train_set[0]) // 2
    stage = replace(STAGE, max_epochs=1, recalibrate_bn=True, recalibrate_images=n)
    monitor = {"10.0": 1.0}
    (model,) = _models("none")[:1]
    train.train_stage(model, train_set, eval_set, stage, 1e-3, 0, "transfer", monitor)
    kept = {k: b.clone() for k, b in model.named_buffers() if b.is_floating_point()}
    train.recalibrate_bn(model, train_set[0][:n])
    for k, b in model.named_buffers():
        if b.is_floating_point():
            torch.testing.assert_close(b, kept[k])
    train.recalibrate_bn(model, train_set[0])
    assert any(not torch.allclose(b, kept[k]) for k, b in model.named_buffers() if k in kept)
    (stacked_model,) = _models("none")[:1]
    stacked.train_stack([stacked_model], [train_set], eval_set, stage, 1e-3, [0], "transfer",
                        monitor)  # fmt: skip
    kept = {k: b.clone() for k, b in stacked_model.named_buffers() if b.is_floating_point()}
    train.recalibrate_bn(stacked_model, train_set[0][:n])
    for k, b in stacked_model.named_buffers():
        if k in kept:
            torch.testing.assert_close(b, kept[k], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="recalibrate_images=0; allowed: None or >= 1"):
        replace(STAGE, recalibrate_images=0)
