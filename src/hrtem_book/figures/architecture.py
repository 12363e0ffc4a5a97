"""Chapter 3: the U-Net drawn from the model the pipeline actually builds.

Channel widths come from the built encoder (``encoder.out_channels``) and the decoder config;
parameter counts per part, and what each freezing option leaves trainable, come from
:func:`hrtem_book.models.part_parameters` on the built model. Nothing is typed in by hand, so the
figure follows the profile's :class:`~hrtem_book.config.ModelConfig`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle

from ..config import FREEZE_OPTIONS, ModelConfig
from ._common import new_figure

PART_COLOURS = {"encoder": "C0", "decoder": "C1", "head": "C2"}


def model_summary(cfg: ModelConfig) -> dict[str, Any]:
    """Widths and parameter counts of the model built from ``cfg``.

    ``encoder_channels``: output channels of each encoder stage (input first);
    ``decoder_channels``: from the config; ``parts``: total parameters per part;
    ``trainable``: per freeze option, trainable parameters per part.
    """
    from ..models import build_model, freeze, part_parameters  # torch import only when drawn

    model = build_model(cfg)
    parts = {name: total for name, (_, total) in part_parameters(model).items()}
    trainable = {}
    for option in FREEZE_OPTIONS:
        freeze(model, option)
        trainable[option] = {name: tr for name, (tr, _) in part_parameters(model).items()}
    return {
        "encoder": cfg.encoder,
        "encoder_channels": [int(c) for c in model.encoder.out_channels],
        "decoder_channels": [int(c) for c in cfg.decoder_channels],
        "classes": cfg.classes,
        "parts": parts,
        "total": int(sum(parts.values())),
        "trainable": trainable,
    }


def _arrow(ax, start, end, **kw):
    style = {"arrowstyle": "->", "mutation_scale": 10, "color": "k", "lw": 0.8, **kw}
    ax.add_patch(FancyArrowPatch(start, end, **style))


def _box(ax, x, y, w, h, colour, text):
    ax.add_patch(Rectangle((x - w / 2, y - h / 2), w, h, fc=colour, ec="k", lw=0.6, alpha=0.75))
    ax.text(x, y, text, ha="center", va="center", fontsize=7)


def _schematic(ax, s: dict[str, Any]) -> None:
    enc = s["encoder_channels"][1:]  # stage outputs; index 0 is the input
    dec = s["decoder_channels"]
    depth = len(enc)
    widths = np.log2(np.maximum(enc, 2))
    scale = 0.9 / widths.max()
    for i, c in enumerate(enc):  # encoder: down the left side, one level per stage (÷2 each)
        y = -i
        _box(
            ax,
            0.0,
            y,
            0.35 + widths[i] * scale,
            0.6,
            PART_COLOURS["encoder"],
            f"{c} ch\n/{2 ** (i + 1)}",
        )
    for j, c in enumerate(dec):  # decoder: back up the right side
        level = depth - 2 - j
        y = -level if level >= 0 else 1.0
        _box(ax, 3.0, y, 0.9, 0.6, PART_COLOURS["decoder"], f"{c} ch")
        if 0 <= level < depth - 1:
            _arrow(ax, (0.65, y), (2.5, y), ls="--", color="0.4")
        if j > 0:  # upsampling path
            _arrow(ax, (3.0, y - 0.7), (3.0, y - 0.3))
    _box(ax, 0.0, 1.0, 0.7, 0.5, "0.9", f"image\n{s['encoder_channels'][0]} ch")
    _box(ax, 4.3, 1.0, 0.8, 0.5, PART_COLOURS["head"], f"head\n{s['classes']} logits")
    _arrow(ax, (0.0, 0.75), (0.0, 0.3))
    _arrow(ax, (3.45, 1.0), (3.9, 1.0))
    _arrow(ax, (0.6, 1 - depth), (2.55, 2 - depth))  # bottleneck → first decoder block
    ax.text(0.0, -depth + 0.2, "encoder", ha="center", fontsize=9, color=PART_COLOURS["encoder"])
    ax.text(3.0, -depth + 1.2, "decoder", ha="center", fontsize=9, color=PART_COLOURS["decoder"])
    ax.text(1.55, -depth + 0.7, "skip connections", ha="center", fontsize=7, color="0.4")
    ax.set_xlim(-1.0, 5.0)
    ax.set_ylim(-depth - 0.1, 1.6)
    ax.set_axis_off()
    ax.set_title(f"U-Net, {s['encoder']} encoder: {s['total'] / 1e6:.2f} M parameters", fontsize=10)


def _freeze_bars(ax, s: dict[str, Any]) -> None:
    options = list(s["trainable"])
    y = np.arange(len(options))
    left = np.zeros(len(options))
    for part, colour in PART_COLOURS.items():
        vals = np.array([s["trainable"][o][part] for o in options], dtype=float) / 1e6
        ax.barh(y, vals, left=left, color=colour, alpha=0.75, label=part)
        left += vals
    for i in range(len(options)):
        share = left[i] * 1e6 / s["total"]
        ax.text(left[i], i, f" {left[i]:.2f} M ({100 * share:.0f} %)", va="center", fontsize=8)
    ax.set_yticks(y, [f"freeze {o}" for o in options])
    ax.invert_yaxis()
    ax.set_xlim(0, left.max() * 1.45)
    ax.set_xlabel("trainable parameters [millions]")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("what transfer updates", fontsize=10)


def architecture(cfg: ModelConfig, *, title: str | None = None) -> Figure:
    """Schematic of the U-Net built from ``cfg`` and its trainable parameters per freeze option."""
    s = model_summary(cfg)
    fig = new_figure(10.0, 3.8)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1.2, 1.0])
    _schematic(ax1, s)
    _freeze_bars(ax2, s)
    if title:
        fig.suptitle(title)
    return fig
