"""Training: one stage, pretrain → transfer, the mixture baseline, checkpoints and result records.

One *stage* is the paper's recipe: Adam, cross-entropy over the two classes (background,
particle), minibatches of ``StageConfig.batch_size``, learning rate ×``lr_decay`` after every
epoch, optional D4 augmentation (every image in all 8 dihedral orientations per epoch) and
per-image standardisation (mean 0, variance 1). After every epoch the loss on the validation set
of *every* domain of the series is measured and kept.

Reported loss: the mean cross-entropy of the 2-class **logits** (``F.cross_entropy``), whose floor
is 0. The paper's network ended in a softmax and applied cross-entropy to probabilities, whose
floor is 0.3133 for two classes, and subtracted that constant; our numbers are not shifted.

Entry point: :func:`run` takes a :class:`~hrtem_book.config.PretrainConfig`,
:class:`~hrtem_book.config.TransferConfig` or :class:`~hrtem_book.config.MixtureConfig` and returns
a JSON-serialisable record (format in docs/ARCHITECTURE.md, "Training results"). A transfer run
loads the checkpoint of its pretraining, ``<root>/checkpoints/<config_hash(pretrain)>.pt``, and
trains it (under a file lock, written atomically) only when it is missing.

    hrtem-book train --series defocus --pretrain -10 --transfer 5 --n-transfer 64 \\
        --freeze encoder --profile laptop
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import pickle
import resource
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from . import __version__, results
from .config import (
    FREEZE_OPTIONS,
    SERIES,
    DataConfig,
    MixtureConfig,
    PretrainConfig,
    RunConfig,
    StageConfig,
    TransferConfig,
    config_hash,
    normalize_domain,
    to_jsonable,
)
from .datasets import domain_tensors, load_series
from .models import build_model, count_parameters, freeze

CHECKPOINT_FORMAT = 1
EVAL_BATCH = 64  # images per forward pass when evaluating (no gradients)
# progress(stage, epoch, epochs, row): called after every epoch; row = one line of the table
Progress = Callable[[str, int, int, dict], None]
Loader = Callable[[str, DataConfig], xr.Dataset]


_INIT_LOCK = threading.Lock()


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


_DATA_CACHE: dict[tuple, xr.Dataset] = {}


def _default_loader(data_root: Path, device: str) -> Loader:
    def load(series: str, data: DataConfig) -> xr.Dataset:
        key = (series, config_hash(data), str(data_root))
        if key not in _DATA_CACHE:
            _DATA_CACHE.clear()  # one series at a time: a sweep runs one study after another
            _DATA_CACHE[key] = load_series(series, data, data_root, device=device)
        return _DATA_CACHE[key]

    return load


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


def _autocast(device: torch.device):
    if device.type == "cuda":  # bf16 keeps fp32's range: no loss scaling needed
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# channels_last on every device: on CUDA it feeds the tensor cores; on this CPU (oneDNN) it made
# the narrow U-Net at 64² about 1.4× faster to train and 2× faster to evaluate (bench_train.py)
_LAYOUT = torch.channels_last


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=_LAYOUT) if x.dim() == 4 else x


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
        with _autocast(images.device):
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
                with _autocast(device):
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


# --- checkpoints and provenance --------------------------------------------------------------
def git_commit() -> str | None:
    """The commit of the package's source tree, or None outside a git checkout."""
    return results.git_commit() or None


def checkpoint_path(root: Path, cfg: PretrainConfig) -> Path:
    return Path(root) / "checkpoints" / f"{config_hash(cfg)}.pt"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (released by the OS if the holder dies)."""
    import fcntl  # POSIX only; the sweep's workers run on Linux

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # readers see the old file or the complete new one, never a partial


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
    """The checkpoint at ``path``; a ValueError when it was written for another config."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"checkpoint {path} is unreadable ({first}); delete it to retrain"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a format-1 hrtem-book checkpoint")
    want = to_jsonable(cfg)
    if ckpt["config"] != want:
        differ = ", ".join(_fields_differ(ckpt["config"], want)) or "?"
        raise ValueError(
            f"checkpoint {path} was written for config {ckpt['config_hash']}, "
            f"not {config_hash(cfg)} (fields differ: {differ})"
        )
    return ckpt


