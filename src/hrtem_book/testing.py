"""Synthetic data in the project's schemas, for tests, benchmarks and widget development.

As ``xarray.testing`` does for xarray, this module gives the other modules' tests something
small and known to work on, never used by the pipeline itself:

- :func:`synthetic_database`: a results database of any study with plausible, deterministic
  values (the schema of :mod:`hrtem_book.results`);
- :func:`synthetic_series`: a dataset series whose domains differ like defoci do (discs whose
  contrast flips sign through zero), small enough to train on in a second;
- :func:`random_series`: a series of a profile's shapes filled with noise, for timing only;
- :func:`with_test_images`: per-image test scores for a database that has none.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .database import COUNTS
from .findings import stamp_attrs
from .metrics import METRICS
from .results import empty_database
from .series import get_series, split_structure_domain
from .studies import get_study, parse_mix

_SYNTHETIC_COORDS = {
    "defocus": {
        "pretrain_domain": [-10.0, 0.0, 10.0],
        "target_domain": [-10.0, 0.0, 10.0],
        "n_transfer": [64, 128],
        "pretrain_lr": [1e-3, 1e-4],
        "transfer_lr": [1e-4, 1e-5],
        "freeze": ["none", "encoder", "decoder"],
        "seed": [0, 1],
    },
    "baseline": {
        "domain_a": [-10.0, 0.0],
        "domain_b": [-10.0, 0.0, 10.0],
        "mix": ["128:384", "256:256", "384:128"],
        "lr": [1e-3, 1e-4],
        "seed": [0, 1],
    },
    "dose": {
        "pretrain_domain": [30.0, 150.0, 600.0],
        "target_domain": [30.0, 150.0, 600.0],
        "freeze": ["none", "encoder", "decoder"],
        "seed": [0, 1],
    },
    "structure": {
        "pretrain_domain": ["CdSe-small", "CdSe-large", "Cu-small"],
        "target_domain": ["CdSe-small", "CdSe-large", "Cu-small"],
        "freeze": ["none", "encoder", "decoder"],
        "seed": [0, 1],
    },
}
_GENERALIZATION_TRAIN = {
    "defocus": [-10.0, 0.0, 10.0],
    "dose": [30.0, 150.0, 600.0],
    "structure": ["CdSe-small", "CdSe-large", "Cu-small"],
    "magnification": [0.5, 1.0, 1.5],
    "substrate": [0.0, 3.0, 9.0],
}
for _series, _domains in _GENERALIZATION_TRAIN.items():
    _SYNTHETIC_COORDS[f"generalization-{_series}"] = {"train_domain": _domains, "seed": [0, 1]}
_SYNTHETIC_COORDS["heldout"] = {
    "pretrain_domain": ["varied", "fixed-support", "small", "large"],
    "target_domain": ["experimental", "experimental-small"],
    "seed": [0, 1],
}
_SYNTHETIC_FIXED = {"pretrain_lr": 1e-4, "transfer_lr": 1e-5, "n_transfer": 128, "freeze": "none"}
# the domain distance that moves the synthetic loss by 0.25 (0: ratios, on a log scale)
_SYNTHETIC_SCALE = {"defocus": 10.0, "dose": 0.0, "structure": 1.0, "magnification": 0.0,
                    "substrate": 3.0, "heldout": 1.0}  # fmt: skip
_SIZES = ("small", "large")
_SYNTHETIC_PARAMS = {"none": 921_000.0, "encoder": 160_000.0, "decoder": 761_000.0}


def _domain_gap(a, b, scale: float) -> float:
    """Dimensionless distance between two domains (0 = same); drives the synthetic losses."""
    if isinstance(a, str):
        try:  # "<lattice>-<size>"
            (lat_a, size_a), (lat_b, size_b) = split_structure_domain(a), split_structure_domain(b)
        except ValueError:
            size_a = size_b = None
        if size_a in _SIZES and size_b in _SIZES:
            return 1.0 * (lat_a != lat_b) + 0.4 * (size_a != size_b)
        return 0.0 if a == b else 1.0  # other names: equal or not
    if scale == 0:  # dose: ratios matter
        return abs(np.log(a / b)) / np.log(20.0)
    return abs(a - b) / scale


def synthetic_database(study: str, seed: int = 0, n_epochs: int = 4) -> xr.Dataset:
    """A small database of ``study`` with plausible, deterministic values (for tests and widgets).

    Loss grows with the distance between training and evaluation domain; transfer brings the
    target domain down (more with more data, less with a frozen encoder); seeds add noise. Dice
    falls as the loss rises (``1 - 0.8 loss``), IoU follows from Dice. Every stage trains all
    ``n_epochs`` and keeps its last epoch. The cell with every axis at its first value that is
    not excluded is marked ``failed`` (NaN), as a real sweep would record a diverged run.
    """
    spec = get_study(study)
    rng = np.random.default_rng(seed)
    coords = _SYNTHETIC_COORDS[study]
    eval_domains = list(dict.fromkeys(v for a in spec.domain_axes for v in coords[a]))
    fixed = {k: _SYNTHETIC_FIXED[k] for k in spec.fixed}
    ds = empty_database(study, coords, eval_domains, n_epochs, profile="synthetic", fixed=fixed)
    scale = _SYNTHETIC_SCALE[spec.series]
    epochs = np.arange(1, n_epochs + 1)
    status = ds["status"].values
    hashes = ds["config_hash"].values
    history = ds["history_loss"].values
    times = ds["train_time_s"].values
    params = ds["trainable_params"].values
    failed_marked = False
    for idx in np.ndindex(status.shape):
        cell = {a: coords[a][i] for a, i in zip(spec.axes, idx, strict=True)}
        a, b = (cell[d] for d in (spec.domain_axes * 2)[:2])  # one domain axis: a = b
        if a == b and spec.kind.excludes_diagonal:
            status[idx] = "excluded"
            continue
        hashes[idx] = f"{rng.integers(0, 2**63):016x}"[:16]
        if not failed_marked:
            status[idx] = "failed"
            failed_marked = True
            continue
        status[idx] = "ok"
        for s, stage in enumerate(spec.stages):
            for e, dom in enumerate(eval_domains):
                if stage == "mixture":
                    n_a, n_b = parse_mix(cell["mix"])
                    w = n_a / (n_a + n_b)
                    gap = w * _domain_gap(a, dom, scale) + (1 - w) * _domain_gap(b, dom, scale)
                    floor = 0.08
                elif stage == "pretrain":
                    gap, floor = _domain_gap(a, dom, scale), 0.10
                else:
                    gap = min(_domain_gap(b, dom, scale), _domain_gap(a, dom, scale) + 0.3)
                    n = cell.get("n_transfer", 128)
                    floor = 0.07 + 0.02 * np.log2(512 / n)
                    floor += {"none": 0.0, "encoder": 0.03, "decoder": 0.015}[
                        cell.get("freeze", "none")
                    ]
                end = floor + 0.25 * gap + 0.01 * rng.standard_normal()
                curve = end + (0.7 - end) * np.exp(-(epochs - 1) / 1.5)
                history[idx + (s, e)] = curve + 0.005 * rng.standard_normal(n_epochs)
            times[idx + (s,)] = 20.0 + 5.0 * rng.random()
            ds["eval_time_s"].values[idx + (s,)] = 2.0 + rng.random()
            ds["epochs_run"].values[idx + (s,)] = ds["best_epoch"].values[idx + (s,)] = n_epochs
            ds["stop_reason"].values[idx + (s,)] = "max_epochs"
            freeze = cell.get("freeze", "none") if stage == "transfer" else "none"
            params[idx + (s,)] = _SYNTHETIC_PARAMS[freeze]
    dice = np.clip(1.0 - 0.8 * history, 0.0, 1.0)
    ds["history_dice"].values[...] = dice
    ds["history_iou"].values[...] = dice / (2.0 - dice)
    for m in METRICS:
        hist = ds[f"history_{m}"]
        ds[f"final_{m}"].values[...] = hist.values[..., -1]
    ds.attrs.update(stamp_attrs())
    return ds


# --- dataset series ------------------------------------------------------------------------------
SYNTHETIC_DOMAINS = (-10.0, 0.0, 10.0)  # the smoke profile's defoci [nm]


def synthetic_series(
    n_train: int = 16, n_val: int = 8, seed: int = 0, px: int = 32, n_test: int = 8
) -> xr.Dataset:
    """Discs (the "particles", mask 1) on noise in the series schema (docs/ARCHITECTURE.md).

    The disc contrast is 0.06·domain, or 0.3 at domain 0: it depends on the "defocus" and flips
    sign across it, like HRTEM phase contrast through focus, so the domains differ and transfer
    between them is meaningful.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:px, :px]
    rows = []
    for domain in SYNTHETIC_DOMAINS:
        contrast = 0.06 * domain if domain else 0.3
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            for index in range(n):
                mask = np.zeros((px, px), bool)
                for _ in range(rng.integers(1, 4)):
                    cy, cx = rng.uniform(4, px - 4, 2)
                    mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(2.5, 5.0) ** 2
                image = 100.0 * (1 + contrast * mask) + rng.normal(0, 10, (px, px))
                rows.append((image.astype(np.float32), mask.astype(np.uint8), domain, split, index))
    images, masks, domain, split, index = zip(*rows, strict=True)
    return xr.Dataset(
        {
            "image": (("sample", "y", "x"), np.stack(images)),
            "mask": (("sample", "y", "x"), np.stack(masks)),
        },
        coords={
            "domain": ("sample", np.array(domain)),
            "split": ("sample", np.array(split)),
            "index": ("sample", np.array(index)),
        },
        attrs={"series": "defocus"},
    )


