"""Frozen configuration dataclasses and their stable hashes.

Every artifact of the pipeline (a dataset, a checkpoint, a result record) is produced from one
frozen config. Its identity is ``config_hash(cfg)``: sha256 of a canonical JSON rendering (sorted
keys, no whitespace, floats by ``repr``), never Python's ``hash()``, so ids are stable across
processes, machines and Python versions.

Profiles (``smoke``, ``laptop``, ``paper``, ...) are named presets of these configs and live in
:mod:`hrtem_book.profiles`; code never branches on a profile's name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .series import Domain, get_series, normalize_domain

HASH_LENGTH = 16  # hex characters of sha256 used in run ids and file names


def to_jsonable(obj: Any) -> Any:
    """Plain JSON-compatible structure of a (nested) config; tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(
                f"config value {obj!r} is not finite; configs hold finite numbers only"
            )
        return obj
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    raise TypeError(f"cannot serialise {type(obj).__name__} value {obj!r} in a config")


def stable_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, compact separators; identical for equal configs."""
    return json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_hash(obj: Any, length: int = HASH_LENGTH) -> str:
    """Stable content hash (sha256 hex prefix) of a config."""
    return hashlib.sha256(stable_json(obj).encode()).hexdigest()[:length]


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r} is not allowed: it must be {bound}")


def _check_range(name: str, value: tuple[float, float]) -> None:
    """A (lo, hi) range of thicknesses drawn uniformly: 0 <= lo <= hi."""
    lo, hi = value
    if not 0 <= lo <= hi:
        raise ValueError(f"{name}={value} must satisfy 0 <= lo <= hi")


# seconds of a GPU campaign's budget kept for collecting and the benchmark (hrtem_book.campaign)
CAMPAIGN_RESERVE_S = 60.0
DEVICE_NAMES = "cpu, cuda, cuda:N"


def check_device_name(device: str) -> str:
    """``device`` if it names a torch device this package trains on (``cpu``, ``cuda``,
    ``cuda:N``), else a one-line ValueError; whether the machine has it is
    :func:`hrtem_book.simulate.check_device`'s question."""
    kind, colon, index = str(device).partition(":")
    if kind in ("cpu", "cuda") and (not colon or index.isdigit()):
        return device
    raise ValueError(f"--device {device!r} is not a device; allowed: {DEVICE_NAMES}")


MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit integer


def _check_seed(seed: int) -> None:
    # replicate seeds are labels of a grid axis and seed torch and numpy generators: whole,
    # non-negative numbers (numpy's SeedSequence refuses negative ones) that torch can take
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed!r} is not allowed: it must be an integer in 0..{MAX_SEED}")


