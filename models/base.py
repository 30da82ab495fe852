"""The one contract every network here follows (timm's): features, head, num_features.

``forward_features(x)`` returns the unpooled last-stage map (after its final activation),
``forward_head(f)`` runs ``self.head`` (global average pool, flatten, dropout, linear ...), and
``forward(x) == forward_head(forward_features(x))``. The NORM Feature Transform slots in between
with no per-model code, and the merge folds it into the first ``nn.Linear`` of ``self.head``.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class ClassifierHead(nn.Sequential):
    """Global average pool -> flatten -> dropout -> linear, as named submodules."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)


class ContractNet(nn.Module):
    """Base class: subclasses set ``self.num_features``, ``self.head`` and implement ``forward_features``."""

    num_features: int
    head: nn.Module

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