def random_series(series: str, data, seed: int = 0) -> xr.Dataset:
    """A dataset in the series schema of ``data``'s shapes with random images: for timing only."""
    rng = np.random.default_rng(seed)
    px = data.sim.image_px
    doms, splits, index = [], [], []
    spec = get_series(series)
    for d in data.domains(series):
        for split, n in spec.split_sizes(data, d).items():
            doms += [d] * n
            splits += [split] * n
            index += list(range(n))
    n = len(doms)
    return xr.Dataset(
        {
            "image": (("sample", "y", "x"), rng.poisson(400, (n, px, px)).astype(np.float32)),
            "mask": (("sample", "y", "x"), (rng.random((n, px, px)) < 0.25).astype(np.uint8)),
        },
        coords={
            "domain": ("sample", doms),
            "split": ("sample", splits),
            "index": ("sample", index),
        },
        attrs={"series": series},
    )


def with_test_images(
    ds: xr.Dataset, n_images: int = 16, spread: float = 0.3, seed: int = 0
) -> xr.Dataset:
    """``ds`` with per-image test scores consistent with its ``final_loss``: image ``i`` of
    evaluation domain ``e`` is harder by a factor ``exp(spread · z[e, i])`` (normalised to mean
    1 over the domain's images) for *every* model — the images are shared, as a real test set's
    are — so that each ``final_loss`` is the mean of its ``image_loss``. Counts: 1,000 particle
    pixels per image, with FP = FN set by the loss (Dice ≈ 1 − loss), for the Dice path."""
    rng = np.random.default_rng(seed)
    z = np.exp(spread * rng.standard_normal((ds.sizes["eval_domain"], n_images)))
    factors = xr.DataArray(z / z.mean(axis=1, keepdims=True), dims=("eval_domain", "test_image"))
    out = ds.drop_vars(["image_loss", "image_counts"]).drop_dims(["test_image"], errors="ignore")
    out = out.assign_coords(test_image=np.arange(n_images))
    loss = (ds["final_loss"] * factors).transpose(*ds["final_loss"].dims, "test_image")
    tp = xr.full_like(loss, 1000.0)
    miss = (1000.0 * loss.clip(0.0, 1.0)).round()
    counts = xr.concat([tp.where(loss.notnull()), miss, miss], "count").assign_coords(
        count=list(COUNTS)
    )
    out["image_loss"] = loss
    out["image_counts"] = counts.transpose(*loss.dims, "count")
    return out
