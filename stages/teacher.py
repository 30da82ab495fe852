"""Stage `teacher`: train the teacher with plain cross-entropy, or import a checkpoint trained elsewhere."""
from __future__ import annotations

import torch.nn.functional as F

from models.losses import standardize_logits
from stages.lib import training as T
from stages.lib.checkpoints import import_teacher, save_model
from stages.lib.context import StageContext


def run(ctx: StageContext) -> dict:
    c = ctx.cfg.teacher
    p = T.prepare(ctx, c, ctx.cfg.run.seed)
    model = T.build(c.model, p.meta, "teacher.model")
    common = dict(name=c.model, num_classes=p.meta["num_classes"], in_chans=p.meta["in_chans"])
    if c.checkpoint is not None:
        import_teacher(c.checkpoint, model, c.model)
        model.to(p.device)
        ev = T.evaluate(model, p.val, device=p.device)
        ctx.log(f"imported teacher {c.model} from {c.checkpoint}: val top-1 {ev['top1']:.4f}")
        if ctx.is_main:
            save_model(ctx.out_dir / "model.pt", model, source=str(c.checkpoint), **common)
        return {"top1": ev["top1"], "top5": ev["top5"], "imported": True, "params": _params(model)}

    scale = c.logit_scale if c.logit_standardize else None

    def step(m, x, y, epoch):
        logits = m(x)
        z = standardize_logits(logits, scale) if scale else logits
        return logits, {"ce": F.cross_entropy(z, y)}

    metrics = T.fit(model=model, step=step, train=p.train, val=p.val, spec=T.TrainSpec.from_cfg(c),
                    out_dir=ctx.out_dir, device=p.device, label=f"teacher {c.model}", log=ctx.log)
    if ctx.is_main:
        save_model(ctx.out_dir / "model.pt", model, **common)
        T.finish_checkpoints(ctx.out_dir)
    return {**metrics, "imported": False, "params": _params(model)}


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())
