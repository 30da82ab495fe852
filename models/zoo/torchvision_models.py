"""torchvision ImageNet networks adapted to the zoo's contract (features / head / num_features).

The wrappers reuse torchvision's own submodules (built with ``weights=None``): nothing is copied,
and the parameter names stay torchvision's except the classifier, which moves under ``head.fc``.
``load_torchvision_state_dict`` maps a plain torchvision state_dict onto a wrapper. torchvision
is imported inside the factories so that listing the registry stays cheap.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Mapping, Union, cast

import torch
import torch.nn as nn

from models.base import ContractNet
from models.registry import register_model

if TYPE_CHECKING:  # pragma: no cover
    from torchvision.models import MobileNetV2, ResNet


def _head(fc: nn.Linear, drop: nn.Module, pool: nn.Module | None = None) -> nn.Sequential:
    """A ClassifierHead-shaped Sequential (global_pool, flatten, drop, fc) around existing modules."""
    return nn.Sequential(
        OrderedDict(
            global_pool=pool if pool is not None else nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1),
            drop=drop,
            fc=fc,
        )
    )


def _with_in_chans(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    """``conv`` itself for ``in_chans == conv.in_channels``, else a freshly initialised copy of its shape."""
    if in_chans == conv.in_channels:
        return conv
    new = nn.Conv2d(
        in_chans, conv.out_channels, cast(tuple[int, int], conv.kernel_size), cast(tuple[int, int], conv.stride),
        cast(Union[str, tuple[int, int]], conv.padding), cast(tuple[int, int], conv.dilation), conv.groups,
        bias=conv.bias is not None,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


class TorchvisionWrapper(ContractNet):
    """Base for the wrappers: renames between torchvision's keys and the wrapper's."""

    # (torchvision key prefix, wrapper key prefix); keys matching none are kept as they are.
    KEY_MAP: tuple[tuple[str, str], ...] = ()

    @classmethod
    def _rename(cls, key: str, to_wrapper: bool) -> str:
        for tv_prefix, own_prefix in cls.KEY_MAP:
            src, dst = (tv_prefix, own_prefix) if to_wrapper else (own_prefix, tv_prefix)
            if key.startswith(src):
                return dst + key[len(src):]
        return key

    def load_torchvision_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a plain torchvision state_dict; ``ValueError`` lists missing/unexpected/mis-shaped keys."""
        mapped = {self._rename(k, to_wrapper=True): v for k, v in state_dict.items()}
        own = self.state_dict()
        missing = sorted(self._rename(k, to_wrapper=False) for k in own.keys() - mapped.keys())
        unexpected = sorted(k for k in state_dict if self._rename(k, to_wrapper=True) not in own)
        shapes = sorted(
            f"{self._rename(k, to_wrapper=False)}: got {tuple(mapped[k].shape)}, expected {tuple(v.shape)}"
            for k, v in own.items()
            if k in mapped and mapped[k].shape != v.shape
        )
        if missing or unexpected or shapes:
            problems = []
            if missing:
                problems.append(f"missing keys: {', '.join(missing)}")
            if unexpected:
                problems.append(f"unexpected keys: {', '.join(unexpected)}")
            if shapes:
                problems.append(f"shape mismatches: {'; '.join(shapes)}")
            raise ValueError(
                f"state_dict does not fit {type(self).__name__} "
                f"(num_classes / in_chans / architecture differ?): " + " | ".join(problems)
            )
        self.load_state_dict(mapped, strict=True)


class TorchvisionResNet(TorchvisionWrapper):
    """torchvision ResNet: features = stem .. layer4, head = avgpool, flatten, drop, fc."""

    KEY_MAP = (("fc.", "head.fc."),)

    def __init__(self, net: ResNet, in_chans: int = 3, drop_rate: float = 0.0):
        super().__init__()
        self.conv1 = _with_in_chans(net.conv1, in_chans)
        self.bn1, self.relu, self.maxpool = net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.num_features = net.fc.in_features
        drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.head = _head(net.fc, drop, pool=net.avgpool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class TorchvisionMobileNetV2(TorchvisionWrapper):
    """torchvision MobileNetV2: features = its ``features`` (ends in 1x1 conv-BN-ReLU6), head = pool, flatten,
    its dropout, its linear layer."""

    KEY_MAP = (("classifier.1.", "head.fc."),)

    def __init__(self, net: MobileNetV2, in_chans: int = 3):
        super().__init__()
        net.features[0][0] = _with_in_chans(net.features[0][0], in_chans)
        self.features = net.features
        drop, fc = net.classifier[0], net.classifier[1]
        self.num_features = fc.in_features
        self.head = _head(fc, drop)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _tv_resnet(arch: str, num_classes: int, in_chans: int, kwargs: dict[str, Any]) -> nn.Module:
    from torchvision import models as tvm

    drop_rate = kwargs.pop("drop_rate", 0.0)
    net = getattr(tvm, arch)(weights=None, num_classes=num_classes, **kwargs)
    return TorchvisionResNet(net, in_chans, drop_rate)


@register_model
def tv_resnet18(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """torchvision ResNet-18 (512 features); extra kwargs go to torchvision (``drop_rate`` to the head)."""
    return _tv_resnet("resnet18", num_classes, in_chans, kwargs)


@register_model
def tv_resnet34(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """torchvision ResNet-34 (512 features)."""
    return _tv_resnet("resnet34", num_classes, in_chans, kwargs)


@register_model
def tv_resnet50(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """torchvision ResNet-50 (2048 features)."""
    return _tv_resnet("resnet50", num_classes, in_chans, kwargs)


@register_model
def tv_mobilenet_v2(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """torchvision MobileNetV2 (1280 features, dropout 0.2 before fc); kwargs go to torchvision."""
    from torchvision import models as tvm

    net = tvm.mobilenet_v2(weights=None, num_classes=num_classes, **kwargs)
    return TorchvisionMobileNetV2(net, in_chans)
