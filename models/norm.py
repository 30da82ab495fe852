"""NORM's training-time Feature Transform (FT) and the student wrapper that uses it.

FT, as in the authors' code: ``expand`` = 1x1 conv C_s -> N*C_t (no bias) + BN, ``contract`` = 1x1 conv
N*C_t -> C_s (no bias) + BN, no non-linearity, optional linear residual. The expanded map (after its BN)
is what the NORM loss matches, group by group, to the teacher's last-stage features.
"""
from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn

from models.base import ContractNet


class FeatureTransform(nn.Module):
    """Linear FT: ``x -> x + contract(expand(x))`` (default) or ``contract(expand(x))`` (plain)."""

    def __init__(self, student_channels: int, teacher_channels: int, n: int = 8, residual: bool = True):
        super().__init__()
        if n < 1:
            raise ValueError(f"N must be >= 1 (got {n})")
        if student_channels < 1 or teacher_channels < 1:
            raise ValueError(f"channel counts must be >= 1 (got C_s={student_channels}, C_t={teacher_channels})")
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.n = n
        self.residual = residual
        expanded = n * teacher_channels
        self.expand = nn.Sequential(
            nn.Conv2d(student_channels, expanded, kernel_size=1, bias=False), nn.BatchNorm2d(expanded)
        )
        self.contract = nn.Sequential(
            nn.Conv2d(expanded, student_channels, kernel_size=1, bias=False), nn.BatchNorm2d(student_channels)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (transformed map with C_s channels, expanded map with N*C_t channels)."""
        expanded = self.expand(x)
        out = self.contract(expanded)
        if self.residual:
            out = out + x
        return out, expanded

    def extra_repr(self) -> str:
        return f"C_s={self.student_channels}, C_t={self.teacher_channels}, N={self.n}, residual={self.residual}"


class NormStudent(nn.Module):
    """A contract network with an FT between its last stage and its head (training only).

    ``forward(x)`` returns ``(logits, expanded)``; ``models.merge.merge_norm_student`` folds the FT into
    the head's first linear layer and gives back the vanilla network.
    """

    def __init__(self, student: nn.Module, teacher_channels: int, n: int = 8, residual: bool = True):
        super().__init__()
        for attr in ("forward_features", "forward_head", "num_features"):
            if not hasattr(student, attr):
                raise ValueError(f"student {type(student).__name__} lacks {attr!r}: it must follow the model contract")
        self.student = cast(ContractNet, student)  # the contract was checked just above
        self.ft = FeatureTransform(self.student.num_features, teacher_channels, n=n, residual=residual)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.student.forward_features(x)
        transformed, expanded = self.ft(features)
        return self.student.forward_head(transformed), expanded

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits only (for evaluation and export of the unmerged student)."""
        return self.forward(x)[0]


class LogitsOnly(nn.Module):
    """Wraps a NormStudent so that ``forward`` returns logits only (ONNX export, benchmarks)."""

    def __init__(self, norm_student: NormStudent):
        super().__init__()
        self.norm_student = norm_student

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_student(x)[0]
