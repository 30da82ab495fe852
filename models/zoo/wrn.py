"""Pre-activation Wide ResNets for CIFAR (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

depth = 6n + 4; three stages of n pre-activation blocks with widths 16k, 32k, 64k at strides
1, 2, 2. ``forward_features`` ends with the network's final BN + ReLU, so the map it returns is
post-activation like every other family's.

Deviation from the NORM authors' code, on purpose: their WRN taps the teacher feature and places the
student's FT on the raw block3 output, *before* the final BN + ReLU. A ReLU between the FT and the
classifier makes the FT impossible to fold into the FC layer, so such a student keeps its FT at
inference. Here the FT (and the teacher feature) sit after BN + ReLU, where pooling and the FC are
linear, so the trained student merges back into a plain WRN. See docs/presets.md.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.base import ClassifierHead, ContractNet
from models.registry import register_model
from models.zoo._common import init_weights


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3; a 1x1 conv on the activated input when shapes change."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, block_drop: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(block_drop) if block_drop > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        # Like the original WRN: a projection shortcut sees the activated input, identity the raw one.
        identity = x if self.shortcut is None else self.shortcut(act)
        out = self.conv1(act)
        out = self.conv2(self.drop(self.relu2(self.bn2(out))))
        return out + identity


class WideResNet(ContractNet):
    """WRN-depth-k for 32x32 (or 28x28) inputs."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        block_drop: float = 0.0,
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        in_planes = 16
        stages = []
        for planes, stride in zip(widths, (1, 2, 2), strict=True):
            blocks = [PreActBlock(in_planes, planes, stride, block_drop)]
            blocks += [PreActBlock(planes, planes, 1, block_drop) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.num_features = in_planes
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.relu(self.bn(x))


@register_model
def wrn_16_1(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """WRN-16-1 (last stage 64 channels)."""
    return WideResNet(16, 1, num_classes, in_chans, **kwargs)


@register_model
def wrn_16_2(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """WRN-16-2 (last stage 128 channels)."""
    return WideResNet(16, 2, num_classes, in_chans, **kwargs)


@register_model
def wrn_40_1(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """WRN-40-1 (last stage 64 channels)."""
    return WideResNet(40, 1, num_classes, in_chans, **kwargs)


@register_model
def wrn_40_2(num_classes: int = 100, in_chans: int = 3, **kwargs) -> nn.Module:
    """WRN-40-2 (last stage 128 channels)."""
    return WideResNet(40, 2, num_classes, in_chans, **kwargs)