@dataclass(frozen=True)
class SimulationConfig:
    """Physics of one simulated image; shared by every series of a profile.

    Lengths carry their unit in the name (``_A`` Ångström, ``_nm`` nanometre).
    """

    field_nm: float = 12.8  # side of the square field of view [nm]
    sampling_A: float = 0.1  # multislice grid sampling [Å]
    pixel_A: float = 0.2  # output image pixel size after downsampling [Å]
    slice_thickness_A: float = 2.0  # multislice slice thickness [Å]
    energy_eV: float = 300e3  # beam energy [eV]
    n_phonons: int = 8  # frozen phonon configurations averaged per image
    phonon_sigma_A: float = 0.1  # rms thermal displacement per Cartesian axis [Å]
    parametrization: str = "lobato"  # projected potential parametrization (Lobato & Van Dyck 2014)
    carbon_thickness_nm: tuple[float, float] = (2.0, 8.0)  # amorphous carbon support, uniform [nm]
    carbon_density_g_cm3: float = 2.0  # amorphous carbon mass density [g/cm³]
    carbon_min_distance_A: float = 1.2  # minimum C–C distance of the random packing [Å]
    # a contamination layer over the whole specimen, thickness uniform in this range [nm]; (0, 0):
    # none (every training series). Amorphous carbon at carbon_density_g_cm3 over the highest
    # particle (structures.build_scene; hydrogen, a weak scatterer, is left out)
    contamination_nm: tuple[float, float] = (0.0, 0.0)
    particles_per_image: tuple[int, int] = (1, 5)  # inclusive range of particles per image
    particle_gap_nm: float = 1.0  # minimum surface-to-surface distance between particles [nm]
    max_stacking_faults: int = 2  # wurtzite particles carry 0..max faults
    cs_A: float = -1.5e5  # spherical aberration C_s [Å] (−15 µm, aberration-corrected)
    focal_spread_A: float = 10.0  # focal spread (1/e half-width of the defocus envelope) [Å]
    defocus_jitter_nm: float = 1.5  # σ of the per-image random defocus offset [nm]
    label_phase_threshold_rad: float = math.pi / 16  # exit-wave phase threshold of the mask [rad]

    def __post_init__(self) -> None:
        for name in ("field_nm", "sampling_A", "pixel_A", "slice_thickness_A", "energy_eV"):
            _check_positive(name, getattr(self, name))
        _check_positive("focal_spread_A", self.focal_spread_A, allow_zero=True)
        _check_positive("defocus_jitter_nm", self.defocus_jitter_nm, allow_zero=True)
        if self.n_phonons < 1:
            raise ValueError(f"n_phonons={self.n_phonons} is not allowed: it must be >= 1")
        if self.pixel_A < self.sampling_A:
            raise ValueError(
                f"pixel_A={self.pixel_A} is finer than sampling_A={self.sampling_A}; "
                "output pixels must be at least the simulation sampling"
            )
        if self.sampling_A > 0.25:
            raise ValueError(
                f"sampling_A={self.sampling_A} Å is too coarse for HRTEM of crystals: "
                "allowed is <= 0.25 Å (images at 0.4 Å correlate only ~0.5 with a 0.05 Å reference)"
            )
        for name in ("carbon_thickness_nm", "contamination_nm"):
            _check_range(name, getattr(self, name))
        lo, hi = self.particles_per_image
        if not 1 <= lo <= hi:
            raise ValueError(
                f"particles_per_image={self.particles_per_image} must be 1 <= lo <= hi"
            )

    @property
    def gpts(self) -> int:
        """Simulation grid points per side."""
        return int(round(self.field_nm * 10 / self.sampling_A))

    @property
    def image_px(self) -> int:
        """Output image pixels per side."""
        return int(round(self.field_nm * 10 / self.pixel_A))


