"""ShuffleNetV2 1.0x for CIFAR, RepDistiller's ``ShuffleV2``: stages 116/232/464, last conv 1024.

A 1x1 stem at full resolution, three stages (a down-sampling block then 3/7/3 basic blocks;
32x32 -> 4x4, 28x28 -> 4x4) and a 1x1 conv-BN-ReLU to 1024 channels.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from models.base import ClassifierHead, ContractNet
from models.registry import register_model
from models.zoo._common import channel_shuffle, init_weights


def _conv_bn(in_chans: int, out_chans: int, kernel: int, stride: int = 1, relu: bool = True,
             depthwise: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_chans, out_chans, kernel, stride, kernel // 2, groups=in_chans if depthwise else 1,
                  bias=False),
        nn.BatchNorm2d(out_chans),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _branch(in_chans: int, out_chans: int, stride: int) -> nn.Sequential:
    """1x1 conv-BN-ReLU -> depthwise 3x3 conv-BN -> 1x1 conv-BN-ReLU."""
    return nn.Sequential(
        _conv_bn(in_chans, out_chans, 1),
        _conv_bn(out_chans, out_chans, 3, stride, relu=False, depthwise=True),
        _conv_bn(out_chans, out_chans, 1),
    )


class BasicBlock(nn.Module):
    """Channel split: one half passes through, the other through a branch; concat and shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        self.split = channels // 2
        self.branch = _branch(channels - self.split, channels - self.split, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[:, : self.split], x[:, self.split :]
        return channel_shuffle(torch.cat([x1, self.branch(x2)], 1), 2)


class DownBlock(nn.Module):
    """Two stride-2 branches (depthwise-first and pointwise-first), concat and shuffle."""

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        mid = out_chans // 2
        self.left = nn.Sequential(
            _conv_bn(in_chans, in_chans, 3, 2, relu=False, depthwise=True),
            _conv_bn(in_chans, mid, 1),
        )
        self.right = _branch(in_chans, mid, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleNetV2(ContractNet):
    """ShuffleNetV2 for small inputs."""

    def __init__(
        self,
        out_channels: Sequence[int] = (116, 232, 464, 1024),
        num_blocks: Sequence[int] = (3, 7, 3),
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if len(out_channels) != len(num_blocks) + 1:
            raise ValueError(
                f"need one more width than stages: widths {tuple(out_channels)}, depths {tuple(num_blocks)}"
            )
        self.stem = _conv_bn(in_chans, 24, 1)
        channels = 24
        stages = []
        for width, n in zip(out_channels[:-1], num_blocks, strict=True):
            stages.append(nn.Sequential(DownBlock(channels, width), *[BasicBlock(width) for _ in range(n)]))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.num_features = out_channels[-1]
        self.conv_head = _conv_bn(channels, self.num_features, 1)
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.conv_head(x)


@register_model
def shufflenetv2(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """ShuffleNetV2 1.0x (the paper's "ShuffleV2")."""
    return ShuffleNetV2(num_classes=num_classes, in_chans=in_chans, **kwargs)
