"""Named presets of the frozen configs: ``smoke`` (tests), ``laptop`` (a 2-core CPU), ``paper``.

A profile is data. Code receives the configs it holds and never asks for a profile's name.
Each block below is owned by one stage of the pipeline; the values of ``laptop`` are sized from
measurements on a 2-core machine (see README, "Performance").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from .config import (
    CPU_ISA_VARS,
    CPU_ISAS,
    DataConfig,
    MeasuredImaging,
    ModelConfig,
    SimulationConfig,
    StageConfig,
)
from .series import GENERALIZATION_SERIES


@dataclass(frozen=True)
class Profile:
    """A named preset: data, model, the stage of training from scratch (pretrainings and
    mixtures), the stage of transfer (``transfer_stage``; None = the same) and the study grids."""

    name: str
    description: str
    data: DataConfig
    model: ModelConfig
    stage: StageConfig
    n_pretrain: int  # images of the pretraining domain
    # study name -> axis name -> values; shrinks the paper grids (see hrtem_book.studies)
    studies: dict = field(default_factory=dict)
    transfer_stage: StageConfig | None = None
    # the profile this one varies (same data, e.g. "laptop" for "laptop-bf16"): its simulated
    # series are shared, its results kept apart
    base: str | None = None

    @property
    def transfer(self) -> StageConfig:
        """The stage config of transfer runs."""
        return self.transfer_stage or self.stage

    @property
    def data_name(self) -> str:
        """The name of the folder of simulated data this profile reads (``data/<name>/``)."""
        return self.base or self.name

    @property
    def precisions(self) -> tuple[str, ...]:
        """The arithmetic of its training stages (``StageConfig.precision``), without repeats."""
        return tuple(dict.fromkeys((self.stage.precision, self.transfer.precision)))

    @property
    def cpu_env(self) -> dict[str, str]:
        """The environment that pins the CPU kernels of its stages (``StageConfig.cpu_isa``;
        empty when none is pinned): set it before torch is imported (:func:`pin_cpu`)."""
        out: dict[str, str] = {}
        for isa in dict.fromkeys((self.stage.cpu_isa, self.transfer.cpu_isa)):
            out.update(CPU_ISAS.get(isa, {}))
        return out


def pin_cpu(profile: Profile) -> None:
    """Set this process's environment (which the workers it starts inherit) to the CPU kernels
    of ``profile``'s stages: their pin, or none (the CPU's own kernels, as bf16 needs).
    Effective only before torch is imported; a run checks it
    (:func:`hrtem_book.train.check_cpu_isa`)."""
    env = profile.cpu_env
    for var in CPU_ISA_VARS:
        if var in env:
            os.environ[var] = env[var]
        else:
            os.environ.pop(var, None)


# --- simulation and datasets -------------------------------------------------------------
PAPER_DATA = DataConfig()

LAPTOP_DATA = DataConfig(
    sim=SimulationConfig(field_nm=6.4, sampling_A=0.2, pixel_A=1.0, n_phonons=1),
    # 64 training images per domain: a pretraining (random D4, 3e-3) plateaus at the in-domain
    # Dice of 128 images within 0.005 (measured on the fp32 engine, 6 defocus pretrainings), the
    # transfer sets of 4-16 images become 1/16-1/4 of a pretraining (the study: 1/8-1), and the
    # series simulate in 56 % of the time
    n_train=64,
    n_val=16,
    # 16 test images per domain, never read by a selection: every number of the book and every
    # verdict is measured on them (the kept epoch is chosen on the 16 validation images)
    n_test=16,
    # five of the eleven defoci (both sides of focus, in focus, 10 and 20 nm away): every run is
    # evaluated on each after every epoch, and evaluation was 40 % of a transfer run's time
    defoci_nm=(-20.0, -10.0, 0.0, 10.0, 20.0),
    # the study's lowest, middle and highest dose as electrons per pixel: its 30, 150 and
    # 600 e⁻/Å² at 0.2 Å pixels put 1.2, 6 and 24 electrons on a pixel, and a network sees the
    # noise per pixel (its receptive field is a fixed number of pixels); at these 1 Å pixels the
    # nominal doses would give 25 times as many. Checked before any cross-domain result
    # (benchmarks/dose_regime.py, one in-domain model per dose, laptop data, AVX2): in-domain test
    # Dice 0.731, 0.769, 0.883 at 1.2, 6, 24 e⁻/Å² against 0.890, 0.940, 0.953 at 30, 150,
    # 600 — the nominal doses sit in a regime where dose changes little. Finding 5 needs three
    # doses (a fourth cost 55 s of the 20-minute budget on two AVX2 cores). The other series
    # keep their nominal 400 and 300 e⁻/Å² (25 times the study's electrons per pixel): stated
    # in the findings chapter as outside the study's regime.
    doses=(1.2, 6.0, 24.0),
    # small and large particles apart (radii 1.0-1.5 and 1.8-2.3 nm, "large" scaled to the
    # 6.4 nm field), so that a size effect compares two populations, not one; the held-out test
    # images show the defocus series' 1.5-2.5 nm, a population with large particles that the
    # size-biased transfer set (small only) lacks
    small_radius_nm=(1.0, 1.5),
    large_radius_nm=(1.8, 2.3),
    # a heavy (CdSe, wurtzite) and a light (Si, diamond) lattice whose fringes (3.3-3.7 Å and
    # 3.1 Å) the 1 Å pixels resolve; Cu {200} and C {220} would alias away (shared/README)
    lattices=("CdSe", "Si"),
    # companion study: 0.5-1.5 Å pixels (3.2-9.6 nm fields of 64 px; scenes of 9.6 nm), and
    # supports from none to thicker than the other series' 2-8 nm
    magnification_pixels_A=(0.5, 1.0, 1.5),
    substrate_thickness_nm=(0.0, 3.0, 9.0),
    # the experimental-like recordings: 8 to train on, the held-out study's transfer set (its
    # validation and test images in full); simulating 64 like a training domain's cost 112 of
    # the 1,056 multislice scenes, ~10 % of the simulation, for images nothing read
    measured=MeasuredImaging(n_train=8),
)

# GPU campaign (one H200, ≤ 8 minutes): the laptop's physics (6.4 nm field, 1 Å pixels, 64²),
# every defocus, dose and lattice of the study, 256 training images per domain, 3 phonons. The
# study's 640² images at 0.2 Å would cost ~100× more per model than the budget allows for ~11,000
# models; the sizes below are estimates from CPU measurements (no GPU has run them yet) and the
# campaign stops launching runs at its deadline, so a slower device leaves cells missing.
GPU_DATA = DataConfig(
    sim=SimulationConfig(field_nm=6.4, sampling_A=0.2, pixel_A=1.0, n_phonons=3),
    n_train=256,
    n_val=16,
    n_test=64,
    small_radius_nm=(1.0, 1.5),  # as the laptop's: apart from the large ones
    large_radius_nm=(1.8, 2.3),
    # the study's five doses as electrons per pixel at these 1 Å pixels (see LAPTOP_DATA)
    doses=(1.2, 3.0, 6.0, 12.0, 24.0),
    magnification_pixels_A=(0.5, 1.0, 1.5),
    substrate_thickness_nm=(0.0, 3.0, 9.0),
    measured=MeasuredImaging(n_train=32),  # the held-out study's transfer set (see LAPTOP_DATA)
)

SMOKE_DATA = DataConfig(
    sim=SimulationConfig(
        field_nm=3.2,
        sampling_A=0.2,
        pixel_A=1.0,
        n_phonons=1,
        carbon_thickness_nm=(1.0, 2.0),
        particles_per_image=(1, 2),
        particle_gap_nm=0.5,
    ),
    n_train=8,
    n_val=4,
    n_test=4,
    defoci_nm=(-10.0, 0.0, 10.0),
    doses=(75.0, 600.0),
    lattices=("CdSe", "Cu"),
    series_radius_nm=(0.7, 1.0),
    small_radius_nm=(0.6, 0.8),
    large_radius_nm=(0.9, 1.1),
    magnification_pixels_A=(0.5, 1.0),
    substrate_thickness_nm=(0.0, 2.0),
)

# --- models ------------------------------------------------------------------------------
PAPER_MODEL = ModelConfig()  # smp Unet('resnet18'): 14,322,082 parameters
# timm ResNet18 at 1/4 width with a 1/4-width decoder: 920,722 parameters (encoder 710,944).
# On one core at 64², channels_last: ~200 img/s training (batch 16), ~750 img/s evaluation.
NARROW_MODEL = ModelConfig(
    encoder="tu-resnet18",
    decoder_channels=(64, 32, 16, 16, 8),
    encoder_channels=(16, 32, 64, 128),
)

# --- training stages -----------------------------------------------------------------------
# Every stage trains to a plateau of its in-domain validation loss (train.py) and keeps its
# best epoch. Paper: the published recipe (Adam, ×0.99 per epoch, batch 16, D4) with that rule.
# Precision: the CPU profiles train and evaluate in fp32 with their kernels pinned to AVX2
# (StageConfig.cpu_isa; config.CPU_ISAS says why): the same numbers on every x86 CPU with AVX2.
# bf16 autocast is fast only where the CPU has bf16 units (AVX512-BF16, AMX); elsewhere oneDNN
# emulates it, measured 96× slower for a 3×3 convolution and 9× slower for the laptop U-Net on
# an AVX2 EPYC (shared/README). bf16 is therefore the gpu profile's and an opt-in on the CPU:
# the "-bf16" variants below, refused on a CPU without native bf16 (train.check_precision).
PAPER_STAGE = StageConfig(
    max_epochs=30, batch_size=16, lr_decay=0.99, augment="d4", patience=3, min_delta=0.01,
    min_epochs=3, cpu_isa="avx2",
)  # fmt: skip
# Laptop (measured on 2-core CPUs, see README "Performance"; the budget: `make book` in 20 minutes
# on two AVX2 cores in fp32). An epoch is the unit of the stopping rule, so it should hold a similar
# number of optimiser steps in every stage: from scratch (64 images) every image once in a random D4
# orientation (4 steps of 16); transfer (4-16 images) all 8 orientations in batches of 8 (4-16
# steps). Transfer epochs of 4 of the 8 orientations (6 transfers of 16 images, AVX2) took 45 % less
# time but kept a 4.5 % higher validation loss on average (−1 % to +12 %): not taken. BatchNorm
# statistics are recalibrated before every evaluation (StageConfig.recalibrate_bn): with the running
# estimates, a pretraining's validation loss rose to 1-2.6 in its first epochs while its training
# loss fell, and came down after epoch 7 — the earlier "sat at the class-prior loss" of 1
# pretraining in 5 was this lag. Recalibrated, the in-domain loss falls from the first epoch (10 of
# 10 pretrainings) and the kept models' loss is 5 % lower; the plateau rule starts at epoch 3. The
# statistics come from the first 32 of the 64 training images (recalibrate_images): on 6 fp32
# pretrainings (3 defoci × 2 seeds, AVX2) the kept in-domain validation loss moved by −9 % to +2 %
# (mean −1 %) against all 64, the kept epoch was the same in 4 of 6, and the recalibration pass was
# 20 % of a pretraining epoch's time (136 of 678 ms) with 64 — a choice made on the validation loss
# and the time only. The learning rate from scratch is 3e-3 (the studies' grids below): against
# 1e-3, 17 fp32 pretrainings over defocus, dose and structure reached a 6 % lower in-domain
# validation loss (Dice within 0.001) in 26 % less time — a choice made on the in-domain validation
# loss and the time only, before any cross-domain result. Validation: 16 images of the domains a
# stage trains on (the stopping rule reads them) and 4 of every other domain (the first 4 of those
# 16: the curves off the domain, which no selection and no finding reads; 8 until the fresh AVX2
# build of 3f85ed2 took 20 min 44 s, when evaluation was 27 % of the runs' time and the off-domain
# images 60-70 % of each epoch's). The kept model is then scored on all 16 test images of every
# domain (DataConfig.n_test), the same images before and after a transfer, so "before" and "after"
# compare like with like.
LAPTOP_STAGE = StageConfig(
    max_epochs=40, batch_size=16, augment="d4-random", n_eval=16, n_eval_ood=4, patience=3,
    min_delta=0.01, min_epochs=3, recalibrate_bn=True, recalibrate_images=32, cpu_isa="avx2",
)  # fmt: skip
# Transfer starts from a trained model and settles within a few epochs (with patience 3: median
# kept epoch 3 of 6 run, over 396 laptop transfers), and an epoch of 16 images in all 8
# orientations is 16 steps, four times a pretraining's: patience 1. The stopping rule replayed on
# the in-domain validation curves of the 186 transfers of the fresh AVX2 build of a355eb8
# (patience 2): 26 % fewer epochs (986 of 1,328) and time (715 of 970 worker-s, 44 % of all
# training time was transfer); the kept epoch the same in 138 of 186, and the kept validation
# loss 0.84 % higher on average (at most 10.3 %) — against a seed-to-seed spread of ~14 %; a
# choice made on the validation loss and the time only. A pretraining (patience 3, 64 images in
# 4 steps per epoch) would keep another epoch in 25 of 60 with patience 2, its kept loss 13 %
# higher there: not taken.
LAPTOP_TRANSFER = StageConfig(
    max_epochs=30, batch_size=8, augment="d4", n_eval=16, n_eval_ood=4, patience=1,
    min_delta=0.01, recalibrate_bn=True, cpu_isa="avx2",
)  # fmt: skip
# GPU: the laptop's stopping rules; batches of 16 and all validation images (the stacked engine
# evaluates every model of a stack on one shared pass, so fewer images would save little)
GPU_STAGE = replace(
    LAPTOP_STAGE, n_eval=None, n_eval_ood=None, precision="bf16", recalibrate_images=None,
    cpu_isa=None,
)  # fmt: skip
GPU_TRANSFER = replace(
    LAPTOP_TRANSFER, batch_size=16, n_eval=None, n_eval_ood=None, precision="bf16", cpu_isa=None
)

# smoke: two fixed epochs, enough to exercise every code path in seconds
# (no BatchNorm recalibration: from 4-8 untrained images its statistics are so ill-conditioned
# that float rounding between the stacked and the plain engine moves a loss by ~8 %; the engines
# agree on it in tests/test_stacked.py)
SMOKE_STAGE = StageConfig(max_epochs=2, batch_size=4, augment="none", cpu_isa="avx2")

PROFILES: dict[str, Profile] = {
    "paper": Profile(
        name="paper",
        description="The published settings: 12.8 nm field, 0.1 Å multislice, 8 phonons, "
        "ResNet18 U-Net, batch 16, D4 augmentation; every stage trained to a plateau of its "
        "in-domain validation loss (patience 3, at most 30 epochs; the study ran 10 epochs).",
        data=PAPER_DATA,
        model=PAPER_MODEL,
        stage=PAPER_STAGE,
        n_pretrain=512,
    ),
    "laptop": Profile(
        name="laptop",
        description="Every study end to end on a 2-core CPU in about 20 minutes, converged: "
        "6.4 nm field, 1 Å pixels, one phonon, a 0.9 M-parameter U-Net in fp32, 64 images "
        "per pretraining, 3 seeds, every stage to a plateau of its in-domain validation loss and "
        "scored on test images apart.",
        data=LAPTOP_DATA,
        model=NARROW_MODEL,
        stage=LAPTOP_STAGE,
        transfer_stage=LAPTOP_TRANSFER,
        n_pretrain=64,
        studies={
            # Chosen for what the findings need (chapters/11_findings.md), never for outcomes:
            # in-focus and both sides of focus as pretraining and target (findings 1, 2, 7),
            # three transfer sizes (4), all freezing options (3). One learning-rate pair: no
            # finding reads the learning-rate axis, and the second pair doubled the grid (the
            # fp32 sweep on two AVX2 cores took 35 min with it); the gpu profile has the
            # study's four pairs. The pair is 3e-3 / 3e-4: transfer at a tenth of the
            # pretraining rate, as in the study's baseline (1e-4 / 1e-5). Against 1e-4, six
            # structure transfers from 3e-3 pretrainings (each run at both rates) reached an
            # equal or lower target validation loss in 37 % less time; 1e-5 needs more epochs
            # than the cap (a trial: still improving after 60).
            # Transfer sizes 4 and 16: 1/16 and 1/4 of a pretraining (the study: 1/8-1); a
            # third size (8) cost 1.5 min of the 20-minute budget on two AVX2 cores, and
            # finding 4 compares sizes, which two do.
            # 6 pairs × 2 N × 3 freeze × 3 seeds = 108 runs on 9 pretrainings.
            "defocus": {
                "pretrain_domain": (-10.0, 0.0, 10.0),
                "target_domain": (-10.0, 0.0, 10.0),
                "n_transfer": (4, 16),
                "pretrain_lr": (3e-3,),
                "transfer_lr": (3e-4,),
                "seed": (0, 1, 2),
            },
            # mixtures of 64 images whose count of b images equals a transfer size (4, 16):
            # the mixture-versus-transfer comparison (finding 6); 12 models
            "baseline": {
                "domain_a": (-10.0,),
                "domain_b": (0.0, 10.0),
                "mix": ("60:4", "48:16"),
                "lr": (3e-3,),
                "seed": (0, 1, 2),
            },
            # 3 doses, every ordered pair (finding 5): 18 runs on 9 pretrainings
            "dose": {
                "pretrain_domain": (1.2, 6.0, 24.0),
                "target_domain": (1.2, 6.0, 24.0),
                "freeze": ("none",),
                "seed": (0, 1, 2),
                "pretrain_lr": 3e-3,
                "transfer_lr": 3e-4,
                "n_transfer": 16,
            },
            # a heavy and a light lattice in both sizes (finding 8): 36 runs on 12 pretrainings
            "structure": {
                "pretrain_domain": ("CdSe-small", "CdSe-large", "Si-small", "Si-large"),
                "target_domain": ("CdSe-small", "CdSe-large", "Si-small", "Si-large"),
                "freeze": ("none",),
                "seed": (0, 1, 2),
                "pretrain_lr": 3e-3,
                "transfer_lr": 3e-4,
                "n_transfer": 16,
            },
            # companion study (no transfer): every domain of the dose and structure series and
            # the defocus study's three pretraining defoci are the pretrainings above (read
            # again, not retrained); magnification and substrate train 9 models each
            **{
                f"generalization-{series}": {"pretrain_lr": 3e-3, "seed": (0, 1, 2)}
                for series in GENERALIZATION_SERIES
            },
            "generalization-defocus": {
                "train_domain": (-10.0, 0.0, 10.0),
                "pretrain_lr": 3e-3,
                "seed": (0, 1, 2),
            },
            # synthetic → experimental-like (companion study): 4 variants × 3 seeds trained
            # from scratch, each transferred on 8 experimental-like images, unbiased or small
            # particles only: 24 transfers on 12 pretrainings; no new scenes (borrowed)
            "heldout": {
                "seed": (0, 1, 2),
                "pretrain_lr": 3e-3,
                "transfer_lr": 3e-4,
                "n_transfer": 8,
            },
        },
    ),
    "gpu": Profile(
        name="gpu",
        description="The study's every axis on one GPU in minutes: 6.4 nm field, 1 Å pixels, "
        "3 phonons, 256 images per domain, the narrow U-Net in stacks of up to 64 models "
        "(bf16), trained to a plateau; all 11 target and 5 pretraining defoci, transfer sizes "
        "16-128, 3 freezing options, the study's 4 learning-rate pairs, 5 doses, 9 lattices × "
        "2 sizes, 3 seeds. Sizes chosen from CPU measurements; `hrtem-book campaign` runs it.",
        data=GPU_DATA,
        model=NARROW_MODEL,
        stage=GPU_STAGE,
        transfer_stage=GPU_TRANSFER,
        n_pretrain=256,
        studies={
            # the paper's axes (studies.paper_values) except the transfer sizes, scaled with
            # the 256 pretraining images as the study's 64-512 with its 512
            "defocus": {"n_transfer": (16, 32, 64, 128)},
            "baseline": {"mix": ("64:192", "128:128", "192:64")},
            "dose": {"pretrain_lr": 1e-3, "transfer_lr": 1e-4, "n_transfer": 64},
            "structure": {"pretrain_lr": 1e-3, "transfer_lr": 1e-4, "n_transfer": 64},
            # companion study: every domain of every series, 3 seeds
            **{f"generalization-{s}": {"pretrain_lr": 1e-3} for s in GENERALIZATION_SERIES},
            "heldout": {"pretrain_lr": 1e-3, "transfer_lr": 1e-4, "n_transfer": 32},
        },
    ),
    "smoke": Profile(
        name="smoke",
        description="Seconds-scale settings for the tests.",
        data=SMOKE_DATA,
        model=NARROW_MODEL,
        stage=SMOKE_STAGE,
        n_pretrain=8,
        studies={
            "defocus": {
                "pretrain_domain": (-10.0,),
                "target_domain": (0.0, 10.0),
                "n_transfer": (4,),
                "pretrain_lr": (1e-3,),
                "transfer_lr": (1e-4,),
                "freeze": ("none", "encoder"),
                "seed": (0,),
            },
            "baseline": {
                "domain_a": (-10.0,),
                "domain_b": (10.0,),
                "mix": ("4:4",),
                "lr": (1e-3,),
                "seed": (0,),
            },
            "dose": {
                "pretrain_domain": (75.0,),
                "target_domain": (600.0,),
                "freeze": ("none",),
                "seed": (0,),
                "pretrain_lr": 1e-3,
                "transfer_lr": 1e-4,
                "n_transfer": 4,
            },
            "structure": {
                "pretrain_domain": ("CdSe-small",),
                "target_domain": ("Cu-small",),
                "freeze": ("none",),
                "seed": (0,),
                "pretrain_lr": 1e-3,
                "transfer_lr": 1e-4,
                "n_transfer": 4,
            },
            **{
                f"generalization-{s}": {"pretrain_lr": 1e-3, "seed": (0,)}
                for s in GENERALIZATION_SERIES
            },
            "heldout": {
                "pretrain_domain": ("varied", "small"),
                "seed": (0,),
                "pretrain_lr": 1e-3,
                "transfer_lr": 1e-4,
                "n_transfer": 4,
            },
        },
    ),
}


def with_precision(profile: Profile, precision: str) -> Profile:
    """``profile`` with every training stage in ``precision``, named ``<name>-<precision>``: a
    variant that reads the same simulated data and keeps its results apart (its runs hash
    differently: precision is part of every stage config). Its kernels are the CPU's own
    (``cpu_isa=None``): bf16 needs the CPU's bf16 units."""
    stage = replace(profile.stage, precision=precision, cpu_isa=None)
    transfer = replace(profile.transfer, precision=precision, cpu_isa=None)
    return replace(
        profile,
        name=f"{profile.name}-{precision}",
        description=f"{profile.description} Variant: every stage in {precision} autocast (only "
        "where the device computes it natively: a GPU, or a CPU with AVX512-BF16 or AMX).",
        stage=stage,
        transfer_stage=transfer if profile.transfer_stage is not None else None,
        base=profile.name,
    )


# the opt-in to bf16 on CPUs with native bf16 units: smoke-bf16, laptop-bf16, paper-bf16
PROFILES.update(
    {v.name: v for v in (with_precision(PROFILES[n], "bf16") for n in ("smoke", "laptop", "paper"))}
)
# the named presets themselves, without their precision variants
BASE_PROFILES = tuple(name for name, p in PROFILES.items() if p.base is None)


def get_profile(name: str) -> Profile:
    """The named profile, or a clear error listing the allowed names."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; allowed: {', '.join(PROFILES)}") from None
