"""The FT -> FC merge: exact for every zoo student and both FT variants, vanilla structure, clear refusals.

Golden outputs of the unmerged NormStudent are recorded before merging and compared after, in float64
(rounding level) and float32. The algebra (ft_affine, fold_affine_into_linear) is checked against a
reference that probes the FT module itself, so it does not share the formula it tests.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from models.merge import bn_affine, find_first_linear, fold_affine_into_linear, ft_affine, merge_norm_student
from models.norm import FeatureTransform, NormStudent
from models.registry import create_model, list_models

NUM_CLASSES = 10
C_T, N = 32, 2  # teacher channels and groups for the FT: small, so the test stays fast
FP64_TOL, FP32_TOL = 1e-9, 1e-4


def randomize_bn(module: nn.Module, seed: int) -> None:
    """Non-trivial running statistics and affine parameters in every BatchNorm (student and FT)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.25)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)


@functools.lru_cache(maxsize=1)  # the tests run name by name: both FT variants share one student build
def _student(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    student = create_model(name, num_classes=NUM_CLASSES, in_chans=3)
    randomize_bn(student, seed)
    return student.eval()


def build(name: str, residual: bool, seed: int = 0) -> NormStudent:
    """A NormStudent (eval mode) with non-trivial BatchNorm statistics in the student and in the FT."""
    torch.manual_seed(seed + 1)
    ns = NormStudent(copy.deepcopy(_student(name, seed)), C_T, n=N, residual=residual)
    randomize_bn(ns.ft, seed + 1)
    return ns.eval()


def input_for(name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    size = 64 if name.startswith("tv_") else 32  # torchvision nets: small ImageNet-style input
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dtype)


def fresh_on_meta(name: str) -> nn.Module:
    """A fresh vanilla model on the meta device: shapes, parameter count and FLOPs without the init cost."""
    with torch.device("meta"):
        return create_model(name, num_classes=NUM_CLASSES, in_chans=3).eval()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def flops(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many small convolutions: one intra-op thread is about as fast and far steadier on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- every student, both FTs
@pytest.mark.parametrize("residual", [True, False], ids=["default_ft", "plain_ft"])
@pytest.mark.parametrize("name", list_models())
def test_merge_is_exact_and_vanilla(name: str, residual: bool) -> None:
    ns = build(name, residual)
    x = input_for(name)
    with torch.no_grad():
        golden32 = ns(x)[0]
    snapshot = {k: v.clone() for k, v in ns.state_dict().items()}
    merged = merge_norm_student(ns)
    with torch.no_grad():
        out32 = merged(x)
    d32 = rel_diff(out32, golden32)
    assert d32 <= FP32_TOL, f"{name}: float32 merged vs unmerged max|diff|/max|logit| = {d32:.2e}"
    assert not torch.equal(merged.head.fc.weight, ns.student.head.fc.weight), "the FT was not folded in"

    # structure: the vanilla class, keys, shapes, parameter count and FLOPs
    vanilla = fresh_on_meta(name)
    assert type(merged) is type(vanilla)
    got = {k: tuple(v.shape) for k, v in merged.state_dict().items()}
    assert got == {k: tuple(v.shape) for k, v in vanilla.state_dict().items()}
    assert n_params(merged) == n_params(vanilla)
    assert flops(merged, x[:1]) == flops(vanilla, x[:1].to("meta")) > 0

    # the original NormStudent is untouched (inplace=False)
    assert all(torch.equal(v, snapshot[k]) for k, v in ns.state_dict().items())

    ns64 = copy.deepcopy(ns).double()
    x64 = x.double()
    with torch.no_grad():
        golden64 = ns64(x64)[0]
        out64 = merge_norm_student(ns64)(x64)
    assert out64.dtype == torch.float64
    d64 = rel_diff(out64, golden64)
    assert d64 <= FP64_TOL, f"{name}: float64 merged vs unmerged max|diff|/max|logit| = {d64:.2e}"


# ----------------------------------------------------------------------------- the pure algebra
def _random_ft(residual: bool, c_s: int = 6, c_t: int = 5, n: int = 3, seed: int = 0) -> FeatureTransform:
    torch.manual_seed(seed)
    ft = FeatureTransform(c_s, c_t, n=n, residual=residual)
    randomize_bn(ft, seed)
    return ft.eval().double()


def _probe_affine(ft: FeatureTransform) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, c) read off the module itself: c = FT(0), column j of A = FT(e_j) - FT(0), on 1x1 maps."""
    c_s = ft.student_channels
    basis = torch.cat([torch.zeros(1, c_s), torch.eye(c_s)]).double()[:, :, None, None]
    with torch.no_grad():
        out = ft(basis)[0][:, :, 0, 0]
    return (out[1:] - out[0]).T, out[0]


@pytest.mark.parametrize("residual", [True, False])
def test_ft_affine_matches_module(residual: bool) -> None:
    ft = _random_ft(residual)
    a, c = ft_affine(ft.expand[0].weight.detach(), bn_affine(ft.expand[1]), ft.contract[0].weight.detach(),
                     bn_affine(ft.contract[1]), residual=residual)
    a_ref, c_ref = _probe_affine(ft)
    assert torch.allclose(a, a_ref, rtol=0, atol=1e-12)
    assert torch.allclose(c, c_ref, rtol=0, atol=1e-12)

    # and per pixel on random maps: FT(x)[:, :, i, j] == A x[:, :, i, j] + c
    x = torch.randn(3, ft.student_channels, 4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        out = ft(x)[0]
    for i in range(x.shape[2]):
        for j in range(x.shape[3]):
            assert torch.allclose(out[:, :, i, j], x[:, :, i, j] @ a.T + c, rtol=0, atol=1e-12)


def test_bn_affine_matches_eval_batchnorm() -> None:
    bn = nn.BatchNorm2d(4, eps=1e-3)
    randomize_bn(bn, 5)
    bn.eval().double()
    z = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    aff = bn_affine(bn)
    with torch.no_grad():
        assert torch.allclose(bn(z), aff.scale[:, None, None] * z + aff.shift[:, None, None], atol=1e-13)


def test_fold_affine_into_linear_matches_composition() -> None:
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(7, 6, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    a, c = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    p = torch.randn(4, 6, generator=g, dtype=torch.float64)
    w2, b2 = fold_affine_into_linear(w, b, a, c)
    assert torch.allclose(p @ w2.T + b2, (p @ a.T + c) @ w.T + b, rtol=0, atol=1e-12)


def test_merge_goes_into_first_linear_of_mlp_head() -> None:
    ns = build("resnet8", residual=True)
    fc1 = nn.Linear(64, 16)
    ns.student.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Dropout(0.3), fc1, nn.ReLU(),
                                    nn.Linear(16, NUM_CLASSES)).eval()
    ns.double()
    x = input_for("resnet8", torch.float64)
    with torch.no_grad():
        golden = ns(x)[0]
        merged = merge_norm_student(ns)
        assert rel_diff(merged(x), golden) <= FP64_TOL
    assert find_first_linear(merged.head)[1] is merged.head[3]
    assert torch.equal(merged.head[5].weight, ns.student.head[5].weight), "later layers stay as they were"


def test_inplace_merge_reuses_the_student() -> None:
    ns = build("resnet8", residual=False)
    x = input_for("resnet8")
    with torch.no_grad():
        golden = ns(x)[0]
        merged = merge_norm_student(ns, inplace=True)
        assert merged is ns.student
        assert rel_diff(merged(x), golden) <= FP32_TOL


# ----------------------------------------------------------------------------- refusals
def test_refuses_ft_batchnorm_in_training_mode() -> None:
    ns = build("resnet8", residual=True)
    ns.ft.expand[1].train()
    with pytest.raises(ValueError, match=r"ft\.expand\[1\] is in training mode.*eval"):
        merge_norm_student(ns)


def test_refuses_batchnorm_without_running_stats() -> None:
    ns = build("resnet8", residual=True)
    ns.ft.contract[1] = nn.BatchNorm2d(ns.ft.student_channels, track_running_stats=False).eval()
    with pytest.raises(ValueError, match=r"ft\.contract\[1\] has track_running_stats=False"):
        merge_norm_student(ns)


@pytest.mark.parametrize(
    "layers,offender",
    [
        ([nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(1)], "MaxPool2d"),
        ([nn.AdaptiveMaxPool2d(1), nn.Flatten(1)], "AdaptiveMaxPool2d"),
        ([nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.ReLU()], "ReLU"),
        ([nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1)], "ReLU"),
    ],
    ids=["maxpool", "adaptive_maxpool", "relu_after_pool", "relu_before_pool"],
)
def test_refuses_nonlinear_head(layers: list[nn.Module], offender: str) -> None:
    ns = build("resnet8", residual=True)
    ns.student.head = nn.Sequential(*layers, nn.Linear(64, NUM_CLASSES)).eval()
    with pytest.raises(ValueError, match=rf"cannot merge: head module .*\({offender}\).*not linear"):
        merge_norm_student(ns)


def test_refuses_head_without_pool_or_linear() -> None:
    ns = build("resnet8", residual=True)
    ns.student.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    with pytest.raises(ValueError, match="no nn.Linear"):
        merge_norm_student(ns)
    ns.student.head = nn.Sequential(nn.Flatten(1), nn.Linear(64, NUM_CLASSES))
    with pytest.raises(ValueError, match="no global average pool"):
        merge_norm_student(ns)


def test_refuses_non_norm_student() -> None:
    with pytest.raises(ValueError, match=r"expected a NormStudent, got \w+"):
        merge_norm_student(create_model("resnet8", num_classes=NUM_CLASSES))
