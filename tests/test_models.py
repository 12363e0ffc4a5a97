"""U-Net construction, freezing and the torchvision import shim."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from hrtem_book import _torchvision
from hrtem_book.config import ModelConfig
from hrtem_book.models import build_model, count_parameters, freeze, part_parameters
from hrtem_book.profiles import NARROW_MODEL, PAPER_MODEL

# smp.Unet('resnet18', in_channels=1, classes=2): ResNet18 encoder with a 1-channel stem
# (11,170,240) + decoder (3,151,552) + 3×3 head to 2 classes (16·2·9 + 2 = 290)
PAPER_TOTAL = 14_322_082
PAPER_ENCODER = 11_170_240


def _run_python(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def _torchvision_extension_loads() -> bool:
    code = "import torchvision.extension as e; print(e._has_ops())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return out.returncode == 0 and out.stdout.strip().endswith("True")


def test_shim_makes_torchvision_and_smp_importable():
    """Where the extension fails to load (this workplace), the shim defines the two schemas;
    where it loads, nothing is defined. Either way torchvision and smp import."""
    state = _run_python(
        """
        from hrtem_book._torchvision import ensure_torchvision
        state = ensure_torchvision()
        import torchvision, segmentation_models_pytorch
        import torchvision.extension as ext
        assert ensure_torchvision() == state  # idempotent
        print(state, ext._has_ops())
        """
    )
    shim, has_ops = state.split()
    assert has_ops in ("True", "False")
    assert shim == ("extension" if has_ops == "True" else "shim")


def test_shim_is_a_no_op_when_the_ops_exist():
    """Simulates a loading extension: the ops are defined before the shim runs (as _C.so does);
    the shim must then define nothing (a second definition would raise)."""
    out = _run_python(
        """
        import torch
        import hrtem_book._torchvision as tv
        tv._load_extension = lambda: False  # the path where _C.so fails, but ops already exist
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        print(tv.ensure_torchvision(), tv._LIBRARY is None)
        """
    )
    assert out == "extension True"


@pytest.mark.skipif(_torchvision_extension_loads(), reason="torchvision's extension loads here")
def test_extension_ops_are_unavailable_but_defined_here():
    assert _torchvision.ensure_torchvision() == "shim"
    assert hasattr(torch.ops.torchvision, "nms")
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.ops.torchvision.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)


def test_paper_model_parameter_counts():
    model = build_model(PAPER_MODEL)
    assert count_parameters(model) == (PAPER_TOTAL, PAPER_TOTAL)
    parts = part_parameters(model)
    assert parts["encoder"] == (PAPER_ENCODER, PAPER_ENCODER)
    assert parts["head"] == (2 * 16 * 9 + 2,) * 2  # 3×3 conv, 16 → 2 channels, with bias
    assert sum(total for _, total in parts.values()) == PAPER_TOTAL
    freeze(model, "encoder")
    trainable, total = count_parameters(model)
    assert (trainable, total) == (PAPER_TOTAL - PAPER_ENCODER, PAPER_TOTAL) == (3_151_842, total)
    assert round(1 - trainable / total, 2) == 0.78  # the paper: freezing removes about 80 %


def test_narrow_model_shapes_and_size():
    torch.manual_seed(0)
    model = build_model(NARROW_MODEL)
    assert count_parameters(model)[1] < 1_000_000
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 2, 32, 32)


def test_bad_model_configs_are_clear_errors():
    with pytest.raises(ValueError, match="encoder_depth"):
        build_model(ModelConfig(encoder_depth=4))
    with pytest.raises(ValueError, match="tu-"):
        build_model(ModelConfig(encoder_channels=(8, 16, 32, 64)))
    with pytest.raises(ValueError, match="allowed: none, encoder, decoder"):
        freeze(build_model(NARROW_MODEL), "head")


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("option", ["none", "encoder", "decoder"])
def test_freezing_keeps_parameters_and_batchnorm_statistics(option):
    torch.manual_seed(0)
    model = build_model(NARROW_MODEL)
    freeze(model, option)
    model.train()  # must not wake the frozen part's BatchNorm
    parts = {"encoder": model.encoder, "decoder": model.decoder, "head": model.segmentation_head}
    before = {name: _snapshot(part) for name, part in parts.items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(4, 1, 32, 32), torch.randint(0, 2, (4, 32, 32))
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    for name, part in parts.items():
        after = _snapshot(part)
        changed = {k for k in after if not torch.equal(after[k], before[name][k])}
        if name == option:
            assert not changed, f"{name} frozen but {sorted(changed)[:3]} moved"
            norms = [m for m in part.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            assert norms and not any(m.training for m in norms)
        else:
            # every weight and every running statistic of a trainable part moves
            assert changed == set(after), f"{name}: {sorted(set(after) - changed)[:3]} stayed"


def test_backward_stops_at_a_frozen_encoder_but_crosses_a_frozen_decoder():
    # the claim of chapter 6 ("What freezing saves"): gradients flow head -> decoder -> encoder
    reached = {}
    for option in ("encoder", "decoder"):
        torch.manual_seed(0)
        model = freeze(build_model(NARROW_MODEL), option)
        features = []
        model.encoder.register_forward_hook(lambda mod, inp, out, f=features: f.extend(out))
        loss = F.cross_entropy(model(torch.randn(2, 1, 32, 32)), torch.zeros(2, 32, 32).long())
        loss.backward()
        reached[option] = any(f.requires_grad for f in features)
        trainable = model.encoder if option == "decoder" else model.decoder
        assert all(p.grad is not None for p in trainable.parameters())
    assert reached == {"encoder": False, "decoder": True}


def test_freeze_none_undoes_a_previous_freeze():
    model = build_model(NARROW_MODEL)
    total = count_parameters(model)[1]
    freeze(model, "decoder")
    assert count_parameters(model)[0] < total
    freeze(model, "none")
    model.train()
    assert count_parameters(model) == (total, total)
    assert all(m.training for m in model.modules())
