"""Training speed: images/s of every profile's U-Net, one laptop pretrain → transfer run, and (on a
GPU) our training loop against a plain fp32 loop.

    OMP_NUM_THREADS=1 python benchmarks/bench_train.py                # CPU part
    OMP_NUM_THREADS=1 python benchmarks/bench_train.py --data-root data/laptop
    python benchmarks/bench_train.py --device cuda                    # GPU part (paper settings)

CPU part: forward + backward + Adam step of each profile's model at its image size
(``data.sim.image_px``) and minibatch (``stage.batch_size``; the paper model runs a smaller batch
on CPU, ``--paper-batch``, since one 640² step of 16 takes minutes); then the wall time of one
laptop pretraining and one transfer run through :func:`hrtem_book.runs.run`, on the laptop
defocus series when ``--data-root`` holds it, else on random images of the same shapes (speed
does not depend on the pixel values).

CUDA part: the paper settings (ResNet18 U-Net, 640² images, batch 16, D4), ``--gpu-images``
random samples per epoch: ``train_stage`` (bf16 autocast, channels_last, data resident on the
device, D4 applied on the device to 1/8 as many images) against a plain loop (fp32, a
``DataLoader`` from host memory over D4 copies built on the host) in the same process.
Goal: ≥ 3× images/s. The paper's A100 anchor: one transfer epoch on 1024 images in 6–8 s.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hrtem_book import runs, train
from hrtem_book.config import PretrainConfig, StageConfig, TransferConfig
from hrtem_book.datasets import load_series, series_path
from hrtem_book.layout import Layout
from hrtem_book.models import build_model, count_parameters
from hrtem_book.profiles import PROFILES
from hrtem_book.testing import random_series


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_rate(
    model, px: int, batch: int, device: torch.device, steps: int, warmup: int, layout
) -> float:
    """Images/s of forward + backward + Adam step on random images (our autocast)."""
    model = model.to(device, memory_format=layout)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch, 1, px, px, device=device).contiguous(memory_format=layout)
    y = torch.randint(0, 2, (batch, px, px), device=device)
    model.train()
    # on the CPU, this process's CPU time: the shared 2-core machine stretches wall time
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = clock()
        with train.autocast(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return batch * steps / (clock() - start)


def cpu_part(args) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if args.skip_models:
        return laptop_run(args)
    print("images/s of forward + backward + Adam step on the CPU (per second of CPU time)")
    print(f"{'profile':8} {'params':>10} {'px':>4} {'batch':>5} {'contiguous':>11} {'ch_last':>8}")
    for name, profile in PROFILES.items():
        px = profile.data.sim.image_px
        big = px > 256
        batch = args.paper_batch if big else profile.stage.batch_size
        steps, warmup = (1, 1) if big else (args.steps, 2)
        rates = []
        for layout in (torch.contiguous_format, torch.channels_last):
            torch.manual_seed(0)
            model = build_model(profile.model)
            rates.append(step_rate(model, px, batch, torch.device("cpu"), steps, warmup, layout))
        print(f"{name:8} {count_parameters(model)[1]:>10,} {px:>4} {batch:>5} "
              f"{rates[0]:11.1f} {rates[1]:8.1f}")  # fmt: skip
    laptop_run(args)


def laptop_run(args) -> None:
    profile = PROFILES["laptop"]
    series = "defocus"
    if args.data_root and series_path(series, profile.data, args.data_root).exists():
        data, source = load_series(series, profile.data, args.data_root), "simulated"
    else:
        data, source = random_series(series, profile.data), "random images"
    doms = profile.data.domains(series)
    pre = PretrainConfig(
        data=profile.data,
        series=series,
        domain=doms[len(doms) // 2 - 1],
        lr=1e-3,
        seed=0,
        model=profile.model,
        stage=profile.stage,
        n_train=profile.n_pretrain,
    )
    print(f"\nlaptop run ({source}, {len(doms)} eval domains × n_eval={profile.stage.n_eval}, "
          f"{profile.stage.epochs} epochs, batch {profile.stage.batch_size}, "
          f"D4={profile.stage.augment_d4})")  # fmt: skip
    print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: wall times stretch "
          "when other processes run; CPU time is this process's alone)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), time.process_time()
        layout = Layout(Path(tmp), profile.name)
        rec = runs.run(pre, layout, data=data)
        t_pre, c_pre = time.perf_counter() - start, time.process_time() - cpu
        print(f"pretrain  {pre.n_train:4d} images: {t_pre:6.2f} s wall, {c_pre:6.2f} s CPU "
              f"({rec['status']})")  # fmt: skip
        for n_transfer, freeze_option in itertools.product(
            args.n_transfer, ("none", "encoder", "decoder")
        ):
            cfg = TransferConfig(pre, doms[-1], n_transfer, 1e-4, freeze_option, profile.stage)
            start, cpu = time.perf_counter(), time.process_time()
            rec = runs.run(cfg, layout, data=data)
            t, c = time.perf_counter() - start, time.process_time() - cpu
            print(f"transfer  {n_transfer:4d} images, freeze {freeze_option:7}: {t:6.2f} s wall, "
                  f"{c:6.2f} s CPU ({rec['status']})")  # fmt: skip
    # eval share: one pass over every domain's n_eval validation images
    ctx = runs.Context("cpu", data, None)
    eval_set = ctx.eval_set(profile.stage.n_eval)
    torch.manual_seed(0)
    model = build_model(profile.model)
    start = time.perf_counter()
    train.evaluate_domains(model, eval_set)
    print(f"one evaluation of all domains: {time.perf_counter() - start:.2f} s")


def plain_epoch(model, images, masks, device, batch: int) -> float:
    """The baseline: fp32, contiguous layout, a DataLoader from host memory."""
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, masks), batch_size=batch, shuffle=True
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    _sync(device)
    start = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync(device)
    return len(images) / (time.perf_counter() - start)


def compare_loops(device: torch.device, model_cfg, px: int, n: int, batch: int) -> tuple:
    """(plain img/s, ours img/s) for one epoch of ``n`` samples of ``px``² images."""
    gen = torch.Generator().manual_seed(0)
    images = train.standardize(torch.rand(n, 1, px, px, generator=gen))
    masks = (torch.rand(n, px, px, generator=gen) < 0.25).long()
    # plain loop: every D4 copy materialised on the host, as a simple implementation would
    ks = torch.arange(8).repeat_interleave(n // 8 + 1)[:n]
    host_x, host_y = train._augment(images, ks), train._augment(masks, ks)
    torch.manual_seed(0)
    plain = build_model(model_cfg).to(device)
    plain_epoch(plain, host_x[: 4 * batch], host_y[: 4 * batch], device, batch)  # warm-up
    rate_plain = plain_epoch(plain, host_x, host_y, device, batch)
    del plain
    torch.manual_seed(0)
    ours = build_model(model_cfg).to(device, memory_format=torch.channels_last)
    # the paper's stage: D4 on n/8 images gives n samples per epoch, as many as the plain loop's
    stage = StageConfig(epochs=1, batch_size=batch, augment_d4=True)
    base = tuple(train.to_device(t[: n // 8], device) for t in (images, masks))
    no_eval = train.EvalSet.from_sets({})
    warm = tuple(t[: max(1, batch // 2)] for t in base)
    train.train_stage(ours, warm, no_eval, stage, 1e-4, 0, "warmup")
    summary, _ = train.train_stage(ours, base, no_eval, stage, 1e-4, 0, "bench")
    return rate_plain, 8 * (n // 8) / summary["train_time_s"]


def cuda_part(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    paper = PROFILES["paper"]
    px, n, batch = paper.data.sim.image_px, args.gpu_images, paper.stage.batch_size
    print(f"{torch.cuda.get_device_name()}: paper model, {n} samples of {px}², batch {batch}")
    rate_plain, rate_ours = compare_loops(torch.device("cuda"), paper.model, px, n, batch)
    print(f"plain fp32 + DataLoader: {rate_plain:8.1f} img/s")
    print(f"ours (bf16, channels_last, on device): {rate_ours:8.1f} img/s  "
          f"→ {rate_ours / rate_plain:.2f}× (goal ≥ 3×)")  # fmt: skip
    print(
        f"1024 samples: {1024 / rate_ours:.1f} s; 1024 images × 8 (D4): "
        f"{8192 / rate_ours:.1f} s (paper's A100: one transfer epoch on 1024 images, 6–8 s)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (CPU)")
    parser.add_argument("--paper-batch", type=int, default=2, help="paper model's CPU batch")
    parser.add_argument("--n-transfer", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--skip-models", action="store_true", help="only the laptop run")
    parser.add_argument("--data-root", type=Path, default=None, help="e.g. data/laptop")
    parser.add_argument("--gpu-images", type=int, default=1024)
    args = parser.parse_args(argv)
    train.set_threads_from_env()
    if args.device == "cuda":
        cuda_part(args)
    else:
        cpu_part(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
