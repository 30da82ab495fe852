"""MobileNetV2 x0.5 for CIFAR ("mobile_half" of RepDistiller / the NORM paper).

Expansion 6, width multiplier 0.5, stride-2 stem, overall stride 16 (32x32 -> 2x2, 28x28 -> 2x2),
and a final 1x1 conv to 1280 channels (not scaled down for multipliers <= 1).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.base import ClassifierHead, ContractNet
from models.registry import register_model
from models.zoo._common import init_weights


def _conv_bn_relu(in_chans: int, out_chans: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_chans),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection; residual when shapes match.

    As in the reference CIFAR code, the expansion conv is present even for expansion 1.
    """

    def __init__(self, in_chans: int, out_chans: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_chans * expansion
        self.use_residual = stride == 1 and in_chans == out_chans
        self.conv = nn.Sequential(
            _conv_bn_relu(in_chans, hidden, 1),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_chans, 1, bias=False),
            nn.BatchNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(ContractNet):
    """CIFAR MobileNetV2 with expansion ``expansion`` and width multiplier ``width_mult``."""

    # (expansion or None for 1, output channels, repeats, first stride)
    SETTINGS: tuple[tuple[int | None, int, int, int], ...] = (
        (None, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(
        self,
        num_classes: int = 100,
        in_chans: int = 3,
        expansion: int = 6,
        width_mult: float = 0.5,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        channels = int(32 * width_mult)
        self.stem = _conv_bn_relu(in_chans, channels, 3, stride=2)
        stages = []
        for t, c, n, s in self.SETTINGS:
            out_chans = int(c * width_mult)
            blocks = []
            for i in range(n):
                stride, ratio = (s if i == 0 else 1), (expansion if t else 1)
                blocks.append(InvertedResidual(channels, out_chans, stride, ratio))
                channels = out_chans
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.num_features = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv_head = _conv_bn_relu(channels, self.num_features, 1)
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_head(self.blocks(self.stem(x)))


@register_model
def mobilenetv2(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """MobileNetV2 x0.5, expansion 6 (the paper's CIFAR "MobileNetV2")."""
    return MobileNetV2(num_classes, in_chans, **kwargs)
