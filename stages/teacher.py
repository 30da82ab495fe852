"""Stage `teacher`: train the teacher with plain cross-entropy, or import a checkpoint trained elsewhere."""
from __future__ import annotations

from models.distillers import CE
from stages.lib import training
from stages.lib.checkpoints import import_teacher, save_model
from stages.lib.context import StageContext


def run(ctx: StageContext) -> dict:
    c = ctx.cfg.teacher
    p = training.prepare(ctx, c, ctx.cfg.run.seed)
    model = training.build(c.model, p.meta, "teacher.model")
    common = dict(name=c.model, num_classes=p.meta["num_classes"], in_chans=p.meta["in_chans"])
    if c.checkpoint is not None:
        import_teacher(c.checkpoint, model, c.model)
        model.to(p.device)
        ev = training.evaluate(model, p.val, device=p.device)
        ctx.log(f"imported teacher {c.model} from {c.checkpoint}: val top-1 {ev['top1']:.4f}")
        if ctx.is_main:
            save_model(ctx.out_dir / "model.pt", model, source=str(c.checkpoint), **common)
        return {"top1": ev["top1"], "top5": ev["top5"], "imported": True, "params": _params(model)}

    distiller = CE(model, logit_scale=c.logit_scale if c.logit_standardize else None)
    metrics = training.fit(distiller=distiller, train=p.train, val=p.val, spec=training.TrainSpec.from_cfg(c),
                           out_dir=ctx.out_dir, device=p.device, label=f"teacher {c.model}", log=ctx.log)
    if ctx.is_main:
        save_model(ctx.out_dir / "model.pt", model, **common)
        training.finish_checkpoints(ctx.out_dir)
    return {**metrics, "imported": False, "params": _params(model)}


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())
