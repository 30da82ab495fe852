"""models/distillers.py: each distiller computes exactly the terms the stages' step closures computed before
(written out inline below as they were), keeps its teacher frozen, and gives the optimiser only what trains."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as functional

from models.distillers import CE, KD, NORM
from models.losses import distill_losses, kd_loss, norm_weight, standardize_logits
from models.norm import NormStudent
from models.registry import create_model
from tests.conftest import randomize_bn

SCHEDULE = [(0.5, 0.0), (0.75, 2.0), (1.0, 0.5)]
EPOCHS = 4


def _nets(seed: int = 0):
    torch.manual_seed(seed)
    teacher = create_model("resnet14", num_classes=10, in_chans=1)
    randomize_bn(teacher, 1)
    student = create_model("resnet8", num_classes=10, in_chans=1)
    return teacher.eval().requires_grad_(False), student


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)


# ----------------------------------------------------------------- the closures as the stages wrote them
def old_teacher_step(scale):
    def step(m, x, y, epoch):
        logits = m(x)
        z = standardize_logits(logits, scale) if scale else logits
        return logits, {"ce": functional.cross_entropy(z, y)}

    return step


def old_baseline_kd_step(teacher, *, kd_weight, temperature, scale):
    def step(m, x, y, epoch):
        logits = m(x)
        z = standardize_logits(logits, scale) if scale else logits
        with torch.no_grad():
            t = teacher(x)
        t = standardize_logits(t, scale) if scale else t
        return logits, {"ce": (1 - kd_weight) * functional.cross_entropy(z, y), "kd": kd_weight * kd_loss(z, t, temperature)}

    return step


def old_distill_step(teacher, *, n, alpha, beta, gamma, temperature, schedule, epochs, scale):
    def step(m, x, y, epoch):
        with torch.no_grad():
            tf = teacher.forward_features(x)
            tl = teacher.forward_head(tf) if beta > 0 else None
        logits, expanded = m(x)
        _, terms = distill_losses(logits, y, expanded=expanded, teacher_features=tf, teacher_logits=tl, n=n,
                                  alpha=alpha, beta=beta, gamma=gamma,
                                  norm_multiplier=norm_weight(epoch / epochs, schedule),
                                  temperature=temperature, logit_scale=scale)
        return logits, terms

    return step


def _same(got, want):
    (logits, terms), (ref_logits, ref_terms) = got, want
    assert torch.equal(logits, ref_logits)
    assert sorted(terms) == sorted(ref_terms)
    for k in terms:
        assert torch.equal(terms[k], ref_terms[k]), (k, terms[k], ref_terms[k])


def _norm_cfg(beta, scale):
    return dict(n=2, alpha=1.5, beta=beta, gamma=0.7, temperature=3.0, scale=scale)


# ----------------------------------------------------------------- terms on a fixed batch
@pytest.mark.parametrize("scale", [None, 2.5])
def test_ce_terms_equal_the_teacher_stage_closure(scale):
    _, student = _nets()
    x, y = _batch()
    d = CE(student, logit_scale=scale).train()
    _same(d.forward_train(x, y, 0), old_teacher_step(scale)(student, x, y, 0))


@pytest.mark.parametrize("scale", [None, 2.5])
def test_kd_terms_equal_the_baseline_stage_closure(scale):
    teacher, student = _nets()
    x, y = _batch()
    d = KD(student, teacher, kd_weight=0.8, temperature=3.0, logit_scale=scale).train()
    ref = old_baseline_kd_step(teacher, kd_weight=0.8, temperature=3.0, scale=scale)
    _same(d.forward_train(x, y, 0), ref(student, x, y, 0))


@pytest.mark.parametrize("beta, scale", [(0.0, None), (0.4, None), (0.4, 2.5)])
@pytest.mark.parametrize("epoch", [0, 2, 3])  # schedule pieces 0, 2 and 0.5
def test_norm_terms_equal_the_distill_stage_closure(beta, scale, epoch):
    teacher, student = _nets()
    x, y = _batch()
    c = _norm_cfg(beta, scale)
    d = NORM(student, teacher, epochs=EPOCHS, n=c["n"], alpha=c["alpha"], beta=beta, gamma=c["gamma"],
             temperature=c["temperature"], norm_schedule=SCHEDULE, logit_scale=scale).train()
    ns = d.trainable
    ref = old_distill_step(teacher, n=c["n"], alpha=c["alpha"], beta=beta, gamma=c["gamma"],
                           temperature=c["temperature"], schedule=SCHEDULE, epochs=EPOCHS, scale=scale)
    got = d.forward_train(x, y, epoch)
    _same(got, ref(ns, x, y, epoch))
    assert ("kd" in got[1]) is (beta > 0)
    assert d.norm_multiplier(epoch) == norm_weight(epoch / EPOCHS, SCHEDULE)


def test_forward_dispatches_on_the_mode():
    teacher, student = _nets()
    x, y = _batch()
    d = NORM(student, teacher, epochs=EPOCHS, n=2).train()
    logits, terms = d(x, y, 1)
    assert set(terms) == {"ce", "norm"} and logits.shape == (16, 10)
    d.eval()
    assert torch.equal(d(x), d.trainable(x)[0])


# ----------------------------------------------------------------- the teacher stays frozen, out of the way
@pytest.mark.parametrize("kind", ["kd", "norm"])
def test_teacher_is_frozen_in_eval_mode_and_outside_state_dict_and_optimiser(kind):
    teacher, student = _nets()
    teacher.train().requires_grad_(True)  # the distiller must freeze it whatever it is handed
    d = KD(student, teacher) if kind == "kd" else NORM(student, teacher, epochs=EPOCHS, n=2)
    d.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    stats = {k: v.clone() for k, v in teacher.state_dict().items()}
    x, y = _batch()
    d.forward_train(x, y, 2)[1]["ce"].backward()
    assert all(torch.equal(v, stats[k]) for k, v in teacher.state_dict().items()), "BatchNorm statistics moved"
    assert all(p.grad is None for p in teacher.parameters())

    teacher_ids = {id(p) for p in teacher.parameters()}
    learnable = d.learnable_parameters()
    assert learnable and not teacher_ids & {id(p) for p in learnable}
    assert {id(p) for p in d.parameters()} == {id(p) for p in learnable}  # DDP sees no teacher either
    want = (set(student.state_dict()) if kind == "kd" else
            {f"student.{k}" for k in student.state_dict()} | {f"ft.{k}" for k in d.trainable.ft.state_dict()})
    assert set(d.trainable.state_dict()) == want  # what fit() checkpoints
    assert len(d.state_dict()) == len(want)  # the distiller itself holds no teacher entries either
    teacher_ptrs = {t.data_ptr() for t in teacher.state_dict().values()}
    assert not any(t.data_ptr() in teacher_ptrs for t in d.state_dict().values())


def test_norm_learnable_parameters_are_the_student_and_its_ft():
    teacher, student = _nets()
    d = NORM(student, teacher, epochs=EPOCHS, n=2)
    assert isinstance(d.trainable, NormStudent) and d.student is student
    ids = [id(p) for p in d.learnable_parameters()]
    assert ids == [id(p) for p in d.trainable.parameters()]
    assert {id(p) for p in d.trainable.ft.parameters()} <= set(ids)
    assert {id(p) for p in student.parameters()} <= set(ids)
    assert len(ids) == len(list(student.parameters())) + len(list(d.trainable.ft.parameters()))


def test_ce_learnable_parameters_are_the_students():
    _, student = _nets()
    d = CE(student)
    assert [id(p) for p in d.learnable_parameters()] == [id(p) for p in student.parameters()]
    assert list(d.trainable.state_dict()) == list(student.state_dict())


def test_teacher_follows_the_student_memory_format():
    teacher, student = _nets()
    d = KD(student, teacher)
    conv = next(p for p in teacher.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1)
    assert not conv.is_contiguous(memory_format=torch.channels_last)
    d.to(memory_format=torch.channels_last)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in teacher.parameters() if p.dim() == 4)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in student.parameters() if p.dim() == 4)
    d.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in teacher.parameters())


# ----------------------------------------------------------------- training: the same weights, step for step
def _train(step_fn, params, steps=3):
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    for i in range(steps):
        x, y = _batch(10 + i)
        _, terms = step_fn(x, y, i)
        loss = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@pytest.mark.parametrize("kind", ["ce", "kd", "norm"])
def test_training_through_a_distiller_gives_the_closures_weights_bit_for_bit(kind):
    teacher, student = _nets()
    if kind == "ce":
        d, make_ref = CE(student, logit_scale=2.5), lambda t, m: (m, old_teacher_step(2.5))
    elif kind == "kd":
        d = KD(student, teacher, kd_weight=0.8, temperature=3.0, logit_scale=2.5)
        make_ref = lambda t, m: (m, old_baseline_kd_step(t, kd_weight=0.8, temperature=3.0, scale=2.5))  # noqa: E731
    else:
        d = NORM(student, teacher, epochs=EPOCHS, n=2, alpha=1.5, beta=0.3, gamma=0.7, temperature=3.0,
                 norm_schedule=SCHEDULE, logit_scale=2.5)
        make_ref = lambda t, m: (m, old_distill_step(t, n=2, alpha=1.5, beta=0.3, gamma=0.7, temperature=3.0,  # noqa: E731
                                                     schedule=SCHEDULE, epochs=EPOCHS, scale=2.5))
    ref_model, ref_step = make_ref(copy.deepcopy(teacher), copy.deepcopy(d.trainable))
    ref_model.train()
    _train(lambda x, y, e: ref_step(ref_model, x, y, e), ref_model.parameters())
    d.train()
    _train(lambda x, y, e: d(x, y, e), d.learnable_parameters())
    want = ref_model.state_dict()
    got = d.trainable.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
