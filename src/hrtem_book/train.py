"""Training: one stage of the study's recipe, and the evaluation of a model on every domain.

One *stage* is the paper's recipe: Adam, cross-entropy over the two classes (background,
particle), minibatches of ``StageConfig.batch_size``, learning rate ×``lr_decay`` after every
epoch, D4 augmentation (``StageConfig.augment``) and per-image standardisation (mean 0,
variance 1). After every epoch the loss, Dice and IoU (:mod:`hrtem_book.metrics`) on the
validation set of *every* domain of the series are measured and kept.

Stopping rule: the stage monitors its *in-domain* validation loss — the loss on the domain it
trains on (a weighted mean over the two domains of a mixture, weights = their image counts). From
epoch ``min_epochs`` on, it stops when that loss has not improved by a relative ``min_delta`` for
``patience`` epochs ("plateau"), or after ``max_epochs`` ("max_epochs"), and restores the weights
of its best epoch:
the model a stage hands on (to a transfer stage, to the record's ``final_*`` values) is that of
its best epoch. A stage *diverges* — and its run is recorded as failed — when a loss is not
finite, or when its in-domain validation loss exceeds :data:`DIVERGED_LOSS`, ten times the loss of
a coin flip (ln 2): an untrained U-Net starts near 0.7 and a trained one sits near 0.1, so a
model that far above chance has left the basin of training (e.g. a learning rate of 1e9).

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

from . import metrics
from .config import CPU_ISAS, StageConfig, config_hash
from .datasets import domain_tensors

EVAL_BATCH = 128  # images per forward pass when evaluating (no gradients)
DIVERGED_LOSS = 10 * metrics.COIN_FLIP_LOSS  # in-domain validation loss of a diverged stage
# progress(stage, epoch, epochs, row): called after every epoch; row = one line of the table
Progress = Callable[[str, int, int, dict], None]


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

    ``"d4"``: all 8 orientations of every image, shuffled together; ``"d4-random"``: every image
    once, in a random orientation; ``"none"``: every image once as it is. A last minibatch of a
    single image joins the one before: BatchNorm in training mode cannot normalise one image
    whose deepest feature map is 1×1 (the smoke model at 32²).
    """
    order = torch.randperm(n * stage.copies, generator=gen)
    if stage.augment == "d4-random":
        elements = torch.randint(0, 8, (n,), generator=gen)
    starts = list(range(0, len(order), stage.batch_size))
    if len(starts) > 1 and len(order) - starts[-1] == 1:
        starts.pop()
    for start, stop in zip(starts, starts[1:] + [len(order)], strict=True):
        chunk = order[start:stop]
        idx = chunk % n
        yield idx, (elements[idx] if stage.augment == "d4-random" else chunk // n)


def _augment(x: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Apply D4 element ``ks[i]`` (a CPU tensor) to image ``x[i]``; no device synchronisation."""
    if not bool(ks.any()):
        return x
    out = torch.empty_like(x)
    for k in ks.unique().tolist():
        rows = torch.nonzero(ks == k).flatten().to(x.device, non_blocking=True)
        out[rows] = d4(x[rows], k)
    return out


def autocast(device: torch.device, precision: str = "bf16"):
    """bfloat16 autocast on ``device`` for ``precision="bf16"`` (bf16 keeps fp32's exponent
    range: no loss scaling), else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# CPU features that compute bf16 natively, and torch's probes of them (torch.cpu, private but
# stable since 2.2; a torch without a probe counts as lacking the feature)
BF16_UNITS = (("AVX512_BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported"))


def cpu_capability() -> str:
    """This CPU as torch sees it: the vector instruction set its kernels use
    (``torch.backends.cpu.get_cpu_capability()``, e.g. ``"AVX2"``, ``"AVX512"``) followed by its
    native bf16 units, e.g. ``"AVX512 AVX512_BF16 AMX"``."""
    units = [name for name, probe in BF16_UNITS if getattr(torch.cpu, probe, lambda: False)()]
    return " ".join([torch.backends.cpu.get_cpu_capability(), *units])


def native_bf16(capability: str) -> bool:
    """Whether a CPU of ``capability`` (:func:`cpu_capability`) computes bf16 natively."""
    return any(name in capability.split() for name, _ in BF16_UNITS)


def precision_problem(precision: str, device: str | torch.device) -> str | None:
    """Why ``precision`` should not run on ``device`` here (None: it may). bf16 on a CPU
    without bf16 units is emulated by oneDNN — about 10× slower than fp32, never faster — and
    is refused rather than run."""
    if precision != "bf16":
        return None
    dev = torch.device(device)
    if dev.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return None if ok else f"precision bf16: {dev} has no bf16 support"
    capability = cpu_capability()
    if native_bf16(capability):
        return None
    return (
        f"precision bf16 on this CPU ({capability}): it has no native bf16 (AVX512_BF16 or "
        "AMX), so bf16 would run ~10x slower than fp32"
    )


def check_precision(
    precisions, device: str | torch.device, what: str = "run", allowed: str = "fp32"
) -> None:
    """ValueError (one line: ``what``, the problem, ``allowed``) if any of ``precisions``
    should not run on ``device`` here."""
    for precision in dict.fromkeys(precisions):
        problem = precision_problem(precision, device)
        if problem:
            raise ValueError(f"{what}: {problem}; allowed here: {allowed}")


def cpu_isa_problem(isa: str | None, device: str | torch.device) -> str | None:
    """Why this process cannot compute a stage pinned to ``isa`` (``StageConfig.cpu_isa``) on
    ``device`` (None: it can). Torch reads the pin when it loads: a process that imported torch
    unpinned on a CPU with wider kernels would compute other numbers, and is refused. A CPU
    without the pinned kernels computes with its own, and its records say which."""
    if isa is None or torch.device(device).type != "cpu":
        return None
    env = CPU_ISAS[isa]
    if not getattr(torch.cpu, f"_is_{isa}_supported", lambda: False)():
        return None  # nothing to pin to: the record's cpu_capability says what computed
    capability = torch.backends.cpu.get_cpu_capability()
    wide = getattr(torch.cpu, "_is_avx512_supported", lambda: False)()
    pinned = capability.lower() == env["ATEN_CPU_CAPABILITY"] and (
        not wide or os.environ.get("ONEDNN_MAX_CPU_ISA") == env["ONEDNN_MAX_CPU_ISA"]
    )
    if pinned:
        return None
    pin = " ".join(f"{k}={v}" for k, v in env.items())
    return (
        f"cpu_isa {isa} on this CPU ({cpu_capability()}): this process computes with other "
        f"kernels, whose numbers differ; start it with {pin} (hrtem-book sets them itself)"
    )


def check_cpu_isa(isas, device: str | torch.device, what: str = "run") -> None:
    """ValueError (one line) if this process cannot compute stages pinned to ``isas``."""
    for isa in dict.fromkeys(isas):
        problem = cpu_isa_problem(isa, device)
        if problem:
            raise ValueError(f"{what}: {problem}")


def compute_provenance(device: str | torch.device) -> dict[str, str]:
    """Where a run computed: its device (with the GPU's name), the CPU capability and torch."""
    dev = torch.device(device)
    name = str(dev)
    if dev.type == "cuda" and torch.cuda.is_available():
        name = f"{dev} ({torch.cuda.get_device_name(dev)})"
    return {"device": name, "cpu_capability": cpu_capability(), "torch": str(torch.__version__)}


# channels_last on every device: on CUDA it feeds the tensor cores; on this CPU (oneDNN) it made
# the narrow U-Net at 64² 1.3-1.6× faster to train and 2× faster to evaluate (bench_train.py)
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
def predict_stats(
    model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, precision: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-image losses ``[N]``, per-image confusion counts ``[N, 4]``) in eval mode."""
    was_training = model.training
    model.eval()
    losses, stats = [], []
    for start in range(0, len(images), EVAL_BATCH):
        with autocast(images.device, precision):
            logits = model(images[start : start + EVAL_BATCH])
        y = masks[start : start + EVAL_BATCH]
        losses.append(metrics.image_losses(logits, y))
        stats.append(metrics.confusion(logits, y))
    model.train(was_training)
    if not losses:
        return torch.empty(0), torch.empty(0, 4, dtype=torch.long)
    return torch.cat(losses), torch.cat(stats)


def evaluate(
    model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, precision: str = "fp32"
) -> float:
    """Mean per-pixel cross-entropy of the logits over a set of equally sized images."""
    return float(predict_stats(model, images, masks, precision)[0].double().mean())


def evaluate_images(
    model: torch.nn.Module, eval_set: EvalSet, precision: str = "fp32"
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{domain: (per-image losses [n], per-image counts [n, 4])}`` of ``eval_set``, on the
    CPU, from one pass."""
    losses, stats = predict_stats(model, eval_set.images, eval_set.masks, precision)
    losses, stats = losses.cpu(), stats.cpu()
    return {key: (losses[r], stats[r]) for key, r in eval_set.groups.items()}


def domain_scores(
    per_image: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, dict[str, float]]:
    """``{metric: {domain: value}}`` from :func:`evaluate_images`' per-image values."""
    per_domain = {key: metrics.scores(*values) for key, values in per_image.items()}
    return {m: {key: s[m] for key, s in per_domain.items()} for m in metrics.METRICS}


def evaluate_domains(
    model: torch.nn.Module, eval_set: EvalSet, precision: str = "fp32"
) -> dict[str, dict[str, float]]:
    """``{metric: {domain: value}}`` for every domain of ``eval_set``, from one pass."""
    return domain_scores(evaluate_images(model, eval_set, precision))


def trained_norms(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that training updates (in training mode once ``model.train()`` ran;
    a frozen part's stay in eval mode, see :meth:`hrtem_book.models.UNet.train`)."""
    bn = torch.nn.modules.batchnorm._BatchNorm
    return [
        m for m in model.modules() if isinstance(m, bn) and m.training and m.track_running_stats
    ]


@contextlib.contextmanager
def kept_momentum(norms):
    """Restore the momentum of ``norms`` on exit (a recalibration sets its own)."""
    saved = [m.momentum for m in norms]
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum


def batch_starts(n: int) -> list[int]:
    """Starts of the ``EVAL_BATCH``-image batches of a recalibration over ``n`` images."""
    return list(range(0, n, EVAL_BATCH))


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, images: torch.Tensor, precision: str = "fp32") -> None:
    """Recompute the population statistics of the trained BatchNorm layers from ``images`` (the
    stage's training images as they are) under the current weights; see
    ``StageConfig.recalibrate_bn``. Forward passes in training mode, ``EVAL_BATCH`` at a time;
    batch k enters with momentum 1/k, so the first replaces the old statistics and the result
    is the average over the batches (the rule torch's momentum=None follows, written so that a
    vmapped stack can follow it too)."""
    was_training = model.training
    model.train()
    norms = trained_norms(model)
    with kept_momentum(norms):
        for k, start in enumerate(batch_starts(len(images)) if norms else [], start=1):
            for m in norms:
                m.momentum = 1.0 / k
            with autocast(images.device, precision):
                model(images[start : start + EVAL_BATCH])
    model.train(was_training)


def step(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    precision: str = "fp32",
) -> torch.Tensor:
    """One optimiser step of the engine on a batch: the forward pass in ``precision``
    autocast, the cross-entropy of the logits in fp32, backward, update. The batch's mean loss
    (detached). :func:`train_stage` trains with it, the benchmarks time it."""
    with autocast(x.device, precision):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports kilobytes: the process's peak resident set, not this stage's alone
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _generator(seed: int, name: str) -> torch.Generator:
    """A shuffling generator per (seed, stage), independent of torch's global RNG."""
    return torch.Generator().manual_seed(int(config_hash({"seed": seed, "stage": name}), 16))


def _monitored(val_loss: dict[str, float], monitor: dict[str, float]) -> float:
    total = sum(monitor.values())
    return sum(w * val_loss[key] for key, w in monitor.items()) / total


class StoppingRule:
    """One model's course through a stage under the module's stopping and divergence rules: it
    records every epoch into the stage summary and decides when to stop and which epoch to keep.
    The only home of these rules; :func:`train_stage` applies one to its model and
    :func:`hrtem_book.stacked.train_stack` one to each model of a stack.

    Per epoch: :meth:`training` with the epoch's training loss (False: diverged, stop before
    evaluating), then :meth:`epoch` with the validation scores (True: the best epoch so far,
    keep its weights); :attr:`done` says the stage ends here. :meth:`finish` closes the
    summary.
    """

    def __init__(self, stage: StageConfig, name: str, groups, monitor: dict[str, float]):
        self.stage, self.name, self.monitor = stage, name, dict(monitor)
        self.summary = self._new_summary(groups)
        self.best = math.inf
        self.error: str | None = None
        self.done = False

    def _new_summary(self, keys) -> dict:
        out: dict = {"train_loss": []}
        for m in metrics.METRICS:
            out[f"val_{m}"] = {key: [] for key in keys}
        for m in metrics.METRICS:
            out[f"best_{m}"], out[f"final_{m}"] = {}, {}
        out.update(
            train_time_s=0.0,
            eval_time_s=0.0,
            peak_memory_mb=0.0,
            epochs_run=0,
            best_epoch=0,
            stop_reason="",
            monitor=dict(self.monitor),
        )
        return out

    def _diverge(self, reason: str) -> bool:
        self.error, self.done = reason, True
        self.summary["stop_reason"] = "diverged"
        return False

    def training(self, epoch: int, train_loss: float) -> bool:
        """False (diverged) when the epoch's training loss is not finite."""
        if math.isfinite(train_loss):
            return True
        return self._diverge(
            f"non-finite training loss ({train_loss}) in {self.name} epoch {epoch}"
        )

    def epoch(self, epoch: int, train_loss: float, val: dict[str, dict[str, float]]) -> bool:
        """Record the epoch (``val``: ``{metric: {domain: value}}``); True when it is the best so
        far. Sets :attr:`done` at a plateau or a divergence (:attr:`error` says which)."""
        bad = [key for key, v in val["loss"].items() if not math.isfinite(v)]
        if bad:
            return self._diverge(
                f"non-finite validation loss on {bad[0]} in {self.name} epoch {epoch}"
            )
        s = self.summary
        s["train_loss"].append(train_loss)
        for m in metrics.METRICS:
            for key, v in val[m].items():
                s[f"val_{m}"][key].append(v)
        s["epochs_run"] = epoch
        current = _monitored(val["loss"], self.monitor)
        if current > DIVERGED_LOSS:
            return self._diverge(
                f"in-domain validation loss {current:.3g} > {DIVERGED_LOSS:.3g} "
                f"(10 ln 2) in {self.name} epoch {epoch}: diverged"
            )
        stage = self.stage
        if current < self.best * (1.0 - stage.min_delta):
            self.best, s["best_epoch"] = current, epoch
            return True
        if (
            stage.patience is not None
            and epoch >= stage.min_epochs
            and epoch - s["best_epoch"] >= stage.patience
        ):
            s["stop_reason"], self.done = "plateau", True
        return False

    def finish(self, train_s: float, eval_s: float, peak_memory_mb: float) -> dict:
        """The stage summary: times, stop reason ("max_epochs" if nothing stopped it), and
        best_* = each domain's optimum over the epochs, final_* = the kept (best) epoch's."""
        s = self.summary
        if not self.done:
            s["stop_reason"] = "max_epochs"
        s["train_time_s"], s["eval_time_s"], s["peak_memory_mb"] = train_s, eval_s, peak_memory_mb
        kept = s["best_epoch"]
        for m in metrics.METRICS:
            pick = metrics.METRIC[m].best
            for key, history in s[f"val_{m}"].items():
                if history:
                    s[f"best_{m}"][key] = pick(history)
                if kept:
                    s[f"final_{m}"][key] = history[kept - 1]
        return s


class Single:
    """One module as what :func:`train_models` trains (the per-model engine); its twin for many
    models at once is :class:`hrtem_book.stacked.Stack`. Batches come as one-element lists."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def __len__(self) -> int:
        return 1

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def step(self, xs, ys, optimizer: torch.optim.Optimizer, precision: str) -> torch.Tensor:
        return step(self.model, xs[0], ys[0], optimizer, precision)[None]

    def recalibrate_bn(self, train_sets, precision: str) -> None:
        recalibrate_bn(self.model, train_sets[0][0], precision)

    def evaluate(self, eval_set: EvalSet, precision: str) -> list[dict[str, dict[str, float]]]:
        return [evaluate_domains(self.model, eval_set, precision)]

    def state_dict(self, m: int) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load(self, m: int, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def write_back(self) -> None:
        """Nothing to do: the module is trained in place."""


def train_models(
    trainee,
    train_sets: list[tuple[torch.Tensor, torch.Tensor]],
    eval_set: EvalSet,
    stage: StageConfig,
    lr: float,
    seeds: list[int],
    name: str,
    monitors: list[dict[str, float]],
    progress: Progress | None = None,
) -> list[tuple[dict, str | None]]:
    """The training loop of every engine: one stage of the ``len(trainee)`` models of
    ``trainee`` (a :class:`Single` module, or a :class:`~hrtem_book.stacked.Stack`), each on its
    own training images with its own shuffling and D4 draws (its seed) and its own
    :class:`StoppingRule`; (summary, error) per model.

    Per epoch: every model's batches, one :func:`step` of the trainee on them (the stack steps
    all its models at once); the rules see the training losses (a diverged model stops before
    evaluation); the learning rate decays; BatchNorm is recalibrated on the training images
    (``stage.recalibrate_bn``); one pass evaluates every model on ``eval_set``; each rule
    records its model's epoch and says whether to keep its weights. A model whose rule is done
    stays in a stack, but nothing it does afterwards is recorded or kept. Each model ends with
    the weights of its kept epoch. Times are the whole trainee's.
    """
    n = len(train_sets[0][0])
    device = train_sets[0][0].device
    # foreach: one kernel per step for all tensors (the per-tensor loop cost 7 % of a laptop run)
    optimizer = torch.optim.Adam(trainee.trainable, lr=lr, foreach=True)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=stage.lr_decay)
    gens = [_generator(s, name) for s in seeds]
    rules = [StoppingRule(stage, name, eval_set.groups, mon) for mon in monitors]
    best: list[dict | None] = [None] * len(rules)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_s = eval_s = 0.0
    for epoch in range(1, stage.max_epochs + 1):
        if all(r.done for r in rules):
            break
        t0 = time.perf_counter()
        trainee.train(True)
        loss_sums = torch.zeros(len(rules), device=device, dtype=torch.float64)
        plans = [list(_batches(n, stage, g)) for g in gens]
        for batch in zip(*plans, strict=True):
            xs, ys = [], []
            for (idx, ks), (images, masks) in zip(batch, train_sets, strict=True):
                idx = idx.to(device, non_blocking=True)
                xs.append(_augment(images[idx], ks))
                ys.append(_augment(masks[idx], ks))
            loss_sums += trainee.step(xs, ys, optimizer, stage.precision).double() * len(xs[0])
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the steps ran asynchronously: time them whole
        lr_used = schedule.get_last_lr()[0]
        t1 = time.perf_counter()
        train_s += t1 - t0
        losses = [float(s) / (n * stage.copies) for s in loss_sums.tolist()]
        live = [m for m, r in enumerate(rules) if not r.done and r.training(epoch, losses[m])]
        if not live:
            break
        schedule.step()
        if stage.recalibrate_bn:
            k = stage.recalibrate_images
            trainee.recalibrate_bn([(x[:k], y[:k]) for x, y in train_sets], stage.precision)
        vals = trainee.evaluate(eval_set, stage.precision)
        eval_s += time.perf_counter() - t1
        for m in live:
            if rules[m].epoch(epoch, losses[m], vals[m]):
                best[m] = trainee.state_dict(m)
        if progress is not None and len(rules) == 1 and not rules[0].error:
            row = {"train_loss": losses[0], "val_loss": vals[0]["loss"], "lr": lr_used}
            row.update(val_dice=vals[0]["dice"], time_s=train_s + eval_s)
            progress(name, epoch, stage.max_epochs, row)
    peak = _peak_memory_mb(device)
    for m, state in enumerate(best):
        if state is not None:
            trainee.load(m, state)
    trainee.write_back()
    return [(rule.finish(train_s, eval_s, peak), rule.error) for rule in rules]


def train_stage(
    model: torch.nn.Module,
    train_set: tuple[torch.Tensor, torch.Tensor],
    eval_set: EvalSet,
    stage: StageConfig,
    lr: float,
    seed: int,
    name: str,
    monitor: dict[str, float],
    progress: Progress | None = None,
) -> tuple[dict, str | None]:
    """Train ``model`` in place for one stage (:func:`train_models` of this one model); returns
    (stage summary S, error or None).

    ``monitor`` weighs the evaluation domains (keys of ``eval_set.groups``) whose validation
    loss decides when the stage stops (see the module docstring); the model ends with the
    weights of the best epoch. ``train_set`` and ``eval_set`` must already be on the model's
    device. Only parameters with ``requires_grad`` are optimised (freezing is applied
    beforehand). ``train_time_s`` and ``eval_time_s`` split the stage's wall time between
    training steps and the per-epoch evaluation; ``peak_memory_mb`` is the CUDA allocator's peak
    during the stage, or on the CPU the process's peak resident set so far.
    """
    unknown = sorted(set(monitor) - set(eval_set.groups))
    if not monitor or unknown or min(monitor.values()) <= 0:
        raise ValueError(f"monitor={monitor}: positive weights of evaluated domains needed")
    (out,) = train_models(
        Single(model), [train_set], eval_set, stage, lr, [seed], name, [monitor], progress
    )
    return out


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
    "domain_scores",
    "evaluate_domains",
    "evaluate_images",
    "EvalSet",
    "standardize",
    "d4",
    "select",
]
