"""Stage `distill`: train the NORM student (FT after the last stage; N groups matched to the teacher).

Loss = gamma*CE + beta*KD + alpha*w(epoch)*NORM, as in the paper and the authors' training loop
(docs/method.md). Writes the unmerged student with its FT (norm_student.pt); the `merge` stage folds the FT away.
"""
from __future__ import annotations

import torch

from models.losses import distill_losses, norm_weight
from models.norm import NormStudent
from stages.lib import training as T
from stages.lib.checkpoints import load_model, save_norm_student
from stages.lib.context import StageContext
from stages.lib.precision import resolve_amp, resolve_channels_last


def run(ctx: StageContext) -> dict:
    c = ctx.cfg.distill
    name = ctx.cfg.student.model
    p = T.prepare(ctx, c, ctx.cfg.student.seed)
    teacher, tmeta = load_model(ctx.artifact("teacher", "model"), "teacher checkpoint")
    teacher.to(p.device).eval().requires_grad_(False)
    if resolve_channels_last(c.channels_last, p.device, resolve_amp(c.amp, p.device).dtype).channels_last:
        teacher.to(memory_format=torch.channels_last)  # the same layout as the student fit() trains
    student = T.build(name, p.meta, "student.model")
    ns = NormStudent(student, teacher.num_features, n=c.n, residual=c.residual)
    scale = c.logit_scale if c.logit_standardize else None

    def step(m, x, y, epoch):
        with torch.no_grad():
            tf = teacher.forward_features(x)
            tl = teacher.forward_head(tf) if c.beta > 0 else None
        logits, expanded = m(x)
        _, terms = distill_losses(logits, y, expanded=expanded, teacher_features=tf, teacher_logits=tl, n=c.n,
                                  alpha=c.alpha, beta=c.beta, gamma=c.gamma,
                                  norm_multiplier=norm_weight(epoch / c.epochs, c.norm_schedule),
                                  temperature=c.temperature, logit_scale=scale)
        return logits, terms

    m = T.fit(model=ns, step=step, train=p.train, val=p.val, spec=T.TrainSpec.from_cfg(c), out_dir=ctx.out_dir,
              device=p.device, label=f"NORM {name} <- {tmeta['model']}", log=ctx.log,
              eval_forward=lambda x: ns(x)[0],
              extra_row=lambda e: {"norm_weight": c.alpha * norm_weight(e / c.epochs, c.norm_schedule)})
    if ctx.is_main:
        save_norm_student(ctx.out_dir / "norm_student.pt", ns, name=name, num_classes=p.meta["num_classes"],
                          in_chans=p.meta["in_chans"], teacher=tmeta["model"])
        T.finish_checkpoints(ctx.out_dir)
    ft_params = sum(q.numel() for q in ns.ft.parameters())
    return {**m, "n": c.n, "residual": c.residual, "ft_params": ft_params,
            "student_params": sum(q.numel() for q in student.parameters())}
