"""How stages wire the maths together: values a stage hands to models/ are the ones its config asks for.

The maths itself (losses, schedule function, merge) has its own tests in tests/models; these check that the
stage calls it with the right arguments, epoch by epoch, and that the artifacts show it.
"""
from __future__ import annotations

import csv

import pytest

# (end fraction, multiplier) pieces over 4 epochs: epochs 1-2 no NORM term, epoch 3 x2, epoch 4 x0.5
SCHEDULE = [(0.5, 0.0), (0.75, 2.0), (1.0, 0.5)]
ALPHA = 1.5
EXPECTED_WEIGHT = [0.0, 0.0, ALPHA * 2.0, ALPHA * 0.5]  # alpha * the schedule's piece for epoch/epochs


def test_distill_applies_the_norm_schedule_epoch_by_epoch(make_ctx, upstream, monkeypatch):
    import models.distillers as distillers
    from pipeline.graph import stage_module

    distill = stage_module("distill")

    cfg = upstream["cfg"]
    cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update=dict(
        epochs=4, batch_size=128, lr=0.05, alpha=ALPHA, norm_schedule=SCHEDULE))})
    current: dict[str, int] = {}
    applied: dict[int, set[float]] = {}
    real_forward, real_losses = distillers.NORM.forward_train, distillers.distill_losses

    def forward_train(self, x, y, epoch):  # the epoch fit() hands the distiller
        current["epoch"] = epoch
        return real_forward(self, x, y, epoch)

    def losses(*a, **kw):
        applied.setdefault(current["epoch"], set()).add(kw["alpha"] * kw["norm_multiplier"])
        return real_losses(*a, **kw)

    monkeypatch.setattr(distillers.NORM, "forward_train", forward_train)
    monkeypatch.setattr(distillers, "distill_losses", losses)
    ctx = make_ctx("distill", cfg=cfg)
    metrics = distill.run(ctx)

    assert metrics["epochs"] == 4
    assert {e: sorted(w) for e, w in applied.items()} == {e: [pytest.approx(w)] for e, w in enumerate(EXPECTED_WEIGHT)}
    with open(ctx.out_dir / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["norm_weight"]) for r in rows] == pytest.approx(EXPECTED_WEIGHT)
    norm_terms = [float(r["train_norm"]) for r in rows]  # the weighted NORM term the optimiser saw
    assert norm_terms[:2] == [0.0, 0.0] and all(t > 0 for t in norm_terms[2:]), norm_terms


@pytest.mark.parametrize("stage", ["teacher", "baseline", "distill"])
def test_training_stages_pass_val_every_to_fit(make_ctx, upstream, stage):
    """``<stage>.val_every: 0`` reaches fit(): validation columns only in the last epoch's history row."""
    from pipeline.graph import stage_module

    cfg = upstream["cfg"]
    section = getattr(cfg, stage).model_copy(update=dict(epochs=2, batch_size=128, val_every=0))
    cfg = cfg.model_copy(update={stage: section})
    ctx = make_ctx(stage, cfg=cfg)
    stage_module(stage).run(ctx)
    history = ctx.out_dir / ("ce/history.csv" if stage == "baseline" else "history.csv")
    with open(history, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["val_top1"] != "" for r in rows] == [False, True]
