"""U-Nets of the segmentation-models-pytorch family: construction, freezing, parameter counts.

The paper's network is ``smp.Unet('resnet18')`` with one input channel and two output classes
(14,322,082 parameters, the paper's "about 14 million"). The small profiles use a narrower member
of the same family: timm's ResNet18 (``'tu-resnet18'``) with narrower stages and decoder.

A U-Net has three parts (see :data:`PARTS`):

- ``encoder``: the stem (conv1, bn1, max-pool) and the downsampling residual blocks (layer1-4);
- ``decoder``: the upsampling blocks that merge the skip connections;
- ``head``: the final 3×3 convolution to the class logits. It is always trainable.

Freezing a part stops its parameters *and* its BatchNorm running statistics: the frozen part's
normalisation layers stay in eval mode even after ``model.train()`` (:meth:`UNet.train`).
Weights are never downloaded (``encoder_weights=None``): every model starts from the seeded
random initialisation of smp/timm.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

from torch import nn

from ._torchvision import ensure_torchvision
from .config import FREEZE_OPTIONS, ModelConfig

# before anything imports torchvision (smp, below, or another module): see _torchvision.py
ensure_torchvision()

PARTS = ("encoder", "decoder", "head")
_FROZEN_BY_OPTION = {"none": (), "encoder": ("encoder",), "decoder": ("decoder",)}
_NORM_WITH_STATS = nn.modules.batchnorm._NormBase  # BatchNorm/InstanceNorm with running stats


@functools.cache
def _unet_class() -> type:
    """:class:`UNet`, defined on first use: segmentation-models-pytorch imports timm and
    torchvision's models (about 2 s), which a process that only reads records, collects a
    database or refuses a bad option never needs."""
    import segmentation_models_pytorch as smp

    class UNet(smp.Unet):
        """``smp.Unet`` whose frozen parts keep their normalisation layers in eval mode.

        smp's own ``freeze_encoder`` covers only the encoder; this class handles any part named
        in ``frozen_parts`` (set by :func:`freeze`).
        """

        frozen_parts: tuple[str, ...] = ()

        def train(self, mode: bool = True) -> UNet:
            nn.Module.train(self, mode)
            for name in self.frozen_parts:
                for module in part_modules(self)[name].modules():
                    if isinstance(module, _NORM_WITH_STATS):
                        module.eval()
            return self

    UNet.__module__ = __name__
    UNet.__qualname__ = "UNet"
    return UNet


def __getattr__(name: str):
    if name == "UNet":  # `models.UNet` as if it were defined at module level
        return _unet_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_config(cfg: ModelConfig) -> None:
    if cfg.encoder_depth != len(cfg.decoder_channels):
        raise ValueError(
            f"decoder_channels={cfg.decoder_channels} has {len(cfg.decoder_channels)} entries; "
            f"allowed: exactly encoder_depth={cfg.encoder_depth}"
        )
    if cfg.encoder_channels is not None and not cfg.encoder.startswith("tu-"):
        raise ValueError(
            f"encoder_channels={cfg.encoder_channels} with encoder={cfg.encoder!r}: "
            "stage widths are allowed only for timm encoders ('tu-...')"
        )
    if cfg.classes < 2:
        raise ValueError(f"classes={cfg.classes}; allowed: >= 2 (logits for cross-entropy)")


def build_model(cfg: ModelConfig) -> nn.Module:
    """A randomly initialised :class:`UNet` for ``cfg`` (seed torch beforehand for
    reproducibility)."""
    _check_config(cfg)
    extra = {} if cfg.encoder_channels is None else {"channels": tuple(cfg.encoder_channels)}
    return _unet_class()(
        encoder_name=cfg.encoder,
        encoder_depth=cfg.encoder_depth,
        encoder_weights=None,  # never download: the paper trains from scratch
        decoder_channels=tuple(cfg.decoder_channels),
        in_channels=cfg.in_channels,
        classes=cfg.classes,
        **extra,
    )


def part_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The three parts of a U-Net by name (:data:`PARTS`)."""
    return {"encoder": model.encoder, "decoder": model.decoder, "head": model.segmentation_head}


def freeze(model: nn.Module, option: str) -> nn.Module:
    """Freeze ``"none"``, the ``"encoder"`` or the ``"decoder"`` of ``model`` (in place).

    The head stays trainable. Frozen parameters get ``requires_grad=False`` and the frozen
    part's BatchNorm layers are put (and kept, see :meth:`UNet.train`) in eval mode. Calling
    again with another option replaces the previous choice.
    """
    if option not in _FROZEN_BY_OPTION:
        raise ValueError(f"freeze={option!r}; allowed: {', '.join(FREEZE_OPTIONS)}")
    frozen = _FROZEN_BY_OPTION[option]
    for name, part in part_modules(model).items():
        for param in part.parameters():
            param.requires_grad_(name not in frozen)
    model.frozen_parts = frozen
    return model.train(model.training)  # re-apply the mode so frozen norms switch to eval


def _numel(params: Iterator[nn.Parameter]) -> tuple[int, int]:
    trainable = total = 0
    for p in params:
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    return _numel(model.parameters())


def part_parameters(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(trainable, total) parameter counts per part, for the book's architecture figure."""
    return {name: _numel(part.parameters()) for name, part in part_modules(model).items()}
