"""What the merge and verify stages check: state_dict signatures, and the verify stage's pass/fail rules."""
from __future__ import annotations

import torch.nn as nn


def state_signature(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """state_dict keys with their shapes, in order: equal signatures load into each other strictly."""
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def failures(report: dict, *, fp32_rel_tol: float, fp64_rel_tol: float, min_top1_agreement: float) -> list[str]:
    """One line per failed check: the figure, its value and the tolerance it broke."""
    fails = []
    for figure, value, tol, key in (
        ("fp32_max_rel_diff", report["fp32"]["max_rel_diff"], fp32_rel_tol, "verify.fp32_rel_tol"),
        ("fp64_max_rel_diff", report["fp64"]["max_rel_diff"], fp64_rel_tol, "verify.fp64_rel_tol"),
        ("fp64_stored_max_rel_diff", report["fp64_stored"]["max_rel_diff"], fp32_rel_tol, "verify.fp32_rel_tol"),
    ):
        if not value <= tol:  # also catches NaN
            fails.append(f"{figure}={value:.3e} exceeds {key}={tol:.1e}")
    agreement = report["fp32"]["top1_agreement"]
    if not agreement >= min_top1_agreement:
        fails.append(f"top1_agreement={agreement:.5f} is below verify.min_top1_agreement={min_top1_agreement}")
    s = report["structure"]
    if not s["params_equal"]:
        fails.append(f"params={s['params']} differs from the vanilla student's {s['vanilla_params']}")
    if not s["flops_equal"]:
        fails.append(f"flops={s['flops']} differs from the vanilla student's {s['vanilla_flops']}")
    if not s["state_dict_equal"]:
        fails.append("state_dict keys/shapes differ from the vanilla student's")
    return fails