@dataclass(frozen=True)
class MeasuredImaging:
    """How a simulated "experimental-like" image departs from the training simulations.

    We cannot ship measured images, so the held-out domains of the ``heldout`` series are
    simulations of a specimen and a recording unlike the training simulations'. This is an
    approximation with round, plausible values, not a model of any one instrument or specimen:

    * the specimen: scenes of their own (a seed stream no training series draws from), CdSe
      particles with radii from the structure series' smallest to the defocus series' largest
      (a population no training variant has), on a support of ``support_nm`` [nm] of amorphous
      carbon (uniform; the training series: 2-8 nm on the laptop), under a contamination layer
      of ``contamination_nm`` [nm] (uniform) — the hydrocarbon a specimen collects in the
      microscope, modelled as amorphous carbon at the support's density (hydrogen, a weak
      scatterer, left out; build-up rates of order a nanometre per minute without cleaning:
      R. F. Egerton, P. Li & M. Malac, Micron 35, 399 (2004));
    * the focus: each image at the nominal defocus plus a uniform offset of up to
      ± ``defocus_range_nm`` [nm], on top of every series' jitter (focusing by eye on a thin
      edge leaves an offset of a few nm that no label records);
    * specimen tilt is not added: every series already orients each particle uniformly at random
      (:func:`hrtem_book.structures.make_particle`) and the support is amorphous, so a tilt of a
      few degrees changes no distribution the network sees (the support's projected thickness
      grows by 1/cos θ, 0.14 % at 3°);

    * the lens: another spherical aberration ``cs_A`` [Å] (a corrector tuned elsewhere) and a
      residual two-fold astigmatism of magnitude ``astigmatism_A`` [Å] at ``astigmatism_angle_deg``
      (aberration phase π λ q² |A1| cos 2(φ − φ_A), the C12 term of abTEM's polar aberrations);
    * specimen drift of ``drift_A`` [Å] along ``drift_angle_deg`` during the exposure: the
      intensity is averaged along that line (transfer sinc(L q·u), a linear motion blur);
    * a residual background: a smooth additive intensity of ``background_fraction`` of the
      vacuum beam with a random linear gradient of up to ± ``background_gradient`` of it across
      the field (e.g. thicker contamination on one side), drawn per image, before the shot noise;
    * the detector: every electron deposits a gamma-distributed signal of mean 1 and shape
      ``gain_shape`` (DQE(0) = k/(k+1): 0.67 at k = 2), the signal is spread by a Gaussian
      point-spread function whose MTF at the pixel Nyquist frequency is ``mtf_at_nyquist``, and
      read noise of ``read_noise_e`` electrons rms is added per pixel. Scintillator-coupled
      cameras have MTF(Nyquist) of order 0.1-0.3 and DQE(0) of 0.5-0.8 at 300 kV; counting
      direct detectors do better (McMullan et al., Ultramicroscopy 109, 1144 (2009);
      Ruskin, Yu & Grigorieff, J. Struct. Biol. 184, 385 (2013)).
    """

    cs_A: float = 5.0e4  # spherical aberration C_s [Å] (+5 µm; the training images: -15 µm)
    astigmatism_A: float = 20.0  # two-fold astigmatism |A1| [Å]
    astigmatism_angle_deg: float = 30.0
    drift_A: float = 1.0  # specimen drift during the exposure [Å]
    drift_angle_deg: float = 60.0
    background_fraction: float = 0.1  # mean additive background [fraction of the vacuum beam]
    background_gradient: float = 0.5  # largest relative gradient of it across the field
    gain_shape: float = 2.0  # shape k of the per-electron gamma gain (mean 1, variance 1/k)
    mtf_at_nyquist: float = 0.3  # detector MTF at the output pixel's Nyquist frequency
    read_noise_e: float = 0.5  # read noise [electrons rms per pixel]
    support_nm: tuple[float, float] = (1.0, 3.0)  # amorphous carbon support, uniform [nm]
    contamination_nm: tuple[float, float] = (0.5, 1.5)  # contamination layer, uniform [nm]
    defocus_range_nm: float = 3.0  # largest unrecorded focus offset, uniform ± [nm]
    # recordings of the training split per experimental-like domain (None: DataConfig.n_train).
    # A measured set is a few images, and only transfers train on them: the profiles simulate
    # as many as their largest transfer set (their validation and test images in full)
    n_train: int | None = None

    def __post_init__(self) -> None:
        if self.n_train is not None and self.n_train < 1:
            raise ValueError(f"n_train={self.n_train} is not allowed: None or >= 1")
        for name in (
            "astigmatism_A", "drift_A", "background_fraction", "read_noise_e", "defocus_range_nm"
        ):  # fmt: skip
            _check_positive(name, getattr(self, name), allow_zero=True)
        for name in ("support_nm", "contamination_nm"):
            _check_range(name, getattr(self, name))
        _check_positive("gain_shape", self.gain_shape)
        if not 0 < self.mtf_at_nyquist <= 1:
            raise ValueError(
                f"mtf_at_nyquist={self.mtf_at_nyquist} is not allowed: it must be in (0, 1]"
            )
        if not 0 <= self.background_gradient <= 1:
            raise ValueError(
                f"background_gradient={self.background_gradient} is not allowed: it must be "
                "in [0, 1] (the background stays positive)"
            )


