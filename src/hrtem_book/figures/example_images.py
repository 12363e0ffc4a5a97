"""Example images of the simulated series (appendix figure ``app:example-images``).

``example_images_figure(ds, domain, index, overlay)`` draws one image of a dataset series (as
written by :mod:`hrtem_book.datasets`) beside its label; :class:`hrtem_book.widgets.ImagesApp`
wraps it in ipywidgets controls (series, domain value, image, mask overlay on/off).

    ds = datasets.load_series("defocus", get_profile("smoke").data, "data/smoke")
    example_images_figure(ds, -10.0, 0, overlay=True)

``heldout_gallery(ds, index, split)`` puts the held-out series' domains side by side — one image
of each synthetic training variant and of each experimental-like domain — so that a reader sees
what separates the images a network is trained on from those it is asked to segment.
"""

from __future__ import annotations

import xarray as xr
from matplotlib.figure import Figure

from ..datasets import sample_positions
from ..series import get_series

_OUTLINE = (1.0, 0.45, 0.0)  # orange mask outline


def _domain_label(ds: xr.Dataset, domain) -> str:
    spec = get_series(str(ds.attrs["series"]))
    unit = f" {spec.unit}" if spec.unit else ""
    return f"{spec.display(domain)}{unit} {spec.name}" if spec.numeric else str(domain)


def _image(ds: xr.Dataset, domain, index: int, split: str):
    """Image ``index`` of ``split`` of ``domain``: ``(sample, image, mask, extent [nm])``, the
    extent from the image's own pixel (the magnification series has several); older files: the
    series'. A one-line error for an index the split does not have."""
    pos = sample_positions(ds, domain, split)
    if not 0 <= index < len(pos):
        raise ValueError(f"index={index} is not allowed; allowed: 0..{len(pos) - 1}")
    sample = ds.isel(sample=int(pos[index]))
    image, mask = sample["image"].values, sample["mask"].values
    pixel = float(sample["pixel_A"]) if "pixel_A" in sample.coords else float(ds.attrs["pixel_A"])
    extent_nm = (0, image.shape[1] * pixel / 10, image.shape[0] * pixel / 10, 0)
    return sample, image, mask, extent_nm


def heldout_gallery(ds: xr.Dataset, index: int = 0, split: str = "test") -> Figure:
    """Image ``index`` of ``split`` of every domain of the ``heldout`` series, in the series'
    order (the synthetic training variants, then the experimental-like domains), each on its
    own grey scale (electrons per pixel) with the label's outline; the title gives the domain
    and the defocus the image was recorded at."""
    domains = list(dict.fromkeys(ds["domain"].values.tolist()))
    fig = Figure(figsize=(2.3 * len(domains) + 0.2, 3.3), layout="constrained")
    axes = fig.subplots(1, len(domains), squeeze=False)[0]
    for ax, domain in zip(axes, domains, strict=True):
        sample, image, mask, extent_nm = _image(ds, domain, index, split)
        ax.imshow(image, cmap="gray", extent=extent_nm)
        ax.contour(mask, levels=[0.5], colors=[_OUTLINE], linewidths=0.8, extent=extent_nm,
                   origin="upper")  # fmt: skip
        ax.set_title(f"{domain}\nΔf = {float(sample['defocus_nm']):.1f} nm", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Held-out series, {split} image #{index} of each domain (orange: the label)",
                 fontsize=10)  # fmt: skip
    return fig


def example_images_figure(
    ds: xr.Dataset, domain, index: int = 0, overlay: bool = True, split: str = "train"
) -> Figure:
    """Image ``index`` of ``domain`` (counts per pixel) and its particle mask, side by side."""
    sample, image, mask, extent_nm = _image(ds, domain, index, split)
    used = float(sample["defocus_nm"])

    fig = Figure(figsize=(7.6, 3.8), layout="constrained")
    ax_img, ax_mask = fig.subplots(1, 2, sharex=True, sharey=True)
    shown = ax_img.imshow(image, cmap="gray", extent=extent_nm)
    if overlay:  # the outline keeps the lattice fringes inside the particle visible
        ax_img.contour(
            mask, levels=[0.5], colors=[_OUTLINE], linewidths=1.2, extent=extent_nm, origin="upper"
        )
    fig.colorbar(shown, ax=ax_img, label="electrons per pixel", shrink=0.8)
    ax_img.set_title(f"{_domain_label(ds, domain)} · {split} #{index} · Δf = {used:.1f} nm")
    ax_mask.imshow(mask, cmap="gray", vmin=0, vmax=1, extent=extent_nm)
    ax_mask.set_title(f"label: {mask.mean():.0%} particle")
    for ax in (ax_img, ax_mask):
        ax.set_xlabel("x [nm]")
    ax_img.set_ylabel("y [nm]")
    return fig
