"""In-domain difficulty against electrons per pixel: where does the laptop's dose series sit?

The study simulated its dose series at 0.2 Å pixels: 30-600 e⁻/Å² put 1.2-24 electrons on a
pixel. The laptop profile's 1 Å pixels collect 25 times as many at the same nominal dose. A
network sees pixels through a receptive field of a fixed number of pixels, so the count per
pixel (per receptive field) is the candidate similarity variable for the noise a model must
cope with. This script trains one in-domain model per dose on the laptop's data settings (the
generalization-dose study: train on one dose, test on it) for doses that span both regimes, and
prints the in-domain test loss and Dice against electrons per pixel.

    .venv/bin/python benchmarks/dose_regime.py --root /tmp/dose-regime

It writes nothing outside ``--root``. One seed per dose: a measurement of the trend, not a
finding.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from hrtem_book.findings import collect
from hrtem_book.profiles import PROFILES
from hrtem_book.sweep import run_sweep

# 1.2-24: the study's per-pixel counts at its 0.2 Å; 30-600: the laptop's nominal doses
DOSES = (1.2, 6.0, 24.0, 30.0, 150.0, 600.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="scratch project folder")
    p.add_argument("--seeds", type=int, default=1)
    args = p.parse_args()
    laptop = PROFILES["laptop"]
    profile = dataclasses.replace(
        laptop,
        name="dose-regime",
        description="laptop data and training, doses spanning the study's per-pixel counts",
        data=dataclasses.replace(laptop.data, doses=DOSES),
        studies={"generalization-dose": {**laptop.studies["generalization-dose"],
                                         "seed": tuple(range(args.seeds))}},
    )  # fmt: skip
    t0 = time.perf_counter()
    run_sweep(["generalization-dose"], profile, args.root, progress=False)
    import xarray as xr

    path = collect(profile, args.root, ["generalization-dose"])["generalization-dose"]
    ds = xr.open_dataset(path)
    px = profile.data.sim.pixel_A
    print(f"laptop data, {px:g} Å pixels, {args.seeds} seed(s); {time.perf_counter() - t0:.0f} s")
    print("dose [e⁻/Å²]  e⁻/pixel  in-domain loss  in-domain Dice")
    for d in DOSES:
        cell = ds.sel(train_domain=d, eval_domain=d, stage="pretrain")
        loss = float(cell["final_loss"].mean("seed"))
        dice = float(cell["final_dice"].mean("seed"))
        print(f"{d:12g}  {d * px * px:8g}  {loss:14.3f}  {dice:14.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
