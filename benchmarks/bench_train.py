"""Training speed: the CPU engine against the previous one, every profile's U-Net, one laptop
pretrain → transfer run, a bf16-vs-fp32 agreement check, and (on a GPU) our training loop
against a plain fp32 loop.

    OMP_NUM_THREADS=1 python benchmarks/bench_train.py                # CPU part
    OMP_NUM_THREADS=1 python benchmarks/bench_train.py --data-root data/laptop --precision-check 4
    python benchmarks/bench_train.py --device cuda                    # GPU part (paper settings)

CPU part, all rates in images per second of this process's CPU time (one thread), measured in
the same run, with the kernels the CPU profiles pin (AVX2; ``--native-kernels``: the CPU's own)
and headed by the CPU capability (``train.cpu_capability()``: the vector ISA and
any native bf16 units): (1) the laptop U-Net at 64², channels_last, in fp32 with batches of 4
(the laptop stage before the convergence change) and of 16 (the current CPU engine), and with
bf16 autocast (native only on AVX512-BF16 or AMX; elsewhere emulated and ~10× slower), training
and evaluation, fp32 contiguous beside it; (2) every base profile's model at its image size and
batch in fp32 and bf16; (3) the wall time of one laptop pretraining and its
transfer runs through :func:`hrtem_book.runs.run`, on the laptop defocus series when
``--data-root`` holds it, else on random images of the same shapes (speed does not depend on the
pixel values); (4) with ``--precision-check N``, N seeds of one pretraining and one transfer in
fp32 and in bf16 on the simulated series, whose losses and Dice must agree within seed noise.

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
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from hrtem_book.profiles import get_profile, pin_cpu

# the kernels the CPU profiles compute with (StageConfig.cpu_isa), pinned before torch loads;
# `--native-kernels` measures the CPU's own instead (and runs the laptop stages unpinned)
NATIVE_KERNELS = "--native-kernels" in sys.argv
if not NATIVE_KERNELS:
    pin_cpu(get_profile("laptop"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hrtem_book import runs, train  # noqa: E402
from hrtem_book.config import PretrainConfig, StageConfig, TransferConfig  # noqa: E402
from hrtem_book.datasets import load_series, series_path  # noqa: E402
from hrtem_book.layout import Layout  # noqa: E402
from hrtem_book.models import build_model, count_parameters  # noqa: E402
from hrtem_book.profiles import BASE_PROFILES, PROFILES  # noqa: E402
from hrtem_book.testing import random_series  # noqa: E402

PREVIOUS_BATCH = 4  # the laptop stage before training to convergence: fp32, batches of 4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_rate(
    model,
    px: int,
    batch: int,
    device: torch.device,
    steps: int,
    warmup: int,
    layout,
    precision: str = "bf16",
) -> float:
    """Images/s of forward + backward + Adam step on random images."""
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
        train.step(model, x, y, opt, precision)
    _sync(device)
    return batch * steps / (clock() - start)


def eval_rate(model, px: int, precision: str, n: int = 256, repeats: int = 3) -> float:
    """Images/s of evaluation (forward, loss and confusion counts) on the CPU."""
    model = model.to(memory_format=train.LAYOUT)
    images = train.to_device(torch.randn(n, 1, px, px), torch.device("cpu"))
    masks = torch.randint(0, 2, (n, px, px))
    train.predict_stats(model, images[:64], masks[:64], precision)  # warm-up
    start = time.process_time()
    for _ in range(repeats):
        train.predict_stats(model, images, masks, precision)
    return n * repeats / (time.process_time() - start)


def engine_comparison(args) -> None:
    """The laptop U-Net: fp32 (batch 4 and 16, channels_last and contiguous) and bf16."""
    profile = PROFILES["laptop"]
    px = profile.data.sim.image_px
    cpu = torch.device("cpu")
    rates = {}
    # bf16 emulated (no native units) is ~10x slower: fewer steps keep the benchmark short
    bf16_steps = args.steps * 3 if train.native_bf16(train.cpu_capability()) else 2
    for name, batch, precision, layout, steps in (
        ("fp32, batch 4", PREVIOUS_BATCH, "fp32", train.LAYOUT, args.steps * 3),
        ("fp32, batch 16, contiguous", 16, "fp32", torch.contiguous_format, args.steps * 3),
        ("fp32, batch 16 (engine)", 16, "fp32", train.LAYOUT, args.steps * 3),
        ("bf16, batch 16", 16, "bf16", train.LAYOUT, bf16_steps),
    ):
        torch.manual_seed(0)
        rates[name] = step_rate(build_model(profile.model), px, batch, cpu, steps, 2, layout,
                                precision)  # fmt: skip
    ev = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        ev[precision] = eval_rate(build_model(profile.model), px, precision)
    base = rates["fp32, batch 16 (engine)"]
    print(f"laptop U-Net at {px}², images per CPU-second (training step):")
    for name, rate in rates.items():
        print(f"  {name:28} {rate:7.1f}  ({rate / base:.2f}× the fp32 engine)")
    print(f"  evaluation: fp32 {ev['fp32']:.0f}, bf16 {ev['bf16']:.0f} "
          f"({ev['bf16'] / ev['fp32']:.2f}×)")  # fmt: skip


def cpu_part(args) -> None:
    capability = train.cpu_capability()
    native = "native bf16" if train.native_bf16(capability) else "no native bf16: emulated"
    kernels = "the CPU's own kernels" if NATIVE_KERNELS else "kernels pinned as the CPU profiles'"
    print(f"CPU capability {capability} ({native}; {kernels}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")  # fmt: skip
    if not args.skip_models:
        engine_comparison(args)
        print("\nimages/s of forward + backward + Adam step on the CPU (per second of CPU time)")
        print(f"{'profile':8} {'params':>10} {'px':>4} {'batch':>5} {'fp32':>8} {'bf16':>8}")
        for name in BASE_PROFILES:
            profile = PROFILES[name]
            px = profile.data.sim.image_px
            big = px > 256
            batch = args.paper_batch if big else profile.stage.batch_size
            steps, warmup = (1, 1) if big else (args.steps, 2)
            out = []
            for precision in ("fp32", "bf16"):
                torch.manual_seed(0)
                model = build_model(profile.model)
                if precision == "bf16" and big and not train.native_bf16(train.cpu_capability()):
                    out.append(float("nan"))  # emulated at 640²: minutes per step, skipped
                    continue
                out.append(step_rate(model, px, batch, torch.device("cpu"), steps, warmup,
                                     train.LAYOUT, precision))  # fmt: skip
            print(f"{name:8} {count_parameters(model)[1]:>10,} {px:>4} {batch:>5} "
                  f"{out[0]:8.1f} {out[1]:8.1f}")  # fmt: skip
    laptop_run(args)
    if args.precision_check:
        precision_check(args)


def _laptop_data(args):
    profile = PROFILES["laptop"]
    series = "defocus"
    if args.data_root and series_path(series, profile.data, args.data_root).exists():
        return load_series(series, profile.data, args.data_root), "simulated"
    return random_series(series, profile.data), "random images"


def _pretrain(profile, data_cfg, domain, seed, stage) -> PretrainConfig:
    return PretrainConfig(
        data=data_cfg,
        series="defocus",
        domain=domain,
        lr=1e-3,
        seed=seed,
        model=profile.model,
        stage=stage,
        n_train=profile.n_pretrain,
    )


def laptop_run(args) -> None:
    profile = PROFILES["laptop"]
    data, source = _laptop_data(args)
    doms = profile.data.domains("defocus")
    st, tst = profile.stage, profile.transfer
    if NATIVE_KERNELS:  # the same stages on the CPU's own kernels
        st, tst = replace(st, cpu_isa=None), replace(tst, cpu_isa=None)
    pre = _pretrain(profile, profile.data, -10.0, 0, st)
    print(f"\nlaptop run ({source}, {len(doms)} eval domains × n_eval={st.n_eval}; pretraining "
          f"≤ {st.max_epochs} epochs, {st.augment}; transfer ≤ {tst.max_epochs} epochs, "
          f"{tst.augment}; both to a plateau, {st.precision})")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        layout = Layout(Path(tmp), profile.name)
        start, cpu = time.perf_counter(), time.process_time()
        rec = runs.run(pre, layout, data=data)
        t_pre, c_pre = time.perf_counter() - start, time.process_time() - cpu
        s = rec["stages"]["pretrain"]
        print(f"pretrain  {pre.n_train:4d} images: {t_pre:6.2f} s wall, {c_pre:6.2f} s CPU, "
              f"{s['epochs_run']} epochs ({s['stop_reason']}), {rec['status']}")  # fmt: skip
        for n_transfer, freeze_option in itertools.product(
            args.n_transfer, ("none", "encoder", "decoder")
        ):
            cfg = TransferConfig(pre, 0.0, n_transfer, 1e-3, freeze_option, tst)
            start, cpu = time.perf_counter(), time.process_time()
            rec = runs.run(cfg, layout, data=data)
            t, c = time.perf_counter() - start, time.process_time() - cpu
            s = rec["stages"]["transfer"]
            print(f"transfer  {n_transfer:4d} images, freeze {freeze_option:7}: {t:6.2f} s wall, "
                  f"{c:6.2f} s CPU, {s['epochs_run']} epochs ({s['stop_reason']})")  # fmt: skip
    ctx = runs.Context("cpu", data, None)
    eval_set = ctx.eval_set(st.n_eval)
    torch.manual_seed(0)
    model = build_model(profile.model).to(memory_format=train.LAYOUT)
    start = time.process_time()
    train.evaluate_domains(model, eval_set, st.precision)
    print(f"one evaluation of all domains: {time.process_time() - start:.2f} s CPU")


def precision_check(args) -> None:
    """Seeds of one laptop pretraining (-10 nm) and its transfer (→ 0 nm, 16 images) in fp32
    and bf16: in-domain loss and Dice, mean ± standard deviation over seeds."""
    profile = PROFILES["laptop"]
    data, source = _laptop_data(args)
    if source != "simulated":
        print("\nprecision check skipped: it needs the simulated series (--data-root data/laptop)")
        return
    print(f"\nbf16 vs fp32 over {args.precision_check} seeds (mean ± sd; CPU s per run):")
    for precision in ("fp32", "bf16"):
        rows = []
        for seed in range(args.precision_check):
            # bf16 computes with the CPU's own kernels (its bf16 units), as the -bf16 profiles do
            isa = None if precision == "bf16" or NATIVE_KERNELS else profile.stage.cpu_isa
            st = replace(profile.stage, precision=precision, cpu_isa=isa)
            pre = _pretrain(profile, profile.data, -10.0, seed, st)
            cfg = TransferConfig(
                pre, 0.0, 16, 1e-3, "none",
                replace(profile.transfer, precision=precision, cpu_isa=isa),
            )  # fmt: skip
            with tempfile.TemporaryDirectory() as tmp:
                start = time.process_time()
                rec = runs.run(cfg, Layout(Path(tmp), profile.name), data=data)
                cpu = time.process_time() - start
            p, t = rec["stages"]["pretrain"], rec["stages"]["transfer"]
            rows.append((p["final_loss"]["-10.0"], p["final_dice"]["-10.0"],
                         t["final_loss"]["0.0"], t["final_dice"]["0.0"], cpu))  # fmt: skip
        cols = list(zip(*rows, strict=True))

        def ms(values) -> str:
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.4f} ± {sd:.4f}"

        print(f"  {precision}: pretraining loss {ms(cols[0])}, Dice {ms(cols[1])}; transfer loss "
              f"{ms(cols[2])}, Dice {ms(cols[3])}; {statistics.mean(cols[4]):.1f} s")  # fmt: skip


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
    ours = build_model(model_cfg).to(device, memory_format=train.LAYOUT)
    # the paper's stage: D4 on n/8 images gives n samples per epoch, as many as the plain loop's
    stage = StageConfig(max_epochs=1, batch_size=batch, augment="d4", precision="bf16")  # GPU
    base = tuple(train.to_device(t[: n // 8], device) for t in (images, masks))
    # one small evaluation domain: the stage monitors it, its time is kept apart (eval_time_s)
    tiny = train.EvalSet.from_sets({"bench": tuple(t[:4] for t in base)})
    warm = tuple(t[: max(1, batch // 2)] for t in base)
    train.train_stage(ours, warm, tiny, stage, 1e-4, 0, "warmup", {"bench": 1.0})
    summary, _ = train.train_stage(ours, base, tiny, stage, 1e-4, 0, "bench", {"bench": 1.0})
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
    parser.add_argument("--n-transfer", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--precision-check", type=int, default=0, metavar="SEEDS")
    parser.add_argument("--skip-models", action="store_true", help="only the laptop run")
    parser.add_argument("--data-root", type=Path, default=None, help="e.g. data/laptop")
    parser.add_argument("--gpu-images", type=int, default=1024)
    parser.add_argument(
        "--native-kernels", action="store_true",
        help="the CPU's own kernels, not the profiles' AVX2 pin (read at import)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    train.set_threads_from_env()
    if args.device == "cuda":
        cuda_part(args)
    else:
        cpu_part(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