@dataclass(frozen=True)
class DataConfig:
    """Which images a profile generates: sizes of the three dataset series.

    Domain values: defocus [nm] (negative = overfocus in our sign convention, see
    :mod:`hrtem_book.simulate`), dose [e⁻/Å²], structure names ``"<lattice>-<small|large>"``,
    output pixel size [Å] (magnification), amorphous carbon support thickness [nm] (substrate).
    """

    sim: SimulationConfig = field(default_factory=SimulationConfig)
    n_train: int = 512  # training images per domain
    n_val: int = 128  # validation images per domain: the plateau rule and the kept epoch
    n_test: int = 128  # test images per domain: scoring only, never read by any selection
    defoci_nm: tuple[float, ...] = tuple(float(d) for d in range(-25, 30, 5))
    defocus_series_dose: float = 400.0  # [e⁻/Å²]
    doses: tuple[float, ...] = (30.0, 75.0, 150.0, 300.0, 600.0)  # [e⁻/Å²]
    dose_series_defocus_nm: float = -10.0
    lattices: tuple[str, ...] = (
        "ZnS",
        "CdSe",
        "Cu",
        "Ag",
        "C",
        "Si",
        "Fe3O4",
        "Co3O4",
        "Fe",
    )
    sizes: tuple[str, ...] = ("small", "large")
    series_radius_nm: tuple[float, float] = (1.5, 2.5)  # CdSe of the defocus/dose series [nm]
    small_radius_nm: tuple[float, float] = (1.0, 2.0)  # structure series, "small" [nm]
    large_radius_nm: tuple[float, float] = (2.5, 3.5)  # structure series, "large" [nm]
    structure_series_defocus_nm: float = -10.0
    structure_series_dose: float = 300.0  # [e⁻/Å²]
    # companion study (Sytwu et al.): CdSe scenes at the structure series' defocus and dose, seen
    # at several output pixel sizes [Å] (the magnification series; each an integer multiple of
    # the smallest) and on amorphous carbon supports of several thicknesses [nm] (substrate)
    magnification_pixels_A: tuple[float, ...] = (0.1, 0.2, 0.3)
    substrate_thickness_nm: tuple[float, ...] = (0.0, 3.0, 9.0)
    # the held-out "experimental-like" domains of the heldout series (hrtem_book.series)
    measured: MeasuredImaging = field(default_factory=MeasuredImaging)
    seed: int = 0

    @property
    def split_sizes(self) -> dict[str, int]:
        """Images per domain of each split, in storage order: train, val, test."""
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}

    def domains(self, series: str) -> tuple[Domain, ...]:
        """Every domain of ``series`` in storage order: defoci [nm], doses [e⁻/Å²] or
        structure names ``"<lattice>-<size>"`` (see :mod:`hrtem_book.series`)."""
        return get_series(series).domains(self)

    def __post_init__(self) -> None:
        if min(self.n_train, self.n_val, self.n_test) < 1:
            raise ValueError(
                f"n_train={self.n_train}, n_val={self.n_val}, n_test={self.n_test}: "
                "each must be >= 1"
            )
        if self.measured.n_train is not None and self.measured.n_train > self.n_train:
            raise ValueError(
                f"measured.n_train={self.measured.n_train}; allowed: 1..n_train ({self.n_train})"
            )
        (s_lo, s_hi), (l_lo, l_hi) = self.small_radius_nm, self.large_radius_nm
        if not (0 < s_lo <= s_hi < l_lo <= l_hi):
            raise ValueError(
                f"small_radius_nm={self.small_radius_nm}, large_radius_nm="
                f"{self.large_radius_nm}: allowed are ranges with 0 < small ≤ … < large ≤ …, "
                "apart (a size effect needs two populations)"
            )
        for d in self.doses + (self.defocus_series_dose, self.structure_series_dose):
            if not d > 0:
                raise ValueError(f"dose {d!r} e⁻/Å² is not allowed: doses must be > 0")
        for t in self.substrate_thickness_nm:
            if not t >= 0:
                raise ValueError(f"substrate thickness {t!r} nm is not allowed: it must be >= 0")
        if not self.magnification_pixels_A:
            raise ValueError("magnification_pixels_A is empty; allowed: one or more sizes > 0 [Å]")
        finest = min(self.magnification_pixels_A)
        for p in self.magnification_pixels_A:
            if not finest > 0 or abs(p / finest - round(p / finest)) > 1e-6:
                raise ValueError(
                    f"magnification pixel {p!r} Å is not allowed: pixel sizes must be > 0 and "
                    f"whole multiples of the smallest ({finest} Å)"
                )


@dataclass(frozen=True)
class ModelConfig:
    """A U-Net of the segmentation-models-pytorch family.

    ``encoder="resnet18"`` is smp's own ResNet18 (14.32 M parameters with the default decoder);
    ``"tu-resnet18"`` is timm's, which accepts ``encoder_channels`` to build a narrower member.
    """

    encoder: str = "resnet18"
    encoder_depth: int = 5
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    encoder_channels: tuple[int, ...] | None = None  # timm ResNet stage widths (tu- only)
    in_channels: int = 1
    classes: int = 2


AUGMENTATIONS = ("none", "d4", "d4-random")
PRECISIONS = ("fp32", "bf16")
# The CPU kernels a stage may be pinned to, and the environment variables that pin them: torch's
# own vectorised kernels read ATEN_CPU_CAPABILITY, oneDNN's (convolutions) ONEDNN_MAX_CPU_ISA, each
# once, when torch first uses them. fp32 is not enough for the same numbers on every x86 CPU: the
# laptop build in fp32 with AVX-512 kernels (an AVX512-BF16 EPYC) and with AVX2 kernels (an AVX2
# EPYC) differed in the second digit of its stated numbers and in 2 of 34 verdicts; with these two
# variables set to AVX2, the AVX-512 machine reproduced the AVX2 machine's numbers, every stated
# number and verdict alike (README, "Performance").
CPU_ISAS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
CPU_ISA_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


