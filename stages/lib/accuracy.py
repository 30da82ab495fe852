"""The one summary of the run's validation accuracies: teacher, baselines, NORM, merged (top-1, 0..1).

Read from the stage records' metrics, so the terminal table (pipeline/session.py), summary.json and the report
(pipeline/report.py) and the bundle's manifest (stages/bundle.py) show the same figures under the same rules.
"""
from __future__ import annotations

from typing import Callable, Optional

# (summary key, stage, metric in that stage's record)
TOP1: tuple[tuple[str, str, str], ...] = (
    ("teacher_top1", "teacher", "top1"), ("baseline_ce_top1", "baseline", "ce_top1"),
    ("baseline_kd_top1", "baseline", "kd_top1"), ("norm_top1", "distill", "top1"),
    ("norm_best_top1", "distill", "best_top1"), ("merged_top1", "verify", "merged_top1"))
# the terminal's names for the figures it prints (the best-epoch figure is left to the report)
LABELS = {"teacher_top1": "teacher", "baseline_ce_top1": "baseline CE", "baseline_kd_top1": "baseline KD",
          "norm_top1": "NORM", "merged_top1": "merged"}


def accuracy_summary(metrics: Callable[[str], dict]) -> dict[str, Optional[float]]:
    """Every key of ``TOP1``, None where the stage has not finished or did not measure it.

    ``metrics(stage)``: the metrics of a finished stage, ``{}`` for one that is missing or skipped."""
    return {key: (metrics(stage) or {}).get(metric) for key, stage, metric in TOP1}


def manifest_accuracies(metrics: Callable[[str], dict]) -> dict:
    """The bundle manifest's ``accuracy``: the summary under the manifest's names plus the verify/export/engine
    figures; absent stages are left out."""
    acc = accuracy_summary(metrics)
    out = {"teacher_top1": acc["teacher_top1"], "baseline_ce_top1": acc["baseline_ce_top1"],
           "baseline_kd_top1": acc["baseline_kd_top1"], "distill_top1": acc["norm_top1"],  # the manifest's names
           "distill_best_top1": acc["norm_best_top1"], "verify": metrics("verify") or None,
           "export": {k: v for k, v in (metrics("export") or {}).items() if not k.endswith("_bytes")} or None,
           "engine": {k: v for k, v in (metrics("engine") or {}).items()
                      if k.endswith(("top1", "agreement", "diff", "_ok"))} or None}
    return {k: v for k, v in out.items() if v is not None}
