"""The model zoo honours the contract: shapes, features/head split, widths, registry, torchvision loading."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn

from models.registry import create_model, list_models

torch.set_num_threads(2)

NUM_CLASSES = 7
TV_SIZE = 64  # torchvision ImageNet nets: a small input keeps the test fast (stride 32 -> 2x2)

# Last-stage widths of the paper's CIFAR networks (the authors' model_channels) and the zoo's other members.
CIFAR_WIDTHS = {
    "resnet8": 64, "resnet14": 64, "resnet20": 64, "resnet32": 64, "resnet44": 64, "resnet56": 64,
    "resnet110": 64, "resnet8x4": 256, "resnet32x4": 256,
    "wrn_16_1": 64, "wrn_16_2": 128, "wrn_40_1": 64, "wrn_40_2": 128,
    "vgg8": 512, "vgg11": 512, "vgg13": 512, "vgg16": 512, "vgg19": 512,
    "mobilenetv2": 1280, "shufflenetv1": 960, "shufflenetv2": 1024, "resnet50_cifar": 2048,
}
TV_WIDTHS = {"tv_resnet18": 512, "tv_resnet34": 512, "tv_resnet50": 2048, "tv_mobilenet_v2": 1280}


@functools.lru_cache(maxsize=None)
def _model(name: str, in_chans: int) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=NUM_CLASSES, in_chans=in_chans)


def _inputs(name: str) -> list[torch.Tensor]:
    """(2, C, H, W) inputs to try: CIFAR nets at 32x32 RGB and 28x28 grey, torchvision nets at 64x64."""
    g = torch.Generator().manual_seed(1)
    if name.startswith("tv_"):
        size = (TV_SIZE, TV_SIZE)
        return [torch.randn(2, 3, *size, generator=g), torch.randn(2, 1, *size, generator=g)]
    return [torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 1, 28, 28, generator=g)]


def _first_linear(head: nn.Module) -> nn.Linear:
    return next(m for m in head.modules() if isinstance(m, nn.Linear))


def test_registry_lists_every_family() -> None:
    assert set(CIFAR_WIDTHS) | set(TV_WIDTHS) == set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_contract(name: str) -> None:
    for x in _inputs(name):
        model = _model(name, x.shape[1])
        nf = model.num_features
        assert _first_linear(model.head).in_features == nf
        model.train()
        assert model(x).shape == (2, NUM_CLASSES)  # train-mode BN copes with the smallest maps
        model.eval()
        with torch.no_grad():
            feats = model.forward_features(x)
            out = model(x)
            assert feats.ndim == 4 and feats.shape[:2] == (2, nf) and min(feats.shape[2:]) >= 1
            assert (feats >= 0).all(), "forward_features must end with its final (ReLU-like) activation"
            assert out.shape == (2, NUM_CLASSES)
            assert torch.allclose(out, model.forward_head(feats), atol=1e-6)
            assert torch.allclose(out, model.forward_head(model.forward_features(x)), atol=1e-6)


@pytest.mark.parametrize("name,width", sorted({**CIFAR_WIDTHS, **TV_WIDTHS}.items()))
def test_last_stage_width(name: str, width: int) -> None:
    model = _model(name, 3)
    assert model.num_features == width
    assert _first_linear(model.head).in_features == width


def test_package_level_api_like_timm() -> None:
    """``from models import create_model, list_models`` in a fresh interpreter, as timm's ``timm.create_model``."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("from models import create_model, list_models; import models.registry as r; "
            "assert create_model is r.create_model and list_models is r.list_models; "
            "m = create_model('resnet8', num_classes=3, in_chans=1); "
            "print(type(m).__name__, m.model_name, m.num_features, len(list_models()))")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["CifarResNet", "resnet8", "64", str(len(list_models()))]


@pytest.mark.parametrize("name", ["wrn_16_2", "wrn_40_2"])
def test_wrn_features_are_tapped_after_the_final_bn_relu(name: str) -> None:
    """Unlike the authors' WRN (raw block3 output): after BN + ReLU only pooling and the FC follow, so the FT
    there folds into the FC. The merge tests then prove the fold for every model."""
    model = _model(name, 3).eval()
    x = _inputs(name)[0]
    with torch.no_grad():
        raw = model.block3(model.block2(model.block1(model.conv1(x))))
        assert torch.equal(model.forward_features(x), torch.relu(model.bn(raw)))
        assert (raw < 0).any(), "the raw block3 output is not post-activation: the test would prove nothing"


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(ValueError) as err:
        create_model("resnet_does_not_exist")
    message = str(err.value)
    assert "resnet_does_not_exist" in message
    for name in ("resnet8x4", "wrn_40_2", "vgg13", "shufflenetv2", "tv_resnet18"):
        assert name in message


def test_torchvision_state_dict_round_trip() -> None:
    import torchvision

    torch.manual_seed(2)
    reference = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES)
    with torch.no_grad():  # non-trivial BN statistics, so a skipped buffer would show
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    reference.eval()
    model = create_model("tv_resnet18", num_classes=NUM_CLASSES).eval()
    model.load_torchvision_state_dict(reference.state_dict())
    x = torch.randn(2, 3, TV_SIZE, TV_SIZE)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert torch.equal(model.head.fc.weight, reference.fc.weight)


def test_torchvision_mobilenet_state_dict_keys_map() -> None:
    import torchvision

    reference = torchvision.models.mobilenet_v2(weights=None, num_classes=NUM_CLASSES).eval()
    model = create_model("tv_mobilenet_v2", num_classes=NUM_CLASSES).eval()
    model.load_torchvision_state_dict(reference.state_dict())
    x = torch.randn(1, 3, TV_SIZE, TV_SIZE)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_torchvision_state_dict_wrong_keys_raise() -> None:
    import torchvision

    model = create_model("tv_resnet18", num_classes=NUM_CLASSES)
    sd = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["fc.bias"]
    with pytest.raises(ValueError, match=r"missing keys: fc\.bias.*unexpected keys: extra\.weight"):
        model.load_torchvision_state_dict(sd)
    wrong_classes = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES + 1).state_dict()
    with pytest.raises(ValueError, match=r"shape mismatches: fc\.(bias|weight)"):
        model.load_torchvision_state_dict(wrong_classes)
