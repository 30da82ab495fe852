"""Stage `baseline`: the student alone (CE, and KD when asked), with the same budget as distill.

It is what NORM is compared against in the report: same architecture, data, epochs and schedule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.losses import kd_loss, standardize_logits
from stages.lib import training as T
from stages.lib.checkpoints import load_model, save_model
from stages.lib.context import StageContext
from stages.lib.precision import resolve_amp, resolve_channels_last


def run(ctx: StageContext) -> dict:
    c = ctx.cfg.baseline
    name = ctx.cfg.student.model
    metrics: dict = {}
    for method in c.methods:
        p = T.prepare(ctx, c, ctx.cfg.student.seed)
        student = T.build(name, p.meta, "student.model")
        teacher = None
        if method == "kd":
            teacher, _ = load_model(ctx.artifact("teacher", "model"), "teacher checkpoint")
            teacher.to(p.device).eval().requires_grad_(False)
            if resolve_channels_last(c.channels_last, p.device, resolve_amp(c.amp, p.device).dtype).channels_last:
                teacher.to(memory_format=torch.channels_last)  # the student's layout (fit() resolves the same)
        step = _step(method, teacher, kd_weight=c.kd_weight, temperature=c.temperature,
                     scale=c.logit_scale if c.logit_standardize else None)
        out = ctx.out_dir / method
        m = T.fit(model=student, step=step, train=p.train, val=p.val, spec=T.TrainSpec.from_cfg(c), out_dir=out,
                  device=p.device, label=f"baseline {method} {name}", log=ctx.log)
        if ctx.is_main:
            save_model(out / "model.pt", student, name=name, num_classes=p.meta["num_classes"],
                       in_chans=p.meta["in_chans"], method=method)
            T.finish_checkpoints(out)
        metrics.update({f"{method}_{k}": v for k, v in m.items() if k in ("top1", "top5", "best_top1", "train_s")})
        metrics.update({k: v for k, v in m.items() if k.startswith(("amp", "channels_last"))})  # precision, layout, why
    return metrics


def _step(method: str, teacher, *, kd_weight: float, temperature: float, scale):
    def step(m, x, y, epoch):
        logits = m(x)
        z = standardize_logits(logits, scale) if scale else logits
        if method == "ce":
            return logits, {"ce": F.cross_entropy(z, y)}
        with torch.no_grad():
            t = teacher(x)
        t = standardize_logits(t, scale) if scale else t
        return logits, {"ce": (1 - kd_weight) * F.cross_entropy(z, y), "kd": kd_weight * kd_loss(z, t, temperature)}

    return step
