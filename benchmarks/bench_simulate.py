"""Simulation speed and memory: our torch multislice against abTEM, and a series' peak memory.

    OMP_NUM_THREADS=1 python benchmarks/bench_simulate.py                 # CPU part
    python benchmarks/bench_simulate.py --device cuda --skip-abtem --skip-series  # GPU, paper

CPU part (laptop settings, one thread each):
1. images/s of ours vs abTEM on the same laptop CdSe scene (same atoms, Lobato, infinite
   projection, 0.2 Å, 2 Å slices, one configuration): exit wave → CTF → intensity, medians of
   ``--repeats`` runs after a warm-up (abTEM's first call compiles numba; ours fills its
   per-grid caches of kernels and apertures, as the first scene of a series does). Goal ≥ 1.5×.
   Both images are compared (correlation, relative L2) to show that both did the same work.
2. peak resident memory and wall time of generating the laptop defocus/dose series in a child
   process (``hrtem-book simulate``; ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``). Goal
   ≤ 2 GB.

``--device cuda``: paper settings (12.8 nm field, 0.1 Å, 8 phonons) — images/s of
``simulate_scene`` + one noisy image on ``--paper-scenes`` scenes and the projected time of a
512-image series. Goal: 512 images in ≤ 5 min on one H100.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from hrtem_book.potentials import Potential
from hrtem_book.profiles import get_profile
from hrtem_book.simulate import CTF, multislice, noisy_images, simulate_scene
from hrtem_book.structures import LATTICES, build_scene


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def ours_fn(atoms, sim, device: str = "cpu"):
    """One image of ours: potential + multislice + CTF + intensity."""
    ctf = CTF(sim.energy_eV, -100.0, sim.cs_A, sim.focal_spread_A)

    def one():
        pot = Potential.from_atoms(
            [atoms],
            sampling_A=sim.sampling_A,
            slice_thickness_A=sim.slice_thickness_A,
            device=device,
        )
        img = multislice(pot, sim.energy_eV).apply_ctf(ctf).intensity().array
        _sync(device)
        return img

    return one


def abtem_fn(atoms, sim):
    """One image of abTEM (single-threaded: synchronous dask, one FFTW thread)."""
    import abtem

    abtem.config.set({"diagnostics.progress_bar": False, "fftw.threads": 1})
    ctf = abtem.CTF(
        energy=sim.energy_eV, defocus=-100.0, Cs=sim.cs_A, focal_spread=sim.focal_spread_A
    )

    def one():
        pot = abtem.Potential(
            atoms,
            sampling=sim.sampling_A,
            slice_thickness=sim.slice_thickness_A,
            projection="infinite",
            parametrization="lobato",
        )
        wave = abtem.PlaneWave(energy=sim.energy_eV).multislice(pot)
        return wave.apply_ctf(ctf).intensity().compute(scheduler="synchronous").array

    return one


def interleaved(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per call of each function, runs alternating between them so
    that both see the same load of a shared machine; one warm-up call each (abTEM's first call
    compiles numba and plans FFTW)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            times[k].append((time.perf_counter() - w, time.process_time() - c))
    return {k: tuple(statistics.median(x[i] for x in v) for i in (0, 1)) for k, v in times.items()}


def bench_series(profile: str, series: str) -> tuple[float, float]:
    """(wall seconds, peak RSS [GB]) of ``hrtem-book simulate`` in a fresh child process."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            "-m",
            "hrtem_book.cli",
            "simulate",
            "--series",
            series,
            "--profile",
            profile,
            "--out",
            out,
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kB on Linux
    return wall, peak_kb / 2**20


def bench_paper(device: str, n_scenes: int) -> float:
    """Seconds per paper-scale image (scene + 8 phonons + label + calibration + one image)."""
    data = get_profile("paper").data
    sim = data.sim
    blur = LATTICES["CdSe"].label_blur_A
    times = []
    for i in range(n_scenes + 1):  # the first is a warm-up (cuFFT plans)
        rng = np.random.default_rng(i)
        scene = build_scene(sim, "CdSe", data.series_radius_nm, rng)
        t = time.perf_counter()
        sw = simulate_scene(scene, sim, blur, rng, device)
        noisy_images(sw, [-10.0], [300.0], sim, [rng])
        _sync(device)
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", default="laptop")
    ap.add_argument("--series", default="defocus", help="series generated for the memory test")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--paper-scenes", type=int, default=4)
    ap.add_argument("--skip-abtem", action="store_true")
    ap.add_argument("--skip-series", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    rows = []
    sim = get_profile(args.profile).data.sim
    scene = build_scene(
        sim, "CdSe", get_profile(args.profile).data.series_radius_nm, np.random.default_rng(0)
    )
    label = f"{args.profile} ({sim.gpts}², {len(scene.atoms)} atoms)"
    fns = {"ours": ours_fn(scene.atoms, sim, args.device)}
    if not args.skip_abtem:
        fns["abTEM"] = abtem_fn(scene.atoms, sim)
    res = interleaved(fns, args.repeats)
    for k, (wall, cpu) in res.items():
        dev = args.device if k == "ours" else "cpu"
        rows.append((f"{k} [{dev}], {label}", f"{1 / wall:.2f} img/s", f"{cpu:.3f} s CPU/img"))
    if "abTEM" in res:
        wall = res["abTEM"][0] / res["ours"][0]
        cpu = res["abTEM"][1] / res["ours"][1]
        rows.append(("speed-up ours / abTEM (goal ≥ 1.5)", f"{wall:.2f}× wall", f"{cpu:.2f}× CPU"))
        # the same work: both codes must give the same image (abTEM's arrays are [x, y])
        ours = fns["ours"]()[0].cpu().double().numpy()
        theirs = np.asarray(fns["abTEM"](), float).squeeze().T
        corr = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
        rel = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
        rows.append(("same image: ours vs abTEM", f"corr {corr:.6f}", f"rel. L2 {rel:.1e}"))
    if not args.skip_series:
        wall, peak = bench_series(args.profile, args.series)
        rows.append(
            (
                f"{args.profile} {args.series}+dose series",
                f"{wall:.0f} s wall",
                f"peak RSS {peak:.2f} GB (goal ≤ 2)",
            )
        )
    if args.device.startswith("cuda"):
        per = bench_paper(args.device, args.paper_scenes)
        rows.append(
            (
                "paper scene, 8 phonons [cuda]",
                f"{1 / per:.2f} img/s",
                f"512 images ≈ {512 * per / 60:.1f} min (goal ≤ 5)",
            )
        )
    width = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{width}}  {r[1]:>14}  {r[2]}")


if __name__ == "__main__":
    main()
