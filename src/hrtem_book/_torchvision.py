"""Make ``import torchvision`` work beside a CPU-only torch whose torchvision wheel is CUDA-built.

segmentation-models-pytorch imports ``torchvision.models.resnet`` for its ResNet encoders. The
torchvision wheel on PyPI is built against CUDA: next to the CPU torch of this workplace its C++
extension ``torchvision/_C.so`` fails to load (it needs ``libtorch_cuda.so``). torchvision
tolerates that for most ops, but ``torchvision/_meta_registrations.py`` then calls
``torch.library.register_fake("torchvision::nms")`` (and ``qnms``) unconditionally, which raises
``RuntimeError: operator torchvision::nms does not exist`` and aborts the whole import.

:func:`ensure_torchvision` repairs exactly that and nothing more. Before torchvision is imported it
tries to load the extension the way torchvision does; if it loads (any matched torch/torchvision
pair, e.g. the GPU machines) nothing else happens. Otherwise it *defines* (schema only, no kernel)
the operators that torchvision registers fake kernels for, in a ``FRAGMENT`` library of the
``torchvision`` namespace, and keeps that library alive for the process. The C++ ops (``nms``,
``roi_align``, ...) stay unavailable (calling one raises); nothing in this project uses them.

Import this module before ``segmentation_models_pytorch`` (``hrtem_book.models`` does)::

    from hrtem_book._torchvision import ensure_torchvision
    ensure_torchvision()
    import segmentation_models_pytorch as smp
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import torch

# Schemas of the operators that torchvision 0.2x registers fake (meta) kernels for
# unconditionally; copied in meaning from torchvision/csrc/ops/nms.cpp and quantized/qnms.
_UNCONDITIONAL_OPS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

_LIBRARY: torch.library.Library | None = None  # kept alive: dropping it undefines the ops
_STATE: str | None = None  # outcome of the first call, see ensure_torchvision


def _op_defined(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _load_extension() -> bool:
    """Load ``torchvision/_C`` like ``torchvision.extension`` does; True if it loaded."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    loader = (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    for location in spec.submodule_search_locations:
        found = importlib.machinery.FileFinder(str(Path(location)), loader).find_spec("_C")
        if found is None or found.origin is None:
            continue
        try:
            torch.ops.load_library(found.origin)
        except (ImportError, OSError):
            return False
        return True
    return False


def ensure_torchvision() -> str:
    """Prepare the ``torchvision`` op namespace so that ``import torchvision`` succeeds.

    Returns what was done (the first call decides; later calls return the same):
    ``"imported"`` torchvision was already imported, nothing to do; ``"missing"`` torchvision is
    not installed (smp's import will then say so); ``"extension"`` its C++ extension loads, a
    no-op; ``"shim"`` the extension does not load and the missing op schemas were defined.
    """
    global _LIBRARY, _STATE
    if _STATE is not None:
        return _STATE
    if "torchvision" in sys.modules:
        _STATE = "imported"
    elif importlib.util.find_spec("torchvision") is None:
        _STATE = "missing"
    elif _load_extension():
        _STATE = "extension"
    else:
        missing = [name for name in _UNCONDITIONAL_OPS if not _op_defined(name)]
        if missing:
            _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
            for name in missing:
                _LIBRARY.define(_UNCONDITIONAL_OPS[name])
        _STATE = "shim" if missing else "extension"
    return _STATE
