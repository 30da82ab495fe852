"""The teacher, baseline and distill stages train exactly the weights their former step closures trained.

Each stage runs as the pipeline runs it; the reference repeats the stage's old code path (same seed, same
model construction order) with the old closure, written out here, wrapped as a distiller for fit(). Equal
state dicts, tensor for tensor: the refactor into models/distillers.py changed no result.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as functional

from models.distillers import Distiller
from models.losses import distill_losses, kd_loss, norm_weight, standardize_logits
from models.norm import NormStudent
from stages.lib import training
from stages.lib.checkpoints import load_model

SCALE = 2.5


class Closure(Distiller):
    """fit()'s old interface: ``step(model, x, y, epoch) -> (logits, terms)`` on ``module``."""

    def __init__(self, module, step, teacher=None):
        super().__init__(teacher)
        self.student, self.step = module, step

    def forward_train(self, x, y, epoch):
        return self.step(self.student, x, y, epoch)

    def forward_test(self, x):
        out = self.student(x)
        return out[0] if isinstance(out, tuple) else out


def _cfg(upstream, section: str, **update):
    cfg = upstream["cfg"]
    common = {"epochs": 2, "batch_size": 128, "lr": 0.05, "logit_standardize": True, "logit_scale": SCALE}
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update={**common, **update})})


def _reference_ctx(ctx, tmp_path):
    out = tmp_path / "reference"
    out.mkdir()
    return dataclasses.replace(ctx, out_dir=out)


def _fit(ctx, c, distiller, p):
    training.fit(distiller=distiller, train=p.train, val=p.val, spec=training.TrainSpec.from_cfg(c),
                 out_dir=ctx.out_dir, device=p.device, label="reference", log=lambda m: None)


def _assert_same(saved_path, module):
    state = torch.load(saved_path, weights_only=True)["state_dict"]
    want = module.state_dict()
    assert list(state) == list(want)
    for k, v in want.items():
        assert torch.equal(state[k], v), k


def test_teacher_stage_weights_equal_the_old_closures(make_ctx, upstream, tmp_path):
    from pipeline.graph import stage_module

    cfg = _cfg(upstream, "teacher", model="resnet8")
    ctx = make_ctx("teacher", cfg=cfg)
    stage_module("teacher").run(ctx)

    ref = _reference_ctx(ctx, tmp_path)
    c = ref.cfg.teacher
    p = training.prepare(ref, c, ref.cfg.run.seed)
    model = training.build(c.model, p.meta, "teacher.model")

    def step(m, x, y, epoch):
        logits = m(x)
        z = standardize_logits(logits, SCALE)
        return logits, {"ce": functional.cross_entropy(z, y)}

    _fit(ref, c, Closure(model, step), p)
    _assert_same(ctx.out_dir / "model.pt", model)


def test_baseline_kd_stage_weights_equal_the_old_closures(make_ctx, upstream, tmp_path):
    from pipeline.graph import stage_module

    cfg = _cfg(upstream, "baseline", methods=["kd"], kd_weight=0.7, temperature=3.0)
    ctx = make_ctx("baseline", cfg=cfg)
    stage_module("baseline").run(ctx)

    ref = _reference_ctx(ctx, tmp_path)
    c = ref.cfg.baseline
    p = training.prepare(ref, c, ref.cfg.student.seed)
    student = training.build(ref.cfg.student.model, p.meta, "student.model")
    teacher, _ = load_model(ref.input("teacher") / "model.pt", "teacher checkpoint")

    def step(m, x, y, epoch):
        logits = m(x)
        z = standardize_logits(logits, SCALE)
        with torch.no_grad():
            t = teacher(x)
        t = standardize_logits(t, SCALE)
        return logits, {"ce": 0.3 * functional.cross_entropy(z, y), "kd": 0.7 * kd_loss(z, t, 3.0)}

    _fit(ref, c, Closure(student, step, teacher), p)
    _assert_same(ctx.out_dir / "kd" / "model.pt", student)


def test_distill_stage_weights_equal_the_old_closures(make_ctx, upstream, tmp_path):
    from pipeline.graph import stage_module

    beta = 0.4  # NORM + KD: every term (NORM alone is covered term by term in tests/models/test_distillers.py)
    schedule = [(0.5, 0.5), (1.0, 2.0)]
    cfg = _cfg(upstream, "distill", alpha=1.5, beta=beta, gamma=0.8, temperature=3.0, norm_schedule=schedule)
    ctx = make_ctx("distill", cfg=cfg)
    stage_module("distill").run(ctx)

    ref = _reference_ctx(ctx, tmp_path)
    c = ref.cfg.distill
    p = training.prepare(ref, c, ref.cfg.student.seed)
    teacher, _ = load_model(ref.input("teacher") / "model.pt", "teacher checkpoint")
    ns = NormStudent(training.build(ref.cfg.student.model, p.meta, "student.model"), teacher.num_features, n=c.n,
                     residual=c.residual)

    def step(m, x, y, epoch):
        with torch.no_grad():
            tf = teacher.forward_features(x)
            tl = teacher.forward_head(tf) if beta > 0 else None
        logits, expanded = m(x)
        _, terms = distill_losses(logits, y, expanded=expanded, teacher_features=tf, teacher_logits=tl, n=c.n,
                                  alpha=1.5, beta=beta, gamma=0.8, norm_multiplier=norm_weight(epoch / 2, schedule),
                                  temperature=3.0, logit_scale=SCALE)
        return logits, terms

    _fit(ref, c, Closure(ns, step, teacher), p)
    _assert_same(ctx.out_dir / "norm_student.pt", ns)
