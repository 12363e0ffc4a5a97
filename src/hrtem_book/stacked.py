"""Several models of one architecture trained as one: a stack over ``torch.func.vmap``.

A GPU fills up only with many small models at once. :func:`train_stack` trains ``M`` models
that share an architecture, a freezing option, a stage config and a learning rate — the seeds
of one grid cell — as a single stacked model: their parameters and BatchNorm buffers are stacked
along a leading model axis (``torch.func.stack_module_state``), one ``vmap`` of
``functional_call`` runs the forward pass of all of them, and one Adam steps the stacked
parameters (Adam is elementwise, so this is M independent Adams). Each model keeps everything
that makes it itself: its own shuffling and D4 draws (its seed), its own training images, its own
stopping rule and best epoch. Models that stop early keep training in the stack, but nothing they
do afterwards is recorded or kept. The loop is :func:`hrtem_book.train.train_models`, the one of
every engine (a :class:`Stack` in place of one module), so every result is the one
:func:`hrtem_book.train.train_stage` gives the model alone — ``tests/test_stacked.py`` checks
this on the CPU, BatchNorm included.

On this project's 2-core CPU a stack is slower than a loop at 64² (shared/README); the engine is
for accelerators, where one small U-Net leaves most of the device idle.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state

from . import metrics
from .config import StageConfig
from .train import (
    EVAL_BATCH,
    EvalSet,
    autocast,
    batch_starts,
    kept_momentum,
    train_models,
    trained_norms,
)


def _check_stackable(models: list[torch.nn.Module]) -> None:
    names = [[(n, p.shape, p.requires_grad) for n, p in m.named_parameters()] for m in models]
    frozen = [tuple(getattr(m, "frozen_parts", ())) for m in models]
    if any(n != names[0] for n in names[1:]) or len(set(frozen)) != 1:
        raise ValueError("stacked models need one architecture and one freezing option")


class Stack:
    """``M`` models as stacked parameters and buffers, run by one vmapped functional call."""

    def __init__(self, models: list[torch.nn.Module]):
        _check_stackable(models)
        self.models = models
        self.base = copy.deepcopy(models[0]).to("meta")  # the architecture, without storage
        params, buffers = stack_module_state(models)
        trainable = {n for n, p in models[0].named_parameters() if p.requires_grad}
        self.params = {n: p.detach().requires_grad_(n in trainable) for n, p in params.items()}
        self.buffers = buffers
        self.trainable = [p for n, p in self.params.items() if n in trainable]

    def __len__(self) -> int:
        return len(self.models)

    def train(self, mode: bool = True) -> None:
        self.base.train(mode)  # UNet.train keeps the frozen part's normalisation in eval mode

    def forward(self, x: torch.Tensor, shared_input: bool = False) -> torch.Tensor:
        """Logits ``[M, B, C, H, W]``: ``x`` is ``[M, B, 1, H, W]``, or ``[B, 1, H, W]`` seen by
        every model when ``shared_input``."""

        def one(p, b, xi):
            return functional_call(self.base, (p, b), (xi,))

        in_x = None if shared_input else 0
        return torch.vmap(one, in_dims=(0, 0, in_x), randomness="different")(
            self.params, self.buffers, x
        )

    def step(self, xs, ys, optimizer: torch.optim.Optimizer, precision: str) -> torch.Tensor:
        """:func:`hrtem_book.train.step` for every model at once: ``xs`` one batch per model
        (``[B, 1, H, W]`` each, or stacked ``[M, B, 1, H, W]``), ``ys`` their masks; each model's
        gradient is that of its own mean loss. The losses ``[M]`` (detached)."""
        x, y = torch.stack(list(xs)), torch.stack(list(ys))
        with autocast(x.device, precision):
            logits = self.forward(x)
        per_model = torch.stack([F.cross_entropy(logits[m].float(), y[m]) for m in range(len(y))])
        optimizer.zero_grad(set_to_none=True)
        per_model.sum().backward()
        optimizer.step()
        return per_model.detach()

    def state_dict(self, m: int) -> dict[str, torch.Tensor]:
        """Model ``m``'s weights and buffers, detached copies."""
        out = {n: t[m].detach().clone() for n, t in self.params.items()}
        out.update({n: t[m].detach().clone() for n, t in self.buffers.items()})
        return out

    def load(self, m: int, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, t in (*self.params.items(), *self.buffers.items()):
                t[m].copy_(state[n])

    @torch.no_grad()
    def recalibrate_bn(self, train_sets, precision: str) -> None:
        """:func:`hrtem_book.train.recalibrate_bn` for every model of the stack at once, each
        on its own training images (batch k enters the stacked buffers with momentum 1/k)."""
        self.train(True)
        norms = trained_norms(self.base)
        with kept_momentum(norms):
            for k, start in enumerate(batch_starts(len(train_sets[0][0])) if norms else [], 1):
                for m in norms:
                    m.momentum = 1.0 / k  # a plain float: the rule vmap can follow
                x = torch.stack([images[start : start + EVAL_BATCH] for images, _ in train_sets])
                with autocast(x.device, precision):
                    self.forward(x)

    def write_back(self) -> None:
        """Copy each model's stacked state into its own module."""
        for m, model in enumerate(self.models):
            model.load_state_dict(self.state_dict(m), strict=False)

    @torch.no_grad()
    def evaluate(self, eval_set: EvalSet, precision: str) -> list[dict[str, dict]]:
        """``[{metric: {domain: value}}]`` per model, one shared pass over the evaluation
        images."""
        self.train(False)
        losses, stats = [], []
        for start in range(0, len(eval_set.images), EVAL_BATCH):
            x = eval_set.images[start : start + EVAL_BATCH]
            y = eval_set.masks[start : start + EVAL_BATCH]
            with autocast(x.device, precision):
                logits = self.forward(x, shared_input=True)  # [M, B, C, H, W]
            losses.append(torch.stack([metrics.image_losses(lg, y) for lg in logits]))
            stats.append(torch.stack([metrics.confusion(lg, y) for lg in logits]))
        self.train(True)
        loss = torch.cat(losses, dim=1).cpu()  # [M, N]
        stat = torch.cat(stats, dim=1).cpu()  # [M, N, 4]
        out = []
        for m in range(len(self)):
            per = {k: metrics.scores(loss[m, r], stat[m, r]) for k, r in eval_set.groups.items()}
            out.append({name: {k: s[name] for k, s in per.items()} for name in metrics.METRICS})
        return out


def train_stack(
    models: list[torch.nn.Module],
    train_sets: list[tuple[torch.Tensor, torch.Tensor]],
    eval_set: EvalSet,
    stage: StageConfig,
    lr: float,
    seeds: list[int],
    name: str,
    monitor: dict[str, float] | list[dict[str, float]],
) -> list[tuple[dict, str | None]]:
    """Train ``models`` in place as one stack; (summary, error) per model as
    :func:`hrtem_book.train.train_stage` returns them for the model alone.

    Every model needs the same number of training images (its own images, on the device); all
    share ``eval_set``, the stage and the learning rate; ``monitor`` is one mapping of the
    domains that decide when a model stops, or one per model (models trained on different
    domains). Times are those of the whole stack (one pass trains every model).
    """
    monitors = monitor if isinstance(monitor, list) else [monitor] * len(models)
    if not (len(models) == len(train_sets) == len(seeds) == len(monitors)) or not models:
        raise ValueError("one training set, seed and monitor per model needed")
    n = len(train_sets[0][0])
    if any(len(ts[0]) != n for ts in train_sets):
        raise ValueError("stacked models train on equally many images")
    return train_models(Stack(models), train_sets, eval_set, stage, lr, seeds, name, monitors)