def _pretrained(cfg: PretrainConfig, root: Path, ctx: _Context) -> dict:
    """The checkpoint of ``cfg``: loaded when present, else trained once and saved."""
    path = checkpoint_path(root, cfg)
    if not path.exists():
        with _file_lock(path.with_name(path.name + ".lock")):
            if not path.exists():  # another worker may have finished it while we waited
                record, model = _train_pretrain(cfg, ctx)
                state = None if model is None else model.state_dict()
                ckpt = {
                    "format": CHECKPOINT_FORMAT,
                    "config": to_jsonable(cfg),
                    "config_hash": config_hash(cfg),
                    "record": record,
                    "state_dict": state,
                    "package_version": __version__,
                    "git_commit": git_commit(),
                    "torch_version": str(torch.__version__),
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                }
                _atomic_save(ckpt, path)
    return load_checkpoint(path, cfg, ctx.device)


# --- runs ------------------------------------------------------------------------------------
class _Context:
    """What every stage of one run needs: device, data, evaluation sets, progress callback."""

    def __init__(self, device: str, data: xr.Dataset, progress: Progress | None):
        self.device = torch.device(device)
        self.data = data
        self.progress = progress
        self._eval: dict[int | None, EvalSet] = {}

    def tensors(self, domain, split: str, n: int | None):
        return tuple(_to_device(t, self.device) for t in select(self.data, domain, split, n))

    def eval_set(self, n_eval: int | None) -> EvalSet:
        if n_eval not in self._eval:
            sets = {
                str(d): select(self.data, d, "val", _clip(n_eval, self.data, d))
                for d in dataset_domains(self.data)
            }
            ev = EvalSet.from_sets(sets)
            self._eval[n_eval] = replace(
                ev, images=_to_device(ev.images, self.device), masks=ev.masks.to(self.device)
            )
        return self._eval[n_eval]

    def model(self, cfg, seed: int):
        with _INIT_LOCK:  # smp/timm initialise from torch's global RNG: one thread at a time
            torch.manual_seed(seed)
            model = build_model(cfg)
        return model.to(self.device, memory_format=_LAYOUT)


def _clip(n: int | None, ds: xr.Dataset, domain) -> int | None:
    if n is None:
        return None
    values = ds["domain"].values
    hit = (
        np.isclose(values.astype(float), domain) if isinstance(domain, float) else values == domain
    )
    return min(n, int((hit & (ds["split"].values == "val")).sum()))


def _record(cfg: RunConfig, kind: str, stages: dict, error: str | None, model) -> dict:
    trainable, total = count_parameters(model) if model is not None else (0, 0)
    return {
        "config_hash": config_hash(cfg),
        "kind": kind,
        "config": to_jsonable(cfg),
        "status": "failed" if error else "ok",
        "error": error,
        "stages": stages,
        "trainable_params": trainable,
        "total_params": total,
        "package_version": __version__,
        "git_commit": git_commit(),
    }


def _train_pretrain(cfg: PretrainConfig, ctx: _Context):
    model = ctx.model(cfg.model, cfg.seed)
    train_set = ctx.tensors(cfg.domain, "train", cfg.n_train)
    summary, error = train_stage(
        model, train_set, ctx.eval_set(cfg.stage.n_eval), cfg.stage, cfg.lr, cfg.seed,
        "pretrain", ctx.progress,
    )  # fmt: skip
    record = _record(cfg, "pretrain", {"pretrain": summary}, error, model)
    return record, (None if error else model)


def _run_transfer(cfg: TransferConfig, root: Path, ctx: _Context) -> dict:
    ckpt = _pretrained(cfg.pretrain, root, ctx)
    pre = ckpt["record"]
    stages = {"pretrain": pre["stages"]["pretrain"]}
    model = ctx.model(cfg.pretrain.model, cfg.seed)
    if ckpt["state_dict"] is None:
        return _record(cfg, "transfer", stages, f"pretraining failed: {pre['error']}", model)
    model.load_state_dict(ckpt["state_dict"])
    freeze(model, cfg.freeze)
    train_set = ctx.tensors(cfg.domain, "train", cfg.n_train)
    summary, error = train_stage(
        model, train_set, ctx.eval_set(cfg.stage.n_eval), cfg.stage, cfg.lr, cfg.seed,
        "transfer", ctx.progress,
    )  # fmt: skip
    stages["transfer"] = summary
    return _record(cfg, "transfer", stages, error, model)


