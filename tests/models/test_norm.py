"""The Feature Transform and the NormStudent wrapper: shapes, residual vs plain, strictly linear inside."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from models.norm import FeatureTransform, LogitsOnly, NormStudent
from models.registry import create_model

C_S, C_T = 6, 5


def _randomize(ft: FeatureTransform, seed: int = 0) -> FeatureTransform:
    """Non-trivial BN statistics/affine so residual and plain FT really differ; eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in ft.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return ft.eval()


@pytest.mark.parametrize("n", [1, 2, 8])
@pytest.mark.parametrize("residual", [True, False])
def test_shapes(n: int, residual: bool) -> None:
    ft = FeatureTransform(C_S, C_T, n=n, residual=residual)
    x = torch.randn(3, C_S, 4, 7)
    out, expanded = ft(x)
    assert out.shape == x.shape
    assert expanded.shape == (3, n * C_T, 4, 7)
    assert ft.expand[0].out_channels == n * C_T and ft.contract[0].in_channels == n * C_T
    assert ft.contract[0].out_channels == C_S


def test_residual_vs_plain() -> None:
    torch.manual_seed(0)
    plain = _randomize(FeatureTransform(C_S, C_T, n=2, residual=False))
    res = _randomize(FeatureTransform(C_S, C_T, n=2, residual=True))
    res.load_state_dict(plain.state_dict())
    x = torch.randn(2, C_S, 3, 3)
    with torch.no_grad():
        out_p, exp_p = plain(x)
        out_r, exp_r = res(x)
        manual = plain.contract(plain.expand(x))
    assert torch.equal(exp_p, exp_r), "the expanded map does not depend on the residual"
    assert torch.allclose(out_p, manual, atol=1e-6)
    assert torch.allclose(out_r, out_p + x, atol=1e-6)
    assert not torch.allclose(out_r, out_p, atol=1e-3)


def test_expanded_is_expand_branch_output() -> None:
    ft = _randomize(FeatureTransform(C_S, C_T, n=3))
    x = torch.randn(2, C_S, 2, 2)
    with torch.no_grad():
        _, expanded = ft(x)
        assert torch.allclose(expanded, ft.expand[1](ft.expand[0](x)), atol=1e-6)


@pytest.mark.parametrize("n", [0, -1])
def test_n_below_one_raises(n: int) -> None:
    with pytest.raises(ValueError, match="N must be >= 1"):
        FeatureTransform(C_S, C_T, n=n)


def test_bad_channel_counts_raise() -> None:
    with pytest.raises(ValueError, match="channel counts"):
        FeatureTransform(0, C_T, n=2)


def test_no_nonlinearity_inside() -> None:
    """Only 1x1 bias-free convolutions and BatchNorm: what makes the FT foldable into the FC layer."""
    ft = FeatureTransform(C_S, C_T, n=4)
    leaves = [m for m in ft.modules() if not list(m.children())]
    assert [type(m) for m in leaves] == [nn.Conv2d, nn.BatchNorm2d, nn.Conv2d, nn.BatchNorm2d]
    for conv in (ft.expand[0], ft.contract[0]):
        assert conv.kernel_size == (1, 1) and conv.bias is None and conv.groups == 1


def test_ft_is_affine_per_pixel() -> None:
    """Functional check of linearity: FT(a x + b y) - FT(0) == a (FT(x) - FT(0)) + b (FT(y) - FT(0))."""
    ft = _randomize(FeatureTransform(C_S, C_T, n=2)).double()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 1, C_S, 3, 3, generator=g, dtype=torch.float64)
    zero = torch.zeros_like(x)
    with torch.no_grad():
        f = lambda t: ft(t)[0]  # noqa: E731
        lhs = f(2.0 * x - 0.5 * y) - f(zero)
        rhs = 2.0 * (f(x) - f(zero)) - 0.5 * (f(y) - f(zero))
    assert torch.allclose(lhs, rhs, atol=1e-10)


def test_norm_student_returns_logits_and_expanded() -> None:
    torch.manual_seed(0)
    student = create_model("resnet8", num_classes=7, in_chans=1)
    ns = NormStudent(student, teacher_channels=16, n=2).eval()
    assert ns.ft.student_channels == student.num_features
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        logits, expanded = ns(x)
        feats = student.forward_features(x)
        transformed, exp_ref = ns.ft(feats)
        assert logits.shape == (2, 7)
        assert expanded.shape == (2, 2 * 16, *feats.shape[2:])
        assert torch.allclose(expanded, exp_ref, atol=1e-6)
        assert torch.allclose(logits, student.forward_head(transformed), atol=1e-6)
        assert torch.equal(ns.logits(x), logits)
        wrapped = LogitsOnly(ns)
        out = wrapped(x)
    assert isinstance(out, torch.Tensor) and torch.equal(out, logits)


def test_norm_student_rejects_non_contract_model() -> None:
    with pytest.raises(ValueError, match="lacks 'forward_features'"):
        NormStudent(nn.Linear(3, 3), teacher_channels=4)
