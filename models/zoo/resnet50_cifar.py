"""ResNet-50 for CIFAR (RepDistiller's ``ResNet50``): Bottleneck blocks, 2048 output channels.

A 3x3 stride-1 stem with no max pool, then stages of 3/4/6/3 bottlenecks at strides 1, 2, 2, 2
(32x32 -> 4x4, 28x28 -> 4x4).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from models.base import ClassifierHead, ContractNet
from models.registry import register_model
from models.zoo._common import init_weights


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand x4, projection shortcut when shapes change."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class CifarBottleneckResNet(ContractNet):
    """Bottleneck ResNet with a CIFAR stem."""

    def __init__(
        self,
        num_blocks: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if len(num_blocks) != 4:
            raise ValueError(f"need 4 stage depths, got {tuple(num_blocks)}")
        self.conv1 = nn.Conv2d(in_chans, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 64
        stages = []
        for planes, n, stride in zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2), strict=True):
            blocks = [Bottleneck(in_planes, planes, stride)]
            in_planes = planes * Bottleneck.expansion
            blocks += [Bottleneck(in_planes, planes) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = in_planes
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


@register_model
def resnet50_cifar(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """ResNet-50 with a CIFAR stem (last stage 2048 channels)."""
    return CifarBottleneckResNet((3, 4, 6, 3), num_classes, in_chans, **kwargs)
