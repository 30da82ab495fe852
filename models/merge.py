"""Fold a trained NORM Feature Transform into the student's first linear layer (exact, eval mode).

In eval mode every BatchNorm is ``y = s*z + t`` (s = gamma/sqrt(var+eps), t = beta - s*mean), so per
pixel ``FT(x) = A x + c`` with ``A = I + diag(s2) W2 diag(s1) W1`` (no I for plain FT) and
``c = diag(s2) W2 t1 + t2``. Global average pooling commutes with a per-pixel affine map, hence
``fc(pool(FT(x))) = (W_fc A) pool(x) + (W_fc c + b_fc)``. Split as in torch.nn.utils.fusion: a pure
function on tensors, and a module wrapper that checks the preconditions and returns the vanilla class.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn

from models.norm import FeatureTransform, NormStudent

# Modules that may stand between the FT output and the first linear layer: linear and position-free.
_PASS_THROUGH = (nn.Flatten, nn.Dropout, nn.Identity)


@dataclass(frozen=True)
class BNAffine:
    """An eval-mode BatchNorm as its per-channel affine map ``y = scale * z + shift``."""

    scale: torch.Tensor
    shift: torch.Tensor


def bn_affine(bn: nn.BatchNorm2d, dtype: torch.dtype = torch.float64) -> BNAffine:
    """Per-channel scale/shift of a BatchNorm using its running statistics."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot merge a BatchNorm without running statistics (track_running_stats=False)")
    mean = bn.running_mean.to(dtype)
    var = bn.running_var.to(dtype)
    gamma = bn.weight.detach().to(dtype) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().to(dtype) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    return BNAffine(scale=scale, shift=beta - scale * mean)


def ft_affine(
    w_expand: torch.Tensor, bn1: BNAffine, w_contract: torch.Tensor, bn2: BNAffine, residual: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The FT as ``(A, c)``: ``FT(x) = A x + c`` per pixel. Weights are 1x1 conv kernels or matrices."""
    w1 = w_expand.reshape(w_expand.shape[0], -1)  # (N*C_t, C_s)
    w2 = w_contract.reshape(w_contract.shape[0], -1)  # (C_s, N*C_t)
    a = bn2.scale[:, None] * (w2 @ (bn1.scale[:, None] * w1))
    if residual:
        a = a + torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    c = bn2.scale * (w2 @ bn1.shift) + bn2.shift
    return a, c


def fold_affine_into_linear(
    w_fc: torch.Tensor, b_fc: torch.Tensor, a: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fc(A p + c) = (W A) p + (W c + b)``."""
    return w_fc @ a, w_fc @ c + b_fc


def _check_bn(bn: nn.Module, where: str) -> None:
    if not isinstance(bn, nn.BatchNorm2d):
        raise ValueError(f"cannot merge: {where} is {type(bn).__name__}, expected BatchNorm2d")
    if bn.training:
        raise ValueError(f"cannot merge: {where} is in training mode; call .eval() so it uses running statistics")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot merge: {where} has track_running_stats=False; there are no statistics to fold")


def _check_conv(conv: nn.Module, where: str) -> None:
    if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1) or conv.bias is not None or conv.groups != 1:
        raise ValueError(f"cannot merge: {where} must be a 1x1 Conv2d without bias or groups (got {conv})")


def _is_global_avg_pool(m: nn.Module) -> bool:
    return isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))


def find_first_linear(head: nn.Module) -> tuple[list[str], nn.Linear]:
    """Walk the head in order; return (names before the first Linear, that Linear).

    Raises ``ValueError`` naming the offending module when a non-linear or position-dependent module
    (max pooling, an activation, a non-global pool ...) stands before it.
    """
    seen: list[str] = []
    pooled = False
    for name, module in head.named_modules():
        if module is head or len(list(module.children())) > 0:
            continue  # containers: their leaves come next in order
        if isinstance(module, nn.Linear):
            if not pooled:
                raise ValueError("cannot merge: no global average pool before the first linear layer of the head")
            return seen, module
        if _is_global_avg_pool(module):
            pooled = True
        elif not isinstance(module, _PASS_THROUGH):
            raise ValueError(
                f"cannot merge: head module {name!r} ({type(module).__name__}) lies between the FT and the first "
                "linear layer and is not linear (only global average pooling, flatten, dropout, identity are)"
            )
        seen.append(name)
    raise ValueError("cannot merge: the head has no nn.Linear layer")


def merge_norm_student(norm_student: NormStudent, inplace: bool = False) -> nn.Module:
    """Return the vanilla student (same class, same state_dict keys/shapes) with the FT folded in.

    Needs the FT in eval mode; refuses heads that are not linear up to their first ``nn.Linear``.
    """
    if not isinstance(norm_student, NormStudent):
        raise ValueError(f"expected a NormStudent, got {type(norm_student).__name__}")
    ft: FeatureTransform = norm_student.ft
    _check_conv(ft.expand[0], "ft.expand[0]")
    _check_bn(ft.expand[1], "ft.expand[1]")
    _check_conv(ft.contract[0], "ft.contract[0]")
    _check_bn(ft.contract[1], "ft.contract[1]")
    head = getattr(norm_student.student, "head", None)
    if head is None:
        raise ValueError(f"cannot merge: {type(norm_student.student).__name__} has no `head` module")
    _, fc = find_first_linear(head)
    if fc.in_features != ft.student_channels:
        raise ValueError(f"cannot merge: first linear layer takes {fc.in_features} inputs, FT outputs {ft.student_channels}")
    if fc.bias is None:
        raise ValueError("cannot merge: the first linear layer has no bias to absorb the FT's shift")

    with torch.no_grad():
        expand_conv, expand_bn = cast(nn.Conv2d, ft.expand[0]), cast(nn.BatchNorm2d, ft.expand[1])  # checked above
        contract_conv, contract_bn = cast(nn.Conv2d, ft.contract[0]), cast(nn.BatchNorm2d, ft.contract[1])
        a, c = ft_affine(
            expand_conv.weight.detach().double(),
            bn_affine(expand_bn),
            contract_conv.weight.detach().double(),
            bn_affine(contract_bn),
            residual=ft.residual,
        )
        w, b = fold_affine_into_linear(fc.weight.detach().double(), fc.bias.detach().double(), a, c)

    student = norm_student.student if inplace else copy.deepcopy(norm_student.student)
    _, new_fc = find_first_linear(cast(nn.Module, student.head))
    with torch.no_grad():
        new_fc.weight.copy_(w.to(new_fc.weight.dtype))
        new_fc.bias.copy_(b.to(new_fc.bias.dtype))
    return student.eval()
