"""A GPU campaign in one command: simulate, sweep every study as model stacks, collect, benchmark.

    hrtem-book campaign --profile gpu --device cuda --out OUT --budget-s 480
    hrtem-book campaign --profile smoke --device cpu --out /tmp/rehearsal --budget-s 300

Made for a lent accelerator with a fixed budget: every step runs in this process on
``--device`` — the missing dataset series are simulated there (batched multislice), the runs of
every study train as stacks of up to ``--max-stack`` models (:mod:`hrtem_book.stacked`), the
databases are collected — and the sweep starts no new run once ``--budget-s`` minus a reserve
for collection and the benchmark has passed, so the command ends in time with whatever
finished (missing cells stay ``missing``). It writes into ``--out``: one database per study
(``<study>.nc``, with the device, the wall time and the budget in its attrs), ``benchmark.json``
(training and simulation throughput, measured in the same process) and ``campaign.json`` (what
ran, how long each step took). The same command on the CPU with the smoke profile is the
rehearsal: the identical code path in a few minutes (``tests/test_campaign.py``).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__, train
from .config import CAMPAIGN_RESERVE_S, ModelConfig, SimulationConfig
from .findings import collect
from .layout import Layout, atomic_write_text, check_writable, git_commit
from .models import build_model
from .profiles import PROFILES, Profile
from .results import load_database, save_database
from .stacked import Stack
from .studies import STUDY_NAMES
from .sweep import prepare_data, run_sweep


def device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_rate(model_cfg: ModelConfig, px: int, batch: int, device: str, steps: int) -> float:
    """Images/s of the plain baseline: fp32, contiguous, one model, a host DataLoader."""
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(model_cfg).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = torch.utils.data.TensorDataset(
        torch.randn(batch * (steps + 2), 1, px, px),
        torch.randint(0, 2, (batch * (steps + 2), px, px)),
    )
    loader = torch.utils.data.DataLoader(data, batch_size=batch, pin_memory=dev.type == "cuda")
    model.train()
    start = None
    for i, (x, y) in enumerate(loader):
        if i == 2:  # two warm-up steps
            _sync(dev)
            start = time.perf_counter()
        x, y = x.to(dev), y.to(dev)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync(dev)
    return batch * steps / (time.perf_counter() - start)


def stacked_rate(
    model_cfg: ModelConfig,
    px: int,
    batch: int,
    device: str,
    steps: int,
    n_models: int,
    precision: str = "bf16",
) -> float:
    """Images/s of the stacked engine: ``n_models`` models, ``precision`` autocast,
    channels_last, data resident on the device, D4 applied there."""
    dev = torch.device(device)
    models = []
    for seed in range(n_models):
        torch.manual_seed(seed)
        models.append(build_model(model_cfg).to(dev, memory_format=train.LAYOUT))
    stack = Stack(models)
    opt = torch.optim.Adam(stack.trainable, lr=1e-4, foreach=True)
    images = train.to_device(torch.randn(4 * batch, 1, px, px), dev)
    masks = torch.randint(0, 2, (4 * batch, px, px), device=dev)
    gen = torch.Generator().manual_seed(0)
    stack.train(True)
    start = None
    for i in range(steps + 2):
        if i == 2:
            _sync(dev)
            start = time.perf_counter()
        xs, ys = [], []
        for _ in range(n_models):
            idx = torch.randint(0, len(images), (batch,), generator=gen).to(dev)
            ks = torch.randint(0, 8, (batch,), generator=gen)
            xs.append(train._augment(images[idx], ks))
            ys.append(train._augment(masks[idx], ks))
        stack.step(xs, ys, opt, precision)
    _sync(dev)
    return n_models * batch * steps / (time.perf_counter() - start)


def simulation_rate(
    sim: SimulationConfig, radii_nm: tuple[float, float], device: str, n: int
) -> float:
    """Images/s of the simulator: CdSe scenes on amorphous carbon, all phonons, one defocus."""
    import numpy as np

    from .simulate import noisy_images, simulate_scene
    from .structures import build_scene, get_lattice

    rng = np.random.default_rng(0)
    blur = get_lattice("CdSe").label_blur_A
    start = time.perf_counter()
    for _ in range(n):
        scene = build_scene(sim, "CdSe", radii_nm, rng)
        sw = simulate_scene(scene, sim, blur, rng, device)
        noisy_images(sw, np.array([0.0]), np.array([400.0]), sim, [rng])
    _sync(torch.device(device))
    return n / (time.perf_counter() - start)


def benchmark(profile: Profile, device: str, *, scale: str, steps: int) -> dict:
    """Training images/s of the stacked engine against the plain loop, at paper settings and at
    the profile's, and simulator images/s (paper settings, or the profile's for ``scale
    "profile"`` — the CPU rehearsal)."""
    paper = PROFILES["paper"]
    precision = profile.stage.precision  # the profile's: bf16 on a GPU, fp32 in a CPU rehearsal
    out: dict = {"device": device_name(device), "steps": steps, "precision": precision}
    settings = {"profile": (profile.model, profile.data.sim.image_px, 16, 32)}
    if scale == "paper":
        settings["paper"] = (paper.model, 512, 16, 4)
    for name, (model_cfg, px, batch, n_models) in settings.items():
        plain = plain_rate(model_cfg, px, batch, device, steps)
        ours = stacked_rate(model_cfg, px, batch, device, steps, n_models, precision)
        out[f"training_{name}"] = {
            "px": px,
            "batch": batch,
            "models_stacked": n_models,
            "plain_fp32_img_s": round(plain, 1),
            f"stacked_{precision}_img_s": round(ours, 1),
            "speedup": round(ours / plain, 2),
        }
    data = paper.data if scale == "paper" else profile.data
    sim = data.sim
    out["simulation"] = {
        "settings": "paper" if scale == "paper" else profile.name,
        "field_nm": sim.field_nm,
        "sampling_A": sim.sampling_A,
        "n_phonons": sim.n_phonons,
        "images_per_s": round(
            simulation_rate(sim, data.series_radius_nm, device, 2 if scale == "paper" else 4), 3
        ),
    }
    return out


def run_campaign(
    profile: Profile,
    root: str | Path,
    out: str | Path,
    *,
    device: str = "cuda",
    budget_s: float = 480.0,
    max_stack: int = 64,
    bench_scale: str = "paper",
    bench_steps: int = 10,
    log=print,
) -> dict:
    """Simulate, sweep (stacked, with a deadline), collect and benchmark; see the module
    docstring. Returns what ``campaign.json`` holds."""
    t0 = time.perf_counter()
    out = check_writable(Path(out), "--out")
    layout = Layout.of(root, profile)
    times: dict[str, float] = {}
    prepare_data(STUDY_NAMES, profile, layout, device=device, progress=False)
    times["simulate_s"] = time.perf_counter() - t0
    log(f"campaign: data ready in {times['simulate_s']:.0f} s")
    deadline = max(0.0, budget_s - CAMPAIGN_RESERVE_S - (time.perf_counter() - t0))
    t1 = time.perf_counter()
    summary = run_sweep(
        "all", profile, root, executor="stacked", device=device, max_stack=max_stack,
        deadline_s=deadline, progress=False, log=log,
    )  # fmt: skip
    times["sweep_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    paths = collect(profile, root)
    wall = time.perf_counter() - t0
    written = {}
    for study, path in paths.items():
        ds = load_database(path, study)
        ds.attrs.update(
            device=device_name(device),
            campaign_wall_s=round(wall, 1),
            campaign_budget_s=budget_s,
            torch_version=str(torch.__version__),
        )
        save_database(ds, path)  # results/<profile>/ holds the provenance too
        written[study] = str(save_database(ds, out / f"{study}.nc"))
    times["collect_s"] = time.perf_counter() - t2
    result = {
        "profile": profile.name,
        "device": device_name(device),
        "package_version": __version__,
        "git_commit": git_commit(),
        "budget_s": budget_s,
        "runs_done": summary.done,
        "runs_skipped": summary.skipped,
        "runs_failed": summary.failed,
        "runs_errors": summary.errors,
        "runs_not_started": summary.unstarted,
        "databases": written,
    }
    if bench_steps > 0:
        t3 = time.perf_counter()
        bench = benchmark(profile, device, scale=bench_scale, steps=bench_steps)
        times["benchmark_s"] = time.perf_counter() - t3
        atomic_write_text(out / "benchmark.json", json.dumps(bench, indent=1) + "\n")
        result["benchmark"] = bench
    result["times_s"] = {k: round(v, 1) for k, v in times.items()}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out / "campaign.json", json.dumps(result, indent=1) + "\n")
    log(f"campaign: {summary.line('sweep')}; wrote {len(written)} databases to {out}")
    return result
