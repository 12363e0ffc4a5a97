"""Named presets of the frozen configs: ``smoke`` (tests), ``laptop`` (a 2-core CPU), ``paper``.

A profile is data. Code receives the configs it holds and never asks for a profile's name.
Each block below is owned by one stage of the pipeline; the values of ``laptop`` are sized from
measurements on a 2-core machine (see README, "Performance").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .config import DataConfig, ModelConfig, SimulationConfig, StageConfig


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    data: DataConfig
    model: ModelConfig
    stage: StageConfig
    n_pretrain: int  # images of the pretraining domain
    # study name -> axis name -> values; shrinks the paper grids (see hrtem_book.studies)
    studies: dict = field(default_factory=dict)


# --- simulation and datasets -------------------------------------------------------------
PAPER_DATA = DataConfig()

LAPTOP_DATA = DataConfig(
    sim=SimulationConfig(field_nm=6.4, sampling_A=0.2, pixel_A=1.0, n_phonons=1),
    n_train=64,
    n_val=16,
    large_radius_nm=(1.8, 2.3),  # "large" scaled to the 6.4 nm field
    # three of the nine lattices (those of the laptop structure study + a light one): all nine
    # take ~10 min of one core (0.4 s per scene × 1440 scenes); these three ~3 min
    lattices=("CdSe", "Cu", "C"),
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
    defoci_nm=(-10.0, 0.0, 10.0),
    doses=(75.0, 600.0),
    lattices=("CdSe", "Cu"),
    series_radius_nm=(0.7, 1.0),
    small_radius_nm=(0.6, 0.8),
    large_radius_nm=(0.9, 1.1),
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
PAPER_STAGE = StageConfig(epochs=10, batch_size=16, lr_decay=0.99, augment_d4=True)
# Laptop: training is step-limited (64 images per domain), so small batches (more Adam steps
# for the same images, ~1.5× CPU time per image) and no D4 (8× the cost). With 4 epochs the
# 64-image pretraining reaches a validation loss of ~0.22 (0.31 after 3 epochs, 0.57 after 2);
# a transfer run costs ~1 s (16 images) to ~2.8 s (64 images) of one core, 8 validation images
# per domain and epoch included (benchmarks/bench_train.py).
LAPTOP_STAGE = StageConfig(epochs=4, batch_size=4, augment_d4=False, n_eval=8)
SMOKE_STAGE = StageConfig(epochs=2, batch_size=4, augment_d4=False)

PROFILES: dict[str, Profile] = {
    "paper": Profile(
        name="paper",
        description="The published settings: 12.8 nm field, 0.1 Å multislice, 8 phonons, "
        "ResNet18 U-Net, 10 epochs with D4 augmentation.",
        data=PAPER_DATA,
        model=PAPER_MODEL,
        stage=PAPER_STAGE,
        n_pretrain=512,
    ),
    "laptop": Profile(
        name="laptop",
        description="Every study end to end on a 2-core CPU in about 20 minutes: 6.4 nm field, "
        "1 Å pixels, one phonon, a 0.9 M-parameter U-Net.",
        data=LAPTOP_DATA,
        model=NARROW_MODEL,
        stage=LAPTOP_STAGE,
        n_pretrain=64,
        studies={
            # Sized by benchmarks/bench_sweep.py (README, "Performance"): all four studies with
            # their simulation take ~10 min on this 2-core machine (goal: 20 min).
            # 8 (pretrain, target) pairs × 2 N × 3 freeze × 2 seeds = 96 runs on 4 pretrainings;
            # every run is evaluated on all 11 defoci (eval_domain)
            "defocus": {
                "pretrain_domain": (-10.0, 10.0),
                "target_domain": (-20.0, -10.0, 0.0, 10.0, 20.0),
                "n_transfer": (16, 64),
                "pretrain_lr": (1e-3,),
                "transfer_lr": (1e-4,),
                "seed": (0, 1),
            },
            # 48 cells, 42 distinct mixtures ((-10, 10) and (10, -10) mirror each other)
            "baseline": {
                "domain_a": (-10.0, 10.0),
                "domain_b": (-20.0, -10.0, 0.0, 10.0, 20.0),
                "mix": ("16:48", "32:32", "48:16"),
                "lr": (1e-3,),
                "seed": (0, 1),
            },
            "dose": {
                "pretrain_domain": (30.0, 150.0, 600.0),
                "target_domain": (30.0, 150.0, 600.0),
                "seed": (0, 1),
                "pretrain_lr": 1e-3,
                "transfer_lr": 1e-4,
                "n_transfer": 32,
            },
            "structure": {
                "pretrain_domain": ("CdSe-small", "CdSe-large", "Cu-small"),
                "target_domain": ("CdSe-small", "CdSe-large", "Cu-small"),
                "seed": (0, 1),
                "pretrain_lr": 1e-3,
                "transfer_lr": 1e-4,
                "n_transfer": 32,
            },
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
        },
    ),
}


def get_profile(name: str) -> Profile:
    """The named profile, or a clear error listing the allowed names."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; allowed: {', '.join(PROFILES)}") from None


def with_data(profile: Profile, **changes) -> Profile:
    """A copy of ``profile`` with DataConfig fields changed (for experiments and tests)."""
    return replace(profile, data=replace(profile.data, **changes))
