"""Stage `distill`: train the NORM student (FT after the last stage; N groups matched to the teacher).

Loss = gamma*CE + beta*KD + alpha*w(epoch)*NORM, as in the paper and the authors' training loop
(docs/method.md; the objective is models.distillers.NORM). Writes the unmerged student with its FT
(norm_student.pt); the `merge` stage folds the FT away.
"""
from __future__ import annotations

from models.distillers import NORM
from stages.lib import training
from stages.lib.checkpoints import load_model, save_norm_student
from stages.lib.context import StageContext


def run(ctx: StageContext) -> dict:
    c = ctx.cfg.distill
    name = ctx.cfg.student.model
    p = training.prepare(ctx, c, ctx.cfg.student.seed)
    teacher, tmeta = load_model(ctx.artifact("teacher", "model"), "teacher checkpoint")
    student = training.build(name, p.meta, "student.model")
    distiller = NORM(student, teacher, epochs=c.epochs, n=c.n, residual=c.residual, alpha=c.alpha, beta=c.beta,
                     gamma=c.gamma, temperature=c.temperature, norm_schedule=c.norm_schedule,
                     logit_scale=c.logit_scale if c.logit_standardize else None)
    m = training.fit(distiller=distiller, train=p.train, val=p.val, spec=training.TrainSpec.from_cfg(c),
                     out_dir=ctx.out_dir, device=p.device, label=f"NORM {name} <- {tmeta['model']}", log=ctx.log,
                     extra_row=lambda e: {"norm_weight": c.alpha * distiller.norm_multiplier(e)})
    ns = distiller.trainable
    if ctx.is_main:
        save_norm_student(ctx.out_dir / "norm_student.pt", ns, name=name, num_classes=p.meta["num_classes"],
                          in_chans=p.meta["in_chans"], teacher=tmeta["model"])
        training.finish_checkpoints(ctx.out_dir)
    ft_params = sum(q.numel() for q in ns.ft.parameters())
    return {**m, "n": c.n, "residual": c.residual, "ft_params": ft_params,
            "student_params": sum(q.numel() for q in student.parameters())}
