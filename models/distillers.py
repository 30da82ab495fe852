"""Distillers: one training objective each, wrapping the network that learns (mdistiller's split).

A distiller owns the trainable module (``trainable``: the student, or NORM's student + FT) and, when it
distils, a frozen teacher. ``forward_train(x, y, epoch) -> (logits, {term: weighted loss})`` is one training
step's forward; ``forward_test(x)`` gives logits for evaluation; ``learnable_parameters()`` is what the
optimiser updates. ``forward`` dispatches on ``self.training``, so DDP can wrap a distiller as is.

The teacher is held outside the module tree: it is not in ``state_dict()`` (checkpoints hold the trainable
module only), not in ``parameters()`` (the optimiser and DDP never see it) and ``train()`` cannot switch it
out of eval mode (its BatchNorm statistics stay frozen); ``.to(device / dtype / memory_format)`` moves it with
the student, so it always runs in the student's device and memory format.
"""
from __future__ import annotations

from typing import Optional, Sequence, cast

import torch
import torch.nn as nn
import torch.nn.functional as functional

from models.base import ContractNet
from models.losses import distill_losses, kd_loss, norm_weight, standardize_logits
from models.norm import NormStudent

Terms = dict[str, torch.Tensor]


class Distiller(nn.Module):
    """Base class: ``trainable`` trains; an optional ``teacher`` is frozen (eval, no grad, not in state_dict).

    Subclasses register the trainable module (``self.student``, or NORM's ``self.ns``) after ``__init__``.
    """

    student: nn.Module

    _teacher: Optional[nn.Module]  # set with object.__setattr__: kept out of the module tree

    def __init__(self, teacher: Optional[nn.Module] = None):
        super().__init__()
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        object.__setattr__(self, "_teacher", teacher)  # not registered: see the module docstring

    @property
    def teacher(self) -> Optional[nn.Module]:
        return self._teacher

    def frozen_teacher(self) -> ContractNet:
        """The teacher, for objectives that need one (the model contract: forward_features/forward_head)."""
        if self._teacher is None:
            raise ValueError(f"{type(self).__name__} needs a teacher")
        return cast(ContractNet, self._teacher)

    @property
    def trainable(self) -> nn.Module:
        """The module whose weights are the result (and the checkpoints' content)."""
        return self.student

    def learnable_parameters(self) -> list[nn.Parameter]:
        return list(self.trainable.parameters())

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self._teacher is not None:
            self._teacher.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self._teacher is not None:
            self._teacher._apply(fn, *args, **kwargs)
        return self

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, epoch: int = 0):
        if self.training:
            if y is None:
                raise ValueError("training a distiller needs the labels: forward(x, y, epoch)")
            return self.forward_train(x, y, epoch)
        return self.forward_test(x)

    def forward_train(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[torch.Tensor, Terms]:
        raise NotImplementedError

    def forward_test(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


def _standardized(logits: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    return standardize_logits(logits, scale) if scale else logits


class CE(Distiller):
    """Plain cross-entropy training (the teacher, the CE baseline); ``logit_scale`` standardises the logits."""

    def __init__(self, student: nn.Module, *, logit_scale: Optional[float] = None):
        super().__init__()
        self.student = student
        self.logit_scale = logit_scale

    def forward_train(self, x, y, epoch):
        logits = self.student(x)
        return logits, {"ce": functional.cross_entropy(_standardized(logits, self.logit_scale), y)}


class KD(Distiller):
    """Hinton KD baseline: ``(1 - kd_weight) * CE + kd_weight * KD(T)``, on standardised logits when asked."""

    def __init__(self, student: nn.Module, teacher: nn.Module, *, kd_weight: float = 0.9, temperature: float = 4.0,
                 logit_scale: Optional[float] = None):
        super().__init__(teacher)
        self.student = student
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.logit_scale = logit_scale

    def forward_train(self, x, y, epoch):
        logits = self.student(x)
        z = _standardized(logits, self.logit_scale)
        with torch.no_grad():
            t = self.frozen_teacher()(x)
        t = _standardized(t, self.logit_scale)
        return logits, {"ce": (1 - self.kd_weight) * functional.cross_entropy(z, y),
                        "kd": self.kd_weight * kd_loss(z, t, self.temperature)}


class NORM(Distiller):
    """N-to-one representation matching: ``gamma*CE + beta*KD + alpha*w(epoch/epochs)*NORM`` (docs/method.md).

    The student gets a Feature Transform (``models.norm.NormStudent``) that is trained with it; ``trainable``
    is that NormStudent (student + FT), which the ``merge`` stage folds back into the plain student.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, epochs: int, n: int = 8, residual: bool = True,
                 alpha: float = 1.0, beta: float = 0.0, gamma: float = 1.0, temperature: float = 4.0,
                 norm_schedule: Sequence[tuple[float, float]] = ((1.0, 1.0),), logit_scale: Optional[float] = None):
        super().__init__(teacher)
        self.ns = NormStudent(student, cast(ContractNet, teacher).num_features, n=n, residual=residual)
        self.epochs, self.n = epochs, n
        self.alpha, self.beta, self.gamma, self.temperature = alpha, beta, gamma, temperature
        self.norm_schedule = list(norm_schedule)
        self.logit_scale = logit_scale

    @property
    def student(self) -> nn.Module:  # type: ignore[override]
        return self.ns.student

    @property
    def trainable(self) -> nn.Module:
        return self.ns

    def norm_multiplier(self, epoch: int) -> float:
        """The schedule's multiplier on the NORM term in ``epoch`` (0-based), read at the fraction epoch/epochs."""
        return norm_weight(epoch / self.epochs, self.norm_schedule)

    def forward_train(self, x, y, epoch):
        with torch.no_grad():
            teacher = self.frozen_teacher()
            tf = teacher.forward_features(x)
            tl = teacher.forward_head(tf) if self.beta > 0 else None
        logits, expanded = self.ns(x)
        _, terms = distill_losses(logits, y, expanded=expanded, teacher_features=tf, teacher_logits=tl, n=self.n,
                                  alpha=self.alpha, beta=self.beta, gamma=self.gamma,
                                  norm_multiplier=self.norm_multiplier(epoch), temperature=self.temperature,
                                  logit_scale=self.logit_scale)
        return logits, terms

    def forward_test(self, x):
        return self.ns(x)[0]
