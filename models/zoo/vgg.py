"""CIFAR VGGs with BatchNorm (vgg8, vgg11, vgg13, vgg16, vgg19), RepDistiller layout.

Five conv blocks; max pools follow blocks 0-2 only, so blocks 3 and 4 run at 4x4 for a 32x32
input (3x3 for 28x28). No pool follows the last block: ``forward_features`` returns its
post-ReLU map and the head's global average pool does the pooling, which keeps the path from
features to the classifier linear (and the NORM Feature Transform mergeable).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from models.base import ClassifierHead, ContractNet
from models.registry import register_model
from models.zoo._common import init_weights

# Output channels of each conv layer, grouped by block.
CFGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}
NUM_POOLED_BLOCKS = 3  # a 2x2 max pool after blocks 0, 1, 2


def _make_block(in_chans: int, widths: Sequence[int]) -> nn.Sequential:
    """conv3x3 (with bias, as in the reference) -> BN -> ReLU, once per width."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_chans = width
    return nn.Sequential(*layers)


class VGG(ContractNet):
    """VGG-BN for CIFAR with a single linear classifier."""

    def __init__(
        self,
        cfg: Sequence[Sequence[int]],
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if len(cfg) != 5:
            raise ValueError(f"VGG config needs 5 blocks, got {len(cfg)}")
        stages: list[nn.Module] = []
        for i, widths in enumerate(cfg):
            stages.append(_make_block(in_chans, widths))
            if i < NUM_POOLED_BLOCKS:
                stages.append(nn.MaxPool2d(2, 2))
            in_chans = widths[-1]
        self.features = nn.Sequential(*stages)
        self.num_features = in_chans
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@register_model
def vgg8(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """VGG-8-BN (RepDistiller config "S")."""
    return VGG(CFGS["vgg8"], num_classes, in_chans, **kwargs)


@register_model
def vgg11(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """VGG-11-BN (config "A")."""
    return VGG(CFGS["vgg11"], num_classes, in_chans, **kwargs)


@register_model
def vgg13(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """VGG-13-BN (config "B")."""
    return VGG(CFGS["vgg13"], num_classes, in_chans, **kwargs)


@register_model
def vgg16(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """VGG-16-BN (config "D")."""
    return VGG(CFGS["vgg16"], num_classes, in_chans, **kwargs)


@register_model
def vgg19(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """VGG-19-BN (config "E")."""
    return VGG(CFGS["vgg19"], num_classes, in_chans, **kwargs)
