"""One accuracy summary (stages/lib/accuracy.py) behind the terminal table, summary.json and the bundle manifest."""
from __future__ import annotations

import json

from pipeline.config import load_config
from pipeline.report import Run, build_summary
from pipeline.runner import Runner
from pipeline.session import accuracy_summary as terminal_summary
from stages.lib.accuracy import TOP1, accuracy_summary, manifest_accuracies
from stages.lib.context import StageContext

METRICS = {"teacher": {"top1": 0.91, "top5": 0.99}, "baseline": {"ce_top1": 0.83, "kd_top1": 0.845},
           "distill": {"top1": 0.862, "best_top1": 0.87}, "verify": {"merged_top1": 0.8625, "top1_agreement": 1.0}}


def _run_dir(tmp_path, skipped=("baseline",)):
    for stage, m in METRICS.items():
        (tmp_path / stage).mkdir()
        status = "skipped" if stage in skipped else "done"
        rec = {"stage": stage, "status": status, "metrics": {} if status == "skipped" else m, "reason": "asked to"}
        (tmp_path / stage / "record.json").write_text(json.dumps(rec))
    return tmp_path


def test_summary_reads_each_figure_from_its_stage():
    acc = accuracy_summary(lambda s: METRICS.get(s, {}))
    assert acc == {"teacher_top1": 0.91, "baseline_ce_top1": 0.83, "baseline_kd_top1": 0.845, "norm_top1": 0.862,
                   "norm_best_top1": 0.87, "merged_top1": 0.8625}
    assert accuracy_summary(lambda s: {}) == {key: None for key, _, _ in TOP1}


def test_terminal_report_and_manifest_show_the_same_figures(tmp_path):
    run_dir = _run_dir(tmp_path)  # baseline skipped: absent everywhere, never a stale figure
    expected = {"teacher_top1": 0.91, "baseline_ce_top1": None, "baseline_kd_top1": None, "norm_top1": 0.862,
                "norm_best_top1": 0.87, "merged_top1": 0.8625}
    assert build_summary(Run.load(run_dir))["accuracy"] == expected
    assert terminal_summary(Runner(load_config(None, []), run_dir, log=lambda m: None)) == {
        "teacher": 0.91, "NORM": 0.862, "merged": 0.8625}
    records = {s: json.loads((run_dir / s / "record.json").read_text()) for s in METRICS}
    ctx = StageContext(name="bundle", out_dir=tmp_path / "out", run_dir=run_dir, cfg=None,
                       inputs={s: run_dir / s for s in METRICS}, input_records=records)
    man = manifest_accuracies(ctx.input_metrics)
    assert {k: man.get(k) for k in ("teacher_top1", "baseline_ce_top1", "distill_top1", "distill_best_top1")} == {
        "teacher_top1": 0.91, "baseline_ce_top1": None, "distill_top1": 0.862, "distill_best_top1": 0.87}
    assert man["verify"]["merged_top1"] == 0.8625 and list(man)[:3] == ["teacher_top1", "distill_top1", "distill_best_top1"]
