"""CIFAR ResNets of RepDistiller (resnet8 ... resnet110, resnet8x4, resnet32x4).

Three stages of BasicBlocks at strides 1, 2, 2 after a 3x3 stem, so a 32x32 input ends at 8x8
and a 28x28 input at 7x7. ``num_filters`` = (stem, stage1, stage2, stage3) channels.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from models.base import ClassifierHead, ContractNet
from models.registry import register_model
from models.zoo._common import init_weights

WIDTHS = (16, 16, 32, 64)
WIDTHS_X4 = (32, 64, 128, 256)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut, ReLU after the sum."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(ContractNet):
    """RepDistiller's CIFAR ResNet: depth = 6n + 2, three stages of n BasicBlocks."""

    def __init__(
        self,
        depth: int,
        num_filters: Sequence[int] = WIDTHS,
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        if len(num_filters) != 4:
            raise ValueError(f"num_filters needs 4 widths (stem, stage1..3), got {tuple(num_filters)}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, num_filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = num_filters[0]
        stages = []
        for planes, stride in zip(num_filters[1:], (1, 2, 2), strict=True):
            blocks = [BasicBlock(in_planes, planes, stride)]
            blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.num_features = in_planes
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


@register_model
def resnet8(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """ResNet-8 (widths 16/32/64)."""
    return CifarResNet(8, WIDTHS, num_classes, in_chans, **kwargs)


@register_model
def resnet14(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """ResNet-14 (widths 16/32/64)."""
    return CifarResNet(14, WIDTHS, num_classes, in_chans, **kwargs)


@register_model
def resnet20(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """ResNet-20 (widths 16/32/64)."""
    return CifarResNet(20, WIDTHS, num_classes, in_chans, **kwargs)


@register_model
def resnet32(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """ResNet-32 (widths 16/32/64)."""
    return CifarResNet(32, WIDTHS, num_classes, in_chans, **kwargs)


@register_model
def resnet44(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """ResNet-44 (widths 16/32/64)."""
    return CifarResNet(44, WIDTHS, num_classes, in_chans, **kwargs)


@register_model
def resnet56(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """ResNet-56 (widths 16/32/64)."""
    return CifarResNet(56, WIDTHS, num_classes, in_chans, **kwargs)


@register_model
def resnet110(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """ResNet-110 (widths 16/32/64)."""
    return CifarResNet(110, WIDTHS, num_classes, in_chans, **kwargs)


@register_model
def resnet8x4(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """ResNet-8x4 (stem 32, widths 64/128/256)."""
    return CifarResNet(8, WIDTHS_X4, num_classes, in_chans, **kwargs)


@register_model
def resnet32x4(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """ResNet-32x4 (stem 32, widths 64/128/256)."""
    return CifarResNet(32, WIDTHS_X4, num_classes, in_chans, **kwargs)
