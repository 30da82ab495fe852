"""ShuffleNetV1 (groups 3) for CIFAR, RepDistiller's ``ShuffleV1``: stages 240/480/960.

A 1x1 stem at full resolution, then three stages of 4/8/4 bottlenecks whose first block halves
the resolution (32x32 -> 4x4, 28x28 -> 4x4). ReLU after every block, so the last map is
post-activation.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as functional

from models.base import ClassifierHead, ContractNet
from models.registry import register_model
from models.zoo._common import channel_shuffle, init_weights

STEM_CHANNELS = 24


class ShuffleBottleneck(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1, with add (stride 1) or concat (stride 2)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        # The stem has few channels: its successor's first 1x1 conv is not grouped.
        self.g1 = 1 if in_planes == STEM_CHANNELS else groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = functional.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.g1)
        out = functional.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        out = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return functional.relu(out)


class ShuffleNetV1(ContractNet):
    """ShuffleNetV1 for small inputs."""

    def __init__(
        self,
        out_planes: Sequence[int] = (240, 480, 960),
        num_blocks: Sequence[int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        in_planes = STEM_CHANNELS
        stages = []
        for planes, n in zip(out_planes, num_blocks, strict=True):
            # The first block concatenates its (pooled) input, so its branch makes the rest.
            blocks = [ShuffleBottleneck(in_planes, planes - in_planes, 2, groups)]
            blocks += [ShuffleBottleneck(planes, planes, 1, groups) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.num_features = in_planes
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = functional.relu(self.bn1(self.conv1(x)))
        return self.stages(x)


@register_model
def shufflenetv1(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """ShuffleNetV1, groups 3, stages 240/480/960 (the paper's "ShuffleV1")."""
    return ShuffleNetV1(num_classes=num_classes, in_chans=in_chans, **kwargs)