def _run_mixture(cfg: MixtureConfig, ctx: _Context) -> dict:
    # a mix such as "0:512" (studies.parse_mix allows a zero share) trains on one domain alone
    pairs = [(d, n) for d, n in zip(cfg.domains, cfg.n_images, strict=True) if n != 0]
    parts = [ctx.tensors(d, "train", n) for d, n in pairs]
    train_set = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    model = ctx.model(cfg.model, cfg.seed)
    summary, error = train_stage(
        model, train_set, ctx.eval_set(cfg.stage.n_eval), cfg.stage, cfg.lr, cfg.seed,
        "mixture", ctx.progress,
    )  # fmt: skip
    return _record(cfg, "mixture", {"mixture": summary}, error, model)


def _series_and_data(cfg: RunConfig) -> tuple[str, DataConfig]:
    base = cfg.pretrain if isinstance(cfg, TransferConfig) else cfg
    return base.series, base.data


def _check_domains(cfg: RunConfig, ds: xr.Dataset) -> None:
    present = dataset_domains(ds)
    if isinstance(cfg, TransferConfig):
        wanted = [cfg.pretrain.domain, cfg.domain]
    elif isinstance(cfg, MixtureConfig):
        wanted = list(cfg.domains)
    else:
        wanted = [cfg.domain]
    for d in wanted:
        if d not in present:
            allowed = ", ".join(map(str, present))
            raise ValueError(f"domain {d!r} is not in the series; allowed: {allowed}")


def set_threads_from_env() -> None:
    """``torch.set_num_threads($HRTEM_BOOK_THREADS)`` when that variable is set."""
    value = os.environ.get("HRTEM_BOOK_THREADS")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"HRTEM_BOOK_THREADS={value!r}; allowed: a positive integer")
        torch.set_num_threads(int(value))


def run(
    cfg: RunConfig,
    *,
    root: Path,
    device: str = "cpu",
    data: xr.Dataset | None = None,
    data_root: Path | None = None,
    progress: Progress | None = None,
) -> dict:
    """Run one pretraining, transfer or mixture configuration; return its result record.

    ``root`` is the results directory of a profile (``results/<profile>``); checkpoints go to
    ``root/checkpoints``. ``data`` is the series dataset (schema of docs/ARCHITECTURE.md); when
    None it is loaded (generated if missing) with ``datasets.load_series`` from ``data_root``,
    by default ``data/<profile>`` beside ``results/<profile>``. A non-finite loss gives status
    "failed" with the reason; invalid input (unknown domain, too many images, a checkpoint of
    another config) raises ValueError.
    """
    if not isinstance(cfg, PretrainConfig | TransferConfig | MixtureConfig):
        raise ValueError(f"cannot run a {type(cfg).__name__}; allowed: Pretrain/Transfer/Mixture")
    set_threads_from_env()
    root = Path(root)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; allowed: 'cpu'")
    series, data_cfg = _series_and_data(cfg)
    if data is None:
        data_root = Path(data_root) if data_root else root.parent.parent / "data" / root.name
        data = _default_loader(data_root, device)(series, data_cfg)
    _check_domains(cfg, data)
    ctx = _Context(device, data, progress)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed image sizes: autotuned kernels pay off
    if isinstance(cfg, TransferConfig):
        return _run_transfer(cfg, root, ctx)
    if isinstance(cfg, MixtureConfig):
        return _run_mixture(cfg, ctx)
    return _pretrained(cfg, root, ctx)["record"]  # as recorded when it was trained


# --- command line ----------------------------------------------------------------------------
def _parse_domain(series: str, text: str):
    return text if series == "structure" else float(text)


