"""Runs: a pretraining, a transfer (pretraining → transfer) or a mixture baseline, end to end.

:func:`run` takes a :class:`~hrtem_book.config.PretrainConfig`,
:class:`~hrtem_book.config.TransferConfig` or :class:`~hrtem_book.config.MixtureConfig` and returns
its record (:mod:`hrtem_book.records`). Each kind of run is one function that chooses the model
and the training images; all three train through the same :func:`hrtem_book.train.train_stage`.
A transfer run loads the checkpoint of its pretraining (:mod:`hrtem_book.checkpoints`) and
trains that pretraining only when the checkpoint is missing; a pretraining run returns the record
kept in its checkpoint.

    hrtem-book train --series defocus --pretrain -10 --transfer 5 --n-transfer 64 \\
        --freeze encoder --profile laptop
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import xarray as xr

from . import checkpoints, metrics, stacked, train
from .config import (
    DataConfig,
    MixtureConfig,
    PretrainConfig,
    RunConfig,
    StageConfig,
    TransferConfig,
    config_hash,
)
from .datasets import SMALL_SERIES_BYTES, load_series, series_path
from .layout import Layout
from .models import build_model, count_parameters, freeze
from .records import build_record, kind_of, write_record
from .series import get_series
from .simulate import check_device

_INIT_LOCK = threading.Lock()


# per-image test losses are recorded to 1e-6 (their spread over images is ~1e-2)
IMAGE_LOSS_DIGITS = 6


@functools.lru_cache(maxsize=8)  # every series of a profile: a sweep interleaves its studies
def open_series(series: str, data: DataConfig, data_dir: Path, device: str = "cpu") -> xr.Dataset:
    """The series of ``data`` in ``data_dir`` (simulated first when missing), cached per process.

    A small series (every laptop series) is read into memory once: a sweep worker then slices
    its runs' images from memory instead of reopening and decoding the netCDF file per run
    (measured on the laptop sweep: the reopening cost more than a transfer run's training). A
    paper-scale series (14 GB) stays lazy and is read image by image.
    """
    ds = load_series(series, data, data_dir, device=device)
    if series_path(series, data, data_dir).stat().st_size >= SMALL_SERIES_BYTES:
        return ds
    ds.load()
    ds.close()  # the values stay; the file handle goes (HDF5 refuses a second, linked opening)
    return ds


class Context:
    """What every stage of one run needs: device, data, evaluation sets, progress callback."""

    def __init__(self, device: str, data: xr.Dataset, progress: train.Progress | None):
        self.device = torch.device(device)
        self.data = data
        self.progress = progress
        self._eval: dict[int | None, train.EvalSet] = {}
        self.compute = train.compute_provenance(self.device)  # stamped into its records

    def tensors(self, domain, split: str, n: int | None):
        return tuple(
            train.to_device(t, self.device) for t in train.select(self.data, domain, split, n)
        )

    def eval_set(
        self, n_eval: int | None, n_ood: int | None = None, own=(), split: str = "val"
    ) -> train.EvalSet:
        """Images of ``split`` of every domain: ``n_eval`` of the domains in ``own`` (those the
        stage trains on), ``n_ood`` of the others (None: ``n_eval``), concatenated."""
        n_ood = n_eval if n_ood is None else n_ood
        key = (n_eval, n_ood, tuple(sorted(own)), split)
        if key not in self._eval:
            sets = {
                str(d): train.select(
                    self.data, d, split, self._clip(n_eval if str(d) in own else n_ood, d, split)
                )
                for d in train.dataset_domains(self.data)
            }
            ev = train.EvalSet.from_sets(sets)
            self._eval[key] = replace(
                ev,
                images=train.to_device(ev.images, self.device),
                masks=ev.masks.to(self.device),
            )
        return self._eval[key]

    def _clip(self, n: int | None, domain, split: str) -> int | None:
        if n is None:
            return None
        spec = get_series(self.data.attrs["series"])
        hit = spec.matches(self.data["domain"].values, domain)
        return min(n, int((hit & (self.data["split"].values == split)).sum()))

    def score(self, model: torch.nn.Module, summary: dict, precision: str) -> dict:
        """``summary`` with the kept model's scores on the test images of every domain
        (``test_<metric>``: {domain: value}) and each image's own (``test_image_loss``:
        {domain: [loss per image]}, ``test_image_counts``: {domain: [[TP, FP, FN] per image]},
        the pixel counts Dice and IoU are summed from; the images are the unit of the test
        set's sampling error, see :mod:`hrtem_book.findings`). The test images are read here
        only, never by the plateau rule or the choice of the kept epoch."""
        per_image = train.evaluate_images(model, self.eval_set(None, split="test"), precision)
        values = train.domain_scores(per_image)
        summary.update({f"test_{m}": values[m] for m in metrics.METRICS})
        summary["test_image_loss"] = {
            key: [round(float(v), IMAGE_LOSS_DIGITS) for v in losses]
            for key, (losses, _) in per_image.items()
        }
        summary["test_image_counts"] = {
            key: counts[:, :3].tolist() for key, (_, counts) in per_image.items()
        }
        return summary

    def model(self, cfg, seed: int):
        with _INIT_LOCK:  # smp/timm initialise from torch's global RNG: one thread at a time
            torch.manual_seed(seed)
            model = build_model(cfg)
        return model.to(self.device, memory_format=train.LAYOUT)

    def train(self, model, train_set, stage, lr: float, seed: int, name: str, monitor: dict):
        """One stage of ``model`` on ``train_set``, evaluated on every domain after each epoch;
        ``monitor`` weighs the domains whose loss decides when it stops."""
        monitor = {str(d): float(w) for d, w in monitor.items()}
        eval_set = self.eval_set(stage.n_eval, stage.n_eval_ood, tuple(monitor))
        summary, error = train.train_stage(
            model, train_set, eval_set, stage, lr, seed, name, monitor, self.progress
        )
        if error is None:
            self.score(model, summary, stage.precision)
        return summary, error


# --- one function per kind of run -------------------------------------------------------------
def train_pretrain(cfg: PretrainConfig, ctx: Context) -> tuple[dict, torch.nn.Module | None]:
    """Train the pretraining ``cfg`` from scratch: (its record, the model or None if it failed)."""
    model = ctx.model(cfg.model, cfg.seed)
    train_set = ctx.tensors(cfg.domain, "train", cfg.n_train)
    summary, error = ctx.train(
        model, train_set, cfg.stage, cfg.lr, cfg.seed, "pretrain", monitor(cfg)
    )
    record = build_record(cfg, {"pretrain": summary}, error, count_parameters(model))
    record["compute"] = ctx.compute
    return record, (None if error else model)


def _pretrained(cfg: PretrainConfig, layout: Layout, ctx: Context) -> dict:
    def make() -> tuple[dict, dict | None]:
        record, model = train_pretrain(cfg, ctx)
        return record, (None if model is None else model.state_dict())

    return checkpoints.obtain(layout, cfg, make, ctx.device)


def run_pretrain(cfg: PretrainConfig, layout: Layout, ctx: Context) -> dict:
    return _pretrained(cfg, layout, ctx)["record"]  # as recorded when it was trained


def run_transfer(cfg: TransferConfig, layout: Layout, ctx: Context) -> dict:
    ckpt = _pretrained(cfg.pretrain, layout, ctx)
    pre = ckpt["record"]
    stages = {"pretrain": pre["stages"]["pretrain"]}
    model = ctx.model(cfg.pretrain.model, cfg.seed)
    if ckpt["state_dict"] is None:
        error = f"pretraining failed: {pre['error']}"
        return build_record(cfg, stages, error, count_parameters(model))
    model.load_state_dict(ckpt["state_dict"])
    freeze(model, cfg.freeze)
    train_set = ctx.tensors(cfg.domain, "train", cfg.n_train)
    stages["transfer"], error = ctx.train(
        model, train_set, cfg.stage, cfg.lr, cfg.seed, "transfer", monitor(cfg)
    )
    return build_record(cfg, stages, error, count_parameters(model))


def run_mixture(cfg: MixtureConfig, layout: Layout, ctx: Context) -> dict:
    train_set = _mixture_set(cfg, ctx)
    model = ctx.model(cfg.model, cfg.seed)
    summary, error = ctx.train(
        model, train_set, cfg.stage, cfg.lr, cfg.seed, "mixture", monitor(cfg)
    )
    return build_record(cfg, {"mixture": summary}, error, count_parameters(model))


def _mixture_set(cfg: MixtureConfig, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images of a mixture, its domains' in order; a mix such as "0:512"
    (studies.parse_mix allows a zero share) trains on one domain alone."""
    parts = [ctx.tensors(d, "train", n)
             for d, n in zip(cfg.domains, cfg.n_images, strict=True) if n != 0]  # fmt: skip
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def monitor(cfg: RunConfig) -> dict:
    """The domains that stop a run's (last) stage (``cfg.monitored``), equally weighted."""
    return dict.fromkeys(cfg.monitored, 1)


RUNNERS: dict[type, Callable[[RunConfig, Layout, Context], dict]] = {
    PretrainConfig: run_pretrain,
    TransferConfig: run_transfer,
    MixtureConfig: run_mixture,
}


# --- stacks of runs (torch.func): the engine of accelerators --------------------------------
def stack_key(cfg: RunConfig) -> str:
    """Runs with one key train as one stack (:mod:`hrtem_book.stacked`): one kind, data,
    architecture, stage, learning rate, training-set size and freezing option; their domains
    and seeds may differ. Where a stage reads fewer validation images off its own domain, the
    evaluation set depends on the domain, which then joins the key."""
    base = cfg.base
    key = {"kind": kind_of(cfg), "n": cfg.n_images, "freeze": cfg.freeze, "stage": cfg.stage,
           "lr": cfg.lr, "data": base.data, "series": base.series, "model": base.model}  # fmt: skip
    if cfg.stage.n_eval_ood not in (None, cfg.stage.n_eval):
        key["own"] = cfg.monitored
    return config_hash(key)


def _stack_train(ctx: Context, cfgs, models, train_sets, monitors, name: str):
    stage = cfgs[0].stage
    own = tuple(dict.fromkeys(str(d) for mon in monitors for d in mon))
    eval_set = ctx.eval_set(stage.n_eval, stage.n_eval_ood, own)
    mons = [{str(d): float(w) for d, w in mon.items()} for mon in monitors]
    seeds = [c.seed for c in cfgs]
    out = stacked.train_stack(models, train_sets, eval_set, stage, cfgs[0].lr, seeds, name, mons)
    for model, (summary, error) in zip(models, out, strict=True):
        summary["engine"] = f"stack of {len(cfgs)}"
        if error is None:  # each model holds its kept weights again (Stack.write_back)
            ctx.score(model, summary, stage.precision)
    return out


def _pretrain_group(cfgs: list[PretrainConfig], layout: Layout, ctx: Context) -> list[dict]:
    todo = [c for c in cfgs if not checkpoints.checkpoint_path(layout, c).exists()]
    if todo:
        models = [ctx.model(c.model, c.seed) for c in todo]
        sets = [ctx.tensors(c.domain, "train", c.n_train) for c in todo]
        out = _stack_train(ctx, todo, models, sets, [monitor(c) for c in todo], "pretrain")
        for c, model, (summary, error) in zip(todo, models, out, strict=True):
            record = build_record(c, {"pretrain": summary}, error, count_parameters(model))
            record["compute"] = ctx.compute
            state = None if error else model.state_dict()
            checkpoints.save_checkpoint(checkpoints.checkpoint_path(layout, c), c, record, state)
    return [_pretrained(c, layout, ctx)["record"] for c in cfgs]


def _transfer_group(cfgs: list[TransferConfig], layout: Layout, ctx: Context) -> list[dict]:
    records: dict[int, dict] = {}
    live, models, pres = [], [], []
    for i, c in enumerate(cfgs):
        ckpt = _pretrained(c.pretrain, layout, ctx)
        model = ctx.model(c.pretrain.model, c.seed)
        pre = ckpt["record"]
        if ckpt["state_dict"] is None:
            stages = {"pretrain": pre["stages"]["pretrain"]}
            error = f"pretraining failed: {pre['error']}"
            records[i] = build_record(c, stages, error, count_parameters(model))
            continue
        model.load_state_dict(ckpt["state_dict"])
        live.append(i)
        models.append(freeze(model, c.freeze))
        pres.append(pre["stages"]["pretrain"])
    if live:
        group = [cfgs[i] for i in live]
        sets = [ctx.tensors(c.domain, "train", c.n_train) for c in group]
        out = _stack_train(ctx, group, models, sets, [monitor(c) for c in group], "transfer")
        for i, model, pre, (summary, error) in zip(live, models, pres, out, strict=True):
            stages = {"pretrain": pre, "transfer": summary}
            records[i] = build_record(cfgs[i], stages, error, count_parameters(model))
    return [records[i] for i in range(len(cfgs))]


def _mixture_group(cfgs: list[MixtureConfig], layout: Layout, ctx: Context) -> list[dict]:
    sets = [_mixture_set(c, ctx) for c in cfgs]
    monitors = [monitor(c) for c in cfgs]
    models = [ctx.model(c.model, c.seed) for c in cfgs]
    out = _stack_train(ctx, cfgs, models, sets, monitors, "mixture")
    return [
        build_record(c, {"mixture": summary}, error, count_parameters(m))
        for c, m, (summary, error) in zip(cfgs, models, out, strict=True)
    ]


GROUP_RUNNERS = {PretrainConfig: _pretrain_group, TransferConfig: _transfer_group,
                 MixtureConfig: _mixture_group}  # fmt: skip


def run_group(
    cfgs: list[RunConfig], layout: Layout, *, device: str = "cpu", data: xr.Dataset | None = None
) -> list[dict]:
    """Run configs of one :func:`stack_key` as one stack; their records, in order.

    Each record is the one :func:`run` gives the config alone, up to floating-point rounding
    of the stacked kernels; its stage summaries say ``"engine": "stack of M"``.
    """
    keys = {stack_key(c) for c in cfgs}
    if len(keys) != 1:
        raise ValueError(f"run_group needs configs of one stack key, got {len(keys)}")
    train.set_threads_from_env()
    check_compute(cfgs, device)
    series, data_cfg = series_and_data(cfgs[0])
    if data is None:
        data = open_series(series, data_cfg, layout.data_dir, device)
    for c in cfgs:
        _check_domains(c, data)
    ctx = Context(device, data, None)
    kind_of(cfgs[0])  # a one-line error for anything but a run config
    records = GROUP_RUNNERS[type(cfgs[0])](cfgs, layout, ctx)
    for record in records:
        record.setdefault("compute", ctx.compute)
    return records


def series_and_data(cfg: RunConfig) -> tuple[str, DataConfig]:
    return cfg.base.series, cfg.base.data


def stage_configs(cfg: RunConfig) -> list[StageConfig]:
    """The stage configs a run trains with (a transfer: its pretraining's and its own)."""
    return [s.stage for s in cfg.stages]


def check_compute(cfgs: list[RunConfig], device: str) -> None:
    """A one-line ValueError if this machine cannot train ``cfgs`` on ``device`` (no such
    device, or bf16 on a CPU without native bf16)."""
    check_device(device)
    stages = [s for c in cfgs for s in stage_configs(c)]
    train.check_precision([s.precision for s in stages], device, what="run")
    train.check_cpu_isa([s.cpu_isa for s in stages], device, what="run")


def _check_domains(cfg: RunConfig, ds: xr.Dataset) -> None:
    present = train.dataset_domains(ds)
    for d in cfg.trained_domains:
        if d not in present:
            allowed = ", ".join(map(str, present))
            raise ValueError(f"domain {d!r} is not in the series; allowed: {allowed}")


def run(
    cfg: RunConfig,
    layout: Layout,
    *,
    device: str = "cpu",
    data: xr.Dataset | None = None,
    progress: train.Progress | None = None,
) -> dict:
    """Run one pretraining, transfer or mixture configuration; return its record.

    Checkpoints go to ``layout.checkpoints_dir``. ``data`` is the series dataset (schema of
    docs/ARCHITECTURE.md); when None it is opened from ``layout.data_dir`` (simulated first if
    missing). A non-finite loss gives status "failed" with the reason; invalid input (unknown
    domain, too many images, a checkpoint of another config) raises ValueError.
    """
    kind_of(cfg)  # a one-line error for anything but a run config
    runner = RUNNERS[type(cfg)]
    train.set_threads_from_env()
    check_compute([cfg], device)
    series, data_cfg = series_and_data(cfg)
    if data is None:
        data = open_series(series, data_cfg, layout.data_dir, device)
    _check_domains(cfg, data)
    ctx = Context(device, data, progress)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed image sizes: autotuned kernels pay off
    record = runner(cfg, layout, ctx)
    record.setdefault("compute", ctx.compute)  # a pretraining's record says where it trained
    return record


# --- one run from the command line ----------------------------------------------------------
class ProgressTable:
    """One line per epoch under a tqdm bar: train loss, the loss on the run's own domains, the
    mean over all domains, the learning rate and the elapsed time."""

    def __init__(self, stages: list, total_epochs: int):
        from tqdm import tqdm

        self.note = tqdm.write
        self.bar = tqdm(total=max(total_epochs, 1), unit="epoch", dynamic_ncols=True)
        self.targets = [str(s.domain) for s in stages]
        cols = " ".join(f"{t:>9}" for t in self.targets)
        self.note(f"{'stage':9} {'epoch':>5} {'train':>8} {cols} {'all':>8} {'lr':>8} {'time':>7}")

    def __call__(self, name: str, epoch: int, epochs: int, row: dict) -> None:
        val = row["val_loss"]
        cols = " ".join(f"{val.get(t, float('nan')):9.4f}" for t in self.targets)
        mean = sum(val.values()) / len(val)
        self.note(
            f"{name:9} {epoch:>2}/{epochs:<2} {row['train_loss']:8.4f} {cols} {mean:8.4f} "
            f"{row['lr']:8.2e} {row['time_s']:6.1f}s"
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def train_one(cfg: RunConfig, layout: Layout, device: str = "cpu") -> tuple[dict, Path]:
    """``hrtem-book train``: run ``cfg`` with a progress table (reusing a pretraining's
    checkpoint when there is one) and write its record; (record, record path)."""
    stages = list(cfg.stages)
    ckpt = checkpoints.checkpoint_path(layout, stages[0])
    need_pretrain = not ckpt.exists()
    table = ProgressTable(
        stages, sum(s.stage.max_epochs for s in stages[(0 if need_pretrain else 1) :])
    )
    if not need_pretrain:
        table.note(f"pretrain  loaded {ckpt}")
    record = run(cfg, layout, device=device, progress=table)
    table.close()
    return record, write_record(layout.record_path("train", record["config_hash"]), record)