@dataclass(frozen=True)
class StageConfig:
    """One training stage (pretraining, transfer, or a mixture baseline) and its stopping rule.

    The stage trains until its in-domain validation loss (the loss on the domain(s) it trains
    on) has not improved by a relative ``min_delta`` for ``patience`` epochs, or for
    ``max_epochs`` epochs; it then keeps the weights of its best epoch. The rule applies from
    epoch ``min_epochs`` on: a network trained from scratch can sit at the loss of the class
    prior for a few epochs before it starts to learn, a plateau that is not convergence.
    ``patience=None`` trains exactly ``max_epochs`` epochs (and still keeps the best epoch).

    ``augment``: ``"d4"`` shows every image in all 8 dihedral orientations per epoch (the paper's
    D4 augmentation; an epoch is 8 passes), ``"d4-random"`` one random orientation per image and
    epoch (an epoch is one pass), ``"none"`` the images as they are. ``precision``: ``"bf16"``
    runs forward and backward passes under bfloat16 autocast (the loss is computed in float32),
    ``"fp32"`` in float32 throughout. ``cpu_isa``: on a CPU, the instruction set the kernels are
    pinned to (a key of :data:`CPU_ISAS`: ``"avx2"``), so that every x86 CPU computes the same
    numbers; None computes with the CPU's best kernels (as a GPU, or bf16, needs).

    ``recalibrate_bn``: before every evaluation, the population statistics of the BatchNorm
    layers the stage trains are recomputed from its training images under the current weights
    ("precise BN", Wu & Johnson, *Rethinking "Batch" in BatchNorm*, arXiv:2105.07576, 2021).
    With momentum 0.1 and 4-16 steps per epoch, the running estimates lag the weights by tens of
    steps: a laptop pretraining's validation loss rose to 1-2.6 while its training loss fell to
    0.2, and came down only after epoch 7 — a lag of the evaluation, not of the learning. The
    training steps themselves do not read the running statistics, so only the evaluation (and
    with it the stopping rule and the kept model's statistics) changes. ``recalibrate_images``
    limits them to the first that many training images (a fixed, random draw of the domain's
    scenes), for stages with more images than the statistics need.
    """

    max_epochs: int = 10
    batch_size: int = 16
    lr_decay: float = 0.99  # multiplicative learning-rate decay per epoch
    augment: str = "d4"
    n_eval: int | None = None  # validation images per domain used for evaluation (None = all)
    # validation images on the domains the stage does not train on (None: n_eval); the in-domain
    # loss that decides when to stop always uses n_eval
    n_eval_ood: int | None = None
    patience: int | None = None  # epochs without improvement before stopping (None: never)
    min_delta: float = 0.0  # relative improvement of the in-domain loss that counts
    min_epochs: int = 1  # epochs before the plateau rule may stop the stage
    precision: str = "fp32"
    cpu_isa: str | None = None
    recalibrate_bn: bool = False  # exact BatchNorm statistics before every evaluation
    # the training images those statistics are computed from: the first this many (None: all)
    recalibrate_images: int | None = None

    def __post_init__(self) -> None:
        if self.max_epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"max_epochs={self.max_epochs}, batch_size={self.batch_size}: both must be >= 1"
            )
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment={self.augment!r}; allowed: {', '.join(AUGMENTATIONS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if self.cpu_isa is not None and self.cpu_isa not in CPU_ISAS:
            raise ValueError(f"cpu_isa={self.cpu_isa!r}; allowed: None, {', '.join(CPU_ISAS)}")
        if self.cpu_isa is not None and self.precision != "fp32":
            raise ValueError(
                f"cpu_isa={self.cpu_isa!r} with precision={self.precision!r}: bf16 needs the "
                "CPU's own bf16 kernels; allowed: cpu_isa=None with bf16, or precision='fp32'"
            )
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience={self.patience}; allowed: None or >= 1")
        if not 1 <= self.min_epochs <= self.max_epochs:
            raise ValueError(
                f"min_epochs={self.min_epochs}; allowed: 1..max_epochs ({self.max_epochs})"
            )
        if self.recalibrate_images is not None and self.recalibrate_images < 1:
            raise ValueError(f"recalibrate_images={self.recalibrate_images}; allowed: None or >= 1")
        if not 0 <= self.min_delta < 1:
            raise ValueError(f"min_delta={self.min_delta}; allowed: 0 <= min_delta < 1")

    @property
    def copies(self) -> int:
        """Samples per training image and epoch."""
        return 8 if self.augment == "d4" else 1


FREEZE_OPTIONS = ("none", "encoder", "decoder")


@dataclass(frozen=True)
class PretrainConfig:
    """Stage 1: train from scratch on ``n_train`` images of one domain."""

    # what every kind of run answers (class constants and properties: not fields, not hashed)
    kind: ClassVar[str] = "pretrain"
    stage_names: ClassVar[tuple[str, ...]] = ("pretrain",)  # the stages its record holds
    makes_checkpoint: ClassVar[bool] = True  # other runs load the model it keeps
    freeze: ClassVar[str] = "none"  # the part of the model its stage leaves unchanged
    data: DataConfig
    series: str
    domain: Domain
    lr: float
    seed: int
    model: ModelConfig
    stage: StageConfig
    n_train: int = 512

    def __post_init__(self) -> None:
        object.__setattr__(self, "domain", normalize_domain(self.series, self.domain))
        _check_positive("lr", self.lr)
        _check_seed(self.seed)

    @property
    def loads(self) -> PretrainConfig | None:
        """The pretraining whose checkpoint this run starts from (none: from scratch)."""
        return None

    @property
    def base(self) -> PretrainConfig | MixtureConfig:
        """The config that holds the run's series, data and model (itself, or its pretraining)."""
        return self

    @property
    def stages(self) -> tuple:
        """The runs that train, in order: the pretraining then the run for a transfer."""
        return (self,)

    @property
    def trained_domains(self) -> tuple:
        """Every domain a stage of the run trains on."""
        return (self.domain,)

    @property
    def monitored(self) -> tuple:
        """The domains whose validation loss stops the run and picks its kept epoch."""
        return (self.domain,)

    @property
    def n_images(self) -> int:
        """The training images of its (last) stage."""
        return self.n_train


@dataclass(frozen=True)
class TransferConfig:
    """Stage 2: continue a pretrained model on ``n_train`` images of another domain.

    The seed is the pretraining's, so every transfer run sharing (domain, lr, seed) of its
    pretraining reuses one checkpoint.
    """

    kind: ClassVar[str] = "transfer"
    stage_names: ClassVar[tuple[str, ...]] = ("pretrain", "transfer")
    makes_checkpoint: ClassVar[bool] = False
    pretrain: PretrainConfig
    domain: Domain
    n_train: int
    lr: float
    freeze: str
    stage: StageConfig

    def __post_init__(self) -> None:
        object.__setattr__(self, "domain", normalize_domain(self.pretrain.series, self.domain))
        _check_positive("lr", self.lr)
        if self.freeze not in FREEZE_OPTIONS:
            raise ValueError(f"freeze={self.freeze!r}; allowed: {', '.join(FREEZE_OPTIONS)}")

    @property
    def seed(self) -> int:
        return self.pretrain.seed

    @property
    def loads(self) -> PretrainConfig:
        return self.pretrain

    @property
    def base(self) -> PretrainConfig:
        return self.pretrain

    @property
    def stages(self) -> tuple:
        return (self.pretrain, self)

    @property
    def trained_domains(self) -> tuple:
        return (self.pretrain.domain, self.domain)

    monitored = PretrainConfig.monitored
    n_images = PretrainConfig.n_images


@dataclass(frozen=True)
class MixtureConfig:
    """Baseline: one stage on a mixture of two domains, ``n_images[i]`` images of ``domains[i]``."""

    kind: ClassVar[str] = "mixture"
    stage_names: ClassVar[tuple[str, ...]] = ("mixture",)
    makes_checkpoint: ClassVar[bool] = False
    freeze: ClassVar[str] = "none"
    data: DataConfig
    series: str
    domains: tuple[Domain, Domain]
    n_images: tuple[int, int]
    lr: float
    seed: int
    model: ModelConfig
    stage: StageConfig

    def __post_init__(self) -> None:
        doms = tuple(normalize_domain(self.series, d) for d in self.domains)
        object.__setattr__(self, "domains", doms)
        _check_positive("lr", self.lr)
        _check_seed(self.seed)

    loads = PretrainConfig.loads
    base = PretrainConfig.base
    stages = PretrainConfig.stages

    @property
    def trained_domains(self) -> tuple:
        return self.domains

    @property
    def monitored(self) -> tuple:
        """Its target (the second domain), as a transfer to that domain is stopped, so that
        the two methods the baseline study compares are selected alike."""
        return (self.domains[1],)


RunConfig = PretrainConfig | TransferConfig | MixtureConfig