def config_from_args(args) -> RunConfig:
    """The run config for the CLI arguments; ValueError naming a bad value and what is allowed."""
    from .profiles import get_profile

    profile = get_profile(args.profile)
    if args.series not in SERIES:
        raise ValueError(f"--series {args.series!r}; allowed: {', '.join(SERIES)}")
    allowed = profile.data.domains(args.series)
    domains = {}
    for flag in ("pretrain", "transfer"):
        text = getattr(args, flag)
        if text is None:
            continue
        try:
            value = normalize_domain(args.series, _parse_domain(args.series, text))
        except ValueError:
            value = None
        if value not in allowed:
            shown = ", ".join(map(str, allowed))
            raise ValueError(f"--{flag} {text!r}; allowed for {args.series}: {shown}")
        domains[flag] = value
    n_max = profile.data.n_train
    if not 1 <= args.n_transfer <= n_max:
        raise ValueError(f"--n-transfer {args.n_transfer}; allowed: 1..{n_max} ({args.profile})")
    pretrain = PretrainConfig(
        data=profile.data,
        series=args.series,
        domain=domains["pretrain"],
        lr=args.pretrain_lr,
        seed=args.seed,
        model=profile.model,
        stage=profile.stage,
        n_train=profile.n_pretrain,
    )
    if "transfer" not in domains:
        return pretrain
    return TransferConfig(pretrain, domains["transfer"], args.n_transfer, args.transfer_lr,
                          args.freeze, profile.stage)  # fmt: skip


def _cli(args) -> int:
    from tqdm import tqdm

    from .sweep import write_record

    cfg = config_from_args(args)
    base = Path(args.root)
    root = base / "results" / args.profile
    stages = [cfg] if isinstance(cfg, PretrainConfig) else [cfg.pretrain, cfg]
    need_pretrain = not checkpoint_path(root, stages[0]).exists()
    total = sum(s.stage.epochs for s in stages[(0 if need_pretrain else 1) :])
    bar = tqdm(total=max(total, 1), unit="epoch", dynamic_ncols=True)
    targets = [str(s.domain) for s in stages]
    tqdm.write(f"{'stage':9} {'epoch':>5} {'train':>8} " + " ".join(f"{t:>9}" for t in targets)
               + f" {'all':>8} {'lr':>8} {'time':>7}")  # fmt: skip

    def progress(name, epoch, epochs, row):
        val = row["val_loss"]
        cols = " ".join(f"{val.get(t, float('nan')):9.4f}" for t in targets)
        mean = sum(val.values()) / len(val)
        tqdm.write(f"{name:9} {epoch:>2}/{epochs:<2} {row['train_loss']:8.4f} {cols} {mean:8.4f} "
                   f"{row['lr']:8.2e} {row['time_s']:6.1f}s")  # fmt: skip
        bar.update(1)

    if not need_pretrain:
        tqdm.write(f"pretrain  loaded {checkpoint_path(root, stages[0])}")
    record = run(cfg, root=root, device=args.device, data_root=base / "data" / args.profile,
                 progress=progress)  # fmt: skip
    bar.close()
    out = root / "records" / "train" / f"{record['config_hash']}.json"
    write_record(out, record)
    print(f"{record['status']}: {record['error'] or 'record'} -> {out}")
    return 0 if record["status"] == "ok" else 1


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("train", help="pretrain (and transfer) one model; write its record")
    p.add_argument("--series", required=True, help=f"one of {', '.join(SERIES)}")
    p.add_argument("--pretrain", required=True, help="pretraining domain (defocus nm, dose, name)")
    p.add_argument("--transfer", help="transfer domain; omitted: pretrain only")
    p.add_argument("--n-transfer", type=int, default=64, help="target training images")
    p.add_argument("--freeze", default="none", help=f"one of {', '.join(FREEZE_OPTIONS)}")
    p.add_argument("--profile", default="laptop")
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--transfer-lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--root", default=".", help="directory holding data/ and results/")
    p.set_defaults(func=_cli)


__all__ = [
    "run",
    "train_stage",
    "evaluate",
    "evaluate_domains",
    "EvalSet",
    "load_checkpoint",
    "checkpoint_path",
    "standardize",
    "d4",
    "select",
]
