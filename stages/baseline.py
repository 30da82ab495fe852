"""Stage `baseline`: the student alone (CE, and KD when asked), with the same budget as distill.

It is what NORM is compared against in the report: same architecture, data, epochs and schedule.
"""
from __future__ import annotations

from models.distillers import CE, KD
from stages.lib import training
from stages.lib.checkpoints import load_model, save_model
from stages.lib.context import StageContext


def run(ctx: StageContext) -> dict:
    c = ctx.cfg.baseline
    name = ctx.cfg.student.model
    scale = c.logit_scale if c.logit_standardize else None
    metrics: dict = {}
    for method in c.methods:
        p = training.prepare(ctx, c, ctx.cfg.student.seed)
        student = training.build(name, p.meta, "student.model")
        if method == "kd":  # the frozen teacher runs in the student's device and memory format (fit() moves both)
            teacher, _ = load_model(ctx.artifact("teacher", "model"), "teacher checkpoint")
            distiller = KD(student, teacher, kd_weight=c.kd_weight, temperature=c.temperature, logit_scale=scale)
        else:
            distiller = CE(student, logit_scale=scale)
        out = ctx.out_dir / method
        m = training.fit(distiller=distiller, train=p.train, val=p.val, spec=training.TrainSpec.from_cfg(c),
                         out_dir=out, device=p.device, label=f"baseline {method} {name}", log=ctx.log)
        if ctx.is_main:
            save_model(out / "model.pt", student, name=name, num_classes=p.meta["num_classes"],
                       in_chans=p.meta["in_chans"], method=method)
            training.finish_checkpoints(out)
        metrics.update({f"{method}_{k}": v for k, v in m.items() if k in ("top1", "top5", "best_top1", "train_s")})
        metrics.update({k: v for k, v in m.items() if k.startswith(("amp", "channels_last"))})  # precision, layout, why
    return metrics
