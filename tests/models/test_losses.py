"""NORM, KD and the helpers against brute-force references written out by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as functional

from models.losses import distill_losses, kd_loss, norm_loss, norm_weight, standardize_logits
from pipeline.config import DistillCfg


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _brute_norm(expanded: torch.Tensor, teacher: torch.Tensor, n: int) -> torch.Tensor:
    """Sum over the N groups of each group's mean squared error to the (already aligned) teacher map."""
    c_t = teacher.shape[1]
    total = torch.zeros((), dtype=torch.float64)
    for k in range(n):
        group = expanded[:, k * c_t:(k + 1) * c_t].double()
        total = total + ((group - teacher.double()) ** 2).mean()
    return total


def _max_pool_by_hand(t: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Adaptive max pooling as an explicit loop over output cells (PyTorch's floor/ceil bin edges)."""
    b, c, h, w = t.shape
    out = torch.empty(b, c, out_h, out_w, dtype=t.dtype)
    for i in range(out_h):
        h0, h1 = (i * h) // out_h, math.ceil((i + 1) * h / out_h)
        for j in range(out_w):
            w0, w1 = (j * w) // out_w, math.ceil((j + 1) * w / out_w)
            out[:, :, i, j] = t[:, :, h0:h1, w0:w1].amax(dim=(2, 3))
    return out


@pytest.mark.parametrize("n", [1, 2, 8])
def test_norm_loss_equals_sum_of_group_mse(n: int) -> None:
    c_t = 3
    expanded = torch.randn(4, n * c_t, 5, 5, generator=_gen(n))
    teacher = torch.randn(4, c_t, 5, 5, generator=_gen(n + 100)).relu()
    got = norm_loss(expanded, teacher, n)
    assert torch.allclose(got.double(), _brute_norm(expanded, teacher, n), rtol=1e-5)


def test_norm_loss_groups_are_not_interchangeable_with_channels() -> None:
    """Group k holds channels k*C_t..(k+1)*C_t-1: a map matching the teacher there scores zero."""
    teacher = torch.randn(2, 4, 3, 3, generator=_gen(1))
    assert norm_loss(teacher.repeat(1, 3, 1, 1), teacher, 3).item() == 0.0
    interleaved = teacher.repeat_interleave(3, dim=1)  # channel-wise tiling: wrong layout
    assert norm_loss(interleaved, teacher, 3).item() > 0.1


@pytest.mark.parametrize("t_hw,s_hw", [((8, 8), (4, 4)), ((7, 5), (3, 2)), ((6, 6), (6, 3))])
def test_norm_loss_max_pools_larger_teacher(t_hw: tuple[int, int], s_hw: tuple[int, int]) -> None:
    n, c_t = 2, 3
    teacher = torch.randn(2, c_t, *t_hw, generator=_gen(2))
    expanded = torch.randn(2, n * c_t, *s_hw, generator=_gen(3))
    pooled = _max_pool_by_hand(teacher, *s_hw)
    assert torch.equal(pooled, functional.adaptive_max_pool2d(teacher, s_hw))
    assert torch.allclose(norm_loss(expanded, teacher, n).double(), _brute_norm(expanded, pooled, n), rtol=1e-5)


def test_norm_loss_wrong_channel_count_raises() -> None:
    with pytest.raises(ValueError, match="channels"):
        norm_loss(torch.randn(1, 10, 2, 2), torch.randn(1, 3, 2, 2), n=3)


def test_norm_loss_teacher_smaller_than_student_raises() -> None:
    with pytest.raises(ValueError, match="smaller than the student"):
        norm_loss(torch.randn(1, 6, 4, 4), torch.randn(1, 3, 2, 4), n=2)


def test_norm_loss_gradient_reaches_expanded_only() -> None:
    expanded = torch.randn(2, 6, 3, 3, generator=_gen(4), requires_grad=True)
    teacher = torch.randn(2, 3, 3, 3, generator=_gen(5), requires_grad=True)
    loss = norm_loss(expanded, teacher, 2)
    loss.backward()
    assert teacher.grad is None
    # d/dx of sum_k mean((x_k - t)^2) = 2 (x - tile(t)) / numel(group)
    expected = 2 * (expanded.detach() - teacher.detach().repeat(1, 2, 1, 1)) / teacher.numel()
    assert torch.allclose(expanded.grad, expected, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_matches_hand_computation(temperature: float) -> None:
    s = torch.randn(5, 7, generator=_gen(6), dtype=torch.float64)
    t = torch.randn(5, 7, generator=_gen(7), dtype=torch.float64) * 3
    p_t = torch.exp(t / temperature) / torch.exp(t / temperature).sum(1, keepdim=True)
    p_s = torch.exp(s / temperature) / torch.exp(s / temperature).sum(1, keepdim=True)
    expected = (p_t * (p_t.log() - p_s.log())).sum() * temperature**2 / s.shape[0]
    assert torch.allclose(kd_loss(s, t, temperature), expected, rtol=1e-10)
    assert kd_loss(t, t, temperature).abs().item() < 1e-12


def test_kd_loss_gradient_not_into_teacher() -> None:
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    kd_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_standardize_logits() -> None:
    logits = torch.randn(6, 10, generator=_gen(8), dtype=torch.float64) * 5 + 3
    out = standardize_logits(logits, 2.5)
    mean = logits.mean(1, keepdim=True)
    std = logits.var(1, unbiased=False, keepdim=True).add(1e-7).sqrt()  # biased var + the authors' eps 1e-7
    assert torch.allclose(out, (logits - mean) / std * 2.5, atol=1e-10)
    assert torch.allclose(out.mean(1), torch.zeros(6, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(out.std(1, unbiased=False), torch.full((6,), 2.5, dtype=torch.float64), atol=1e-4)
    assert torch.equal(out.argmax(1), logits.argmax(1))


def test_standardize_logits_uses_the_authors_eps() -> None:
    """eps 1e-7 (the authors' helper/loops.py), not torch's default 1e-5: with logits of small spread the two
    differ visibly, and CE computed on them differs with them."""
    from models.losses import LOGIT_LN_EPS

    assert LOGIT_LN_EPS == 1e-7
    logits = torch.randn(8, 10, generator=_gen(10), dtype=torch.float64) * 1e-3  # variance ~1e-6: eps matters
    by_hand = (logits - logits.mean(1, keepdim=True)) / (logits.var(1, unbiased=False, keepdim=True) + 1e-7).sqrt()
    assert torch.allclose(standardize_logits(logits, 2.5), by_hand * 2.5, rtol=1e-12, atol=0)
    torch_default = functional.layer_norm(logits, (10,)) * 2.5  # eps 1e-5
    assert (standardize_logits(logits, 2.5) - torch_default).abs().max() > 1.0
    labels = torch.arange(8) % 10
    _, terms = distill_losses(logits, labels, alpha=0.0, logit_scale=2.5)
    assert torch.allclose(terms["ce"], functional.cross_entropy(by_hand * 2.5, labels), rtol=1e-12)


def _authors_weight(epoch: int) -> float:
    """The authors' CIFAR schedule over 240 epochs, written as they state it."""
    if epoch < 10:
        return 0.1
    if epoch < 20:
        return 0.5
    if epoch < 180:
        return 1.0
    if epoch < 210:
        return 0.5
    return 0.1


def test_norm_weight_reproduces_authors_schedule() -> None:
    schedule = DistillCfg().norm_schedule
    got = [norm_weight(e / 240, schedule) for e in range(240)]
    assert got == [_authors_weight(e) for e in range(240)]


def test_norm_weight_keeps_its_shape_on_short_runs() -> None:
    schedule = DistillCfg().norm_schedule
    got = [norm_weight(e / 24, schedule) for e in range(24)]
    assert got == [0.1] + [0.5] + [1.0] * 16 + [0.5] * 3 + [0.1] * 3
    assert norm_weight(1.5, schedule) == 0.1  # past the end: the last piece
    assert norm_weight(0.3, []) == 1.0


def _batch(n: int = 2, c_t: int = 3):
    g = _gen(9)
    logits = torch.randn(4, 5, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3])
    expanded = torch.randn(4, n * c_t, 2, 2, generator=g, requires_grad=True)
    tf = torch.randn(4, c_t, 4, 4, generator=g)
    tl = torch.randn(4, 5, generator=g)
    return logits, labels, expanded, tf, tl


def test_distill_losses_keys_and_weights() -> None:
    logits, labels, expanded, tf, tl = _batch()
    total, terms = distill_losses(logits, labels, expanded=expanded, teacher_features=tf, teacher_logits=tl, n=2,
                                  alpha=0.7, beta=0.3, gamma=0.5, norm_multiplier=0.1, temperature=4.0)
    assert set(terms) == {"ce", "kd", "norm"}
    assert torch.allclose(terms["ce"], 0.5 * functional.cross_entropy(logits, labels))
    assert torch.allclose(terms["kd"], 0.3 * kd_loss(logits, tl, 4.0))
    assert torch.allclose(terms["norm"], 0.7 * 0.1 * norm_loss(expanded, tf, 2))
    assert torch.allclose(total, terms["ce"] + terms["kd"] + terms["norm"])
    total.backward()
    assert logits.grad is not None and expanded.grad is not None


def test_distill_losses_norm_only_has_no_kd() -> None:
    logits, labels, expanded, tf, _ = _batch()
    total, terms = distill_losses(logits, labels, expanded=expanded, teacher_features=tf, n=2, beta=0.0)
    assert set(terms) == {"ce", "norm"}
    assert torch.allclose(total, functional.cross_entropy(logits, labels) + norm_loss(expanded, tf, 2))


def test_distill_losses_ce_only_and_standardized() -> None:
    logits, labels, _, _, tl = _batch()
    total, terms = distill_losses(logits, labels, alpha=1.0, beta=0.0)
    assert set(terms) == {"ce"}
    _, terms = distill_losses(logits, labels, teacher_logits=tl, beta=1.0, logit_scale=2.5)
    assert torch.allclose(terms["ce"], functional.cross_entropy(standardize_logits(logits, 2.5), labels))
    assert torch.allclose(terms["kd"], kd_loss(standardize_logits(logits, 2.5), standardize_logits(tl, 2.5)))


def test_distill_losses_missing_teacher_inputs_raise() -> None:
    logits, labels, expanded, _, _ = _batch()
    with pytest.raises(ValueError, match="teacher logits"):
        distill_losses(logits, labels, beta=0.5)
    with pytest.raises(ValueError, match="teacher features"):
        distill_losses(logits, labels, expanded=expanded, n=2)


def _norm_loss_with_repeat(expanded: torch.Tensor, teacher: torch.Tensor, n: int) -> torch.Tensor:
    """The formulation before issue 16: the teacher map materialised N times with ``repeat``."""
    from models.losses import align_teacher_features

    teacher = align_teacher_features(teacher, expanded.shape[-2:])
    return n * torch.nn.functional.mse_loss(expanded, teacher.detach().repeat(1, n, 1, 1).to(expanded.dtype))


@pytest.mark.parametrize("n, t_hw, channels_last, dtype", [
    (1, (4, 4), False, torch.float32), (8, (4, 4), False, torch.float32), (8, (8, 8), True, torch.float32),
    (3, (7, 7), True, torch.float32), (4, (4, 4), False, torch.float64)])
def test_norm_loss_broadcast_equals_the_repeat_formulation(n, t_hw, channels_last, dtype) -> None:
    g = torch.Generator().manual_seed(n)
    expanded = torch.randn(6, n * 5, 4, 4, generator=g, dtype=dtype)
    teacher = torch.randn(6, 5, *t_hw, generator=g, dtype=dtype)
    if channels_last:
        expanded = expanded.contiguous(memory_format=torch.channels_last)
        teacher = teacher.contiguous(memory_format=torch.channels_last)
    a = expanded.clone().requires_grad_(True)
    b = expanded.clone().requires_grad_(True)
    new, old = norm_loss(a, teacher, n), _norm_loss_with_repeat(b, teacher, n)
    new.backward()
    old.backward()
    eps = torch.finfo(dtype).eps
    assert abs(new.item() - old.item()) <= 4 * eps * abs(old.item())
    assert torch.allclose(a.grad, b.grad, rtol=4 * eps, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_norm_loss_gradient_keeps_the_expanded_maps_layout(channels_last) -> None:
    """The gradient keeps the expanded map's layout (NHWC stays NHWC for the FT's BatchNorm backward) and its
    values, whichever path the loss takes; the teacher map may come in either layout, larger or not."""
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    expanded = torch.randn(3, 4 * 6, 5, 5, generator=g).contiguous(memory_format=fmt).requires_grad_(True)
    for teacher in (torch.randn(3, 6, 5, 5, generator=g), torch.randn(3, 6, 10, 10, generator=g)):
        for t_fmt in (torch.contiguous_format, torch.channels_last):
            expanded.grad = None
            norm_loss(expanded, teacher.contiguous(memory_format=t_fmt), 4).backward()
            assert expanded.grad.is_contiguous(memory_format=fmt), (teacher.shape, t_fmt)
            assert torch.allclose(expanded.grad, _grad_by_repeat(expanded.detach(), teacher, 4), rtol=1e-5, atol=1e-7)


def _grad_by_repeat(expanded: torch.Tensor, teacher: torch.Tensor, n: int) -> torch.Tensor:
    e = expanded.clone().contiguous().requires_grad_(True)
    _norm_loss_with_repeat(e, teacher, n).backward()
    return e.grad
