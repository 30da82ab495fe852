"""report.html / summary.json / `norm-pipeline report` on a real (tiny) end-to-end run.

The run is made once per module by ``run_pipeline`` itself, so the report under test is the one a user gets;
every assertion compares the page with figures read back from the stage records and artifacts.
"""
from __future__ import annotations

import base64
import html
import json
import re
import shutil
from pathlib import Path

import pytest

from pipeline import graph
from pipeline.config import load_config
from stages.lib.io import sha256_file

TINY = ["data.train_limit=128", "data.val_limit=64", "verify.fp64_samples=32", "teacher.model=resnet8", "student.model=resnet8", "distill.n=2", "data.eval_batch_size=64",
        *[f"{s}.{k}" for s in ("teacher", "baseline", "distill") for k in ("epochs=1", "batch_size=64", "lr=0.05")],
        "export.parity_samples=32", "benchmark.blocks=2", "benchmark.block_runs=1", "benchmark.warmup=1", "benchmark.max_seconds=1",
        "benchmark.batch_sizes=[1]", "benchmark.bootstrap=100", "benchmark.multithreaded=false",
        "benchmark.backends=[torch,onnxruntime]", "bundle.fp16_onnx=false", "quantize.blocks=2", "quantize.block_runs=1",
        "quantize.warmup=0", "quantize.batch_sizes=[2]", "quantize.bootstrap=100", "quantize.calibration_samples=32"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_data_root) -> Path:
    from pipeline.session import run_pipeline

    path = tmp_path_factory.mktemp("report-run")
    cfg = load_config(None, [f"data.root={tiny_data_root}", *TINY])
    results = run_pipeline(cfg, path)
    assert [r.name for r in results] == graph.ORDER
    return path


def _records(run_dir: Path) -> dict[str, dict]:
    return {n: json.loads((run_dir / n / "record.json").read_text()) for n in graph.ORDER}


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def test_run_writes_a_report_with_the_records_figures(run_dir):
    page = html.unescape((run_dir / "report.html").read_text())
    rec = _records(run_dir)
    m = {n: r["metrics"] for n, r in rec.items()}
    expected = {
        "teacher top-1": _pct(m["teacher"]["top1"]), "baseline CE top-1": _pct(m["baseline"]["ce_top1"]),
        "NORM top-1": _pct(m["distill"]["top1"]), "merged top-1": _pct(m["verify"]["merged_top1"]),
        "NORM delta": f"{(m['distill']['top1'] - m['baseline']['ce_top1']) * 100:+.2f} pts",
        "fp32 max rel diff": f"{m['verify']['fp32_max_rel_diff']:.2e}",
        "fp64 max rel diff": f"{m['verify']['fp64_max_rel_diff']:.2e}",
        "ORT max abs diff": f"{m['export']['ort_max_abs_diff']:.2e}",
        "merged/vanilla CI": f"{m['benchmark']['merged_vs_vanilla_ratio']:.3f} [{m['benchmark']['merged_vs_vanilla_lo']:.3f}, "
                             f"{m['benchmark']['merged_vs_vanilla_hi']:.3f}]",
        "A/A CI": f"{m['benchmark']['aa_ratio']:.3f} [{m['benchmark']['aa_lo']:.3f}, {m['benchmark']['aa_hi']:.3f}]",
        "cost verdict reason": m["benchmark"]["verdict_reason"],
        "bundle tar sha256": m["bundle"]["tar_sha256"],
        "engine skip reason": rec["engine"]["reason"],
    }
    missing = {k: v for k, v in expected.items() if v not in page}
    assert not missing, f"figures from the records absent from report.html: {missing}"
    manifest = json.loads((run_dir / "bundle" / "bundle" / "manifest.json").read_text())
    for name, f in manifest["files"].items():
        assert f["sha256"] in page and name in page
    for name, r in rec.items():
        assert r["fingerprint"][:12] in page, name
    for section in ("Configuration", "Training curves", "Accuracy", "Merge verification", "ONNX and TensorRT",
                    "Inference latency", "Edge bundle", "Stages"):
        assert f">{section}" in page


def test_report_is_self_contained(run_dir):
    page = (run_dir / "report.html").read_text()
    sources = re.findall(r'\bsrc="([^"]*)"', page)
    assert len(sources) >= 3  # training curves, latency ratios, the benchmark stage's latency.png
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:|//)""", page)
    assert "@import" not in page and not re.search(r"url\(\s*['\"]?(?:https?:|//)", page)
    assert "<link" not in page and "<script" not in page


def test_summary_json_matches_the_records(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    rec = _records(run_dir)
    m = {n: r["metrics"] for n, r in rec.items()}
    assert s["accuracy"] == {"teacher_top1": m["teacher"]["top1"], "baseline_ce_top1": m["baseline"]["ce_top1"],
                             "baseline_kd_top1": None, "norm_top1": m["distill"]["top1"],
                             "norm_best_top1": m["distill"]["best_top1"], "merged_top1": m["verify"]["merged_top1"]}
    assert s["verdicts"]["norm_vs_baseline_ce_pts"] == pytest.approx((m["distill"]["top1"] - m["baseline"]["ce_top1"]) * 100)
    assert s["verdicts"]["merge_exact"] is True and s["verify"]["passed"] is True
    for k in ("fp32_max_rel_diff", "fp64_max_rel_diff", "top1_agreement", "params_equal", "flops_equal"):
        assert s["verify"][k] == m["verify"][k]
    for k in ("ort_max_abs_diff", "graph_identical", "ort_parity_ok"):
        assert s["export"][k] == m["export"][k]
    for k in ("merged_vs_vanilla_ratio", "merged_vs_vanilla_lo", "merged_vs_vanilla_hi", "aa_ratio", "verdict", "band"):
        assert s["latency"][k] == m["benchmark"][k]
    assert s["verdicts"]["cost_unchanged"] is {"yes": True, "no": False}.get(m["benchmark"]["verdict"])
    assert m["benchmark"]["verdict"] in ("yes", "no", "inconclusive")
    for k in ("verdict_reason", "verdict_power", "unmerged_verdict", "verdict_rounds"):
        assert s["latency"][k] == m["benchmark"][k]
    tar = run_dir / "bundle" / "bundle.tar.gz"
    assert s["bundle"]["tar"] == str(tar) and s["bundle"]["tar_sha256"] == m["bundle"]["tar_sha256"] == sha256_file(tar)
    assert s["engine"] == {"status": "skipped", "reason": rec["engine"]["reason"]}
    assert {n: st["status"] for n, st in s["stages"].items()} == {n: r["status"] for n, r in rec.items()}
    assert s["stages"]["verify"]["fingerprint"] == rec["verify"]["fingerprint"]


def test_cost_verdict_with_reason_in_terminal_summary_and_status(run_dir, tiny_data_root):
    """Every view shows the record's three-valued answer with the same one-line reason."""
    import os

    from click.testing import CliRunner
    from rich.console import Console

    from pipeline.cli import main
    from pipeline.report import terminal_summary

    m = _records(run_dir)["benchmark"]["metrics"]
    assert m["verdict"] in ("yes", "no", "inconclusive") and m["verdict_reason"] and "\n" not in m["verdict_reason"]
    console = Console(width=400, record=True)
    console.print(terminal_summary(json.loads((run_dir / "summary.json").read_text())))
    row = next(ln for ln in console.export_text().splitlines() if ln.lstrip().startswith("cost unchanged"))
    assert m["verdict"] in row and m["verdict_reason"] in row
    env = {"COLUMNS": "400"}
    args = ["status", "--run-dir", str(run_dir), "--set", f"data.root={tiny_data_root}"]
    for o in TINY:
        args += ["--set", o]
    res = CliRunner().invoke(main, args, env={**os.environ, **env})
    line = next(ln for ln in res.output.splitlines() if "benchmark" in ln)
    assert f"verdict={m['verdict']}" in line and m["verdict_reason"] in line, res.output


def test_partial_run_renders_with_not_run_notes(run_dir, tmp_path):
    from pipeline.report import write_report

    for stage in ("data", "teacher"):
        shutil.copytree(run_dir / stage, tmp_path / stage)
    shutil.copy(run_dir / "config.yaml", tmp_path / "config.yaml")
    page = write_report(tmp_path).read_text()
    teacher_top1 = json.loads((tmp_path / "teacher" / "record.json").read_text())["metrics"]["top1"]
    assert _pct(teacher_top1) in page and "data:image/png;base64," in page  # the teacher's curves
    for stage in ("baseline", "verify", "export", "engine", "benchmark", "bundle"):
        assert f"norm-pipeline stage {stage}" in page
    assert page.count("not run yet") >= 6
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["accuracy"]["teacher_top1"] == teacher_top1
    assert s["verdicts"] == {"norm_vs_baseline_ce_pts": None, "norm_helped": None, "merge_exact": None,
                             "cost_unchanged": None}
    assert s["stages"]["bundle"] == {"status": "not run"} and s["engine"] == {"status": "not run"}


def test_cli_report_command(run_dir, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    (run_dir / "report.html").unlink()
    res = CliRunner().invoke(main, ["report", "--run-dir", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert f"report: {run_dir / 'report.html'}" in res.output and "merge exact" in res.output
    assert (run_dir / "report.html").is_file()
    res = CliRunner().invoke(main, ["report", "--run-dir", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_engine_section_from_an_engine_stage_report(run_dir, tmp_path):
    """Where a GPU ran the engine stage: engine.json made by the stage's own writer, rendered with its figures."""
    import numpy as np

    from pipeline.graph import stage_module
    from pipeline.report import write_report

    engine = stage_module("engine")
    from stages.lib.context import StageContext

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("engine"))
    (run / "engine").mkdir()
    rng = np.random.default_rng(0)
    ref, y = rng.standard_normal((64, 10)).astype(np.float32), rng.integers(0, 10, 64)
    result = {"samples": 64, "ort_top1": float((ref.argmax(1) == y).mean()), "engines": {}}
    sidecars = {}
    for prec, noise in (("fp32", 1e-6), ("fp16", 1e-3)):
        tally = engine._Tally(1e-3, 1e-3) if prec == "fp32" else engine._Tally(5e-2, 5e-2)
        tally.add(ref + noise * rng.standard_normal(ref.shape).astype(np.float32), ref, y)
        result["engines"][prec] = {**tally.report(), "latency": {"batch": 32, "median_ms": 0.0421 + (prec == "fp16")}}
        sidecars[prec] = {"plan": f"model_{prec}.plan", "plan_sha256": "ab" * 32, "plan_bytes": 123456, "build_seconds": 9.5,
                          "fp16_mode": prec, "hardware_compatibility": "none", "profile": {}, "tensorrt_version": "10.9.0",
                          "gpu_name": "NVIDIA H200", "compute_capability": "9.0", "onnx_sha256": "cd" * 32}
    ctx = StageContext(name="engine", out_dir=run / "engine", run_dir=run, cfg=load_config(None, []), log=lambda m: None)
    metrics = engine._report(ctx, sidecars, result, run / "export" / "model.onnx")
    (run / "engine" / "record.json").write_text(json.dumps({"stage": "engine", "status": "done", "metrics": metrics,
                                                            "fingerprint": "ef" * 32, "duration_s": 20.0}))
    page = html.unescape(write_report(run).read_text())
    eng = json.loads((run / "engine" / "engine.json").read_text())["engines"]
    for prec in ("fp32", "fp16"):
        assert _pct(eng[prec]["top1"]) in page and f"{eng[prec]['parity']['max_abs_diff']:.2e}" in page
    assert "NVIDIA H200" in page and "10.9.0" in page and "1.042 ms, batch 32" in page
    s = json.loads((run / "summary.json").read_text())
    assert s["engine"]["status"] == "done" and s["engine"]["fp16_top1"] == metrics["fp16_top1"]
    assert s["engine"]["parity_ok"] is True


def test_verdict_reliability_script_counts_answers_and_leaves_the_run_alone(run_dir, tmp_path, capsys):
    import importlib.util
    from collections import Counter

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "verdict_reliability.py"
    spec = importlib.util.spec_from_file_location("verdict_reliability", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    out = tmp_path / "reliability.json"
    tiny = ["blocks=2", "block_runs=1", "batch_sizes=[1]", "backends=[onnxruntime]", "multithreaded=false",
            "max_seconds=0.5", "bootstrap=100", "include_teacher=false"]
    rc = mod.main(["--run-dir", str(run_dir), "-k", "2", "--json", str(out), *[a for t in tiny for a in ("--set", f"benchmark.{t}")]])
    d = json.loads(out.read_text())
    assert len(d["runs"]) == 2 and rc == (0 if d["criteria_met"] else 1)
    text = capsys.readouterr().out
    for label, key in (("merged", "verdict"), ("unmerged", "unmerged_verdict")):
        n = Counter(r[key] for r in d["runs"])
        row = next(ln for ln in text.splitlines() if ln.strip("│┃ ").startswith(label + " "))
        cells = [c.strip() for c in row.split("│") if c.strip()]
        assert cells[1:4] == [f"{n['yes']}/2", f"{n['no']}/2", f"{n['inconclusive']}/2"], row
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before
    assert mod.main(["--run-dir", str(tmp_path / "nowhere")]) == 2


def test_report_shows_int8_drop_and_cpu_speedup(run_dir):
    page = html.unescape((run_dir / "report.html").read_text())
    q = json.loads((run_dir / "quantize" / "quantize.json").read_text())
    section = page[page.index('id="precision"'):page.index('id="bundle"')]
    int8 = q["precisions"]["int8"]
    cell = q["speed"]["cells"][0]
    assert f"{0.0 - int8['drop_pts']:+.2f}" in section and f"{int8['speedup_vs_fp32']['speedup']:.2f}×" in section
    assert f"[{cell['speedup_ci95'][0]:.2f}, {cell['speedup_ci95'][1]:.2f}]" in section and cell["verdict"] in section
    summary = json.loads((run_dir / "summary.json").read_text())["quantize"]
    assert summary["int8_drop_pts"] == int8["drop_pts"] and summary["int8_speed_verdict"] == int8["speedup_vs_fp32"]["verdict"]


def test_summary_follows_the_records_not_the_happy_path(run_dir, tmp_path):
    """The tiny run says "yes" and its last epoch is its best; records that say otherwise must show through."""
    import shutil

    from pipeline.report import Run, build_summary

    rd = tmp_path / "run"
    shutil.copytree(run_dir, rd)

    def edit(stage: str, **metrics) -> None:
        p = rd / stage / "record.json"
        r = json.loads(p.read_text())
        r["metrics"].update(metrics)
        p.write_text(json.dumps(r))

    edit("benchmark", verdict="no")
    edit("distill", top1=0.5, best_top1=0.6)
    s = build_summary(Run.load(rd))
    assert s["verdicts"]["cost_unchanged"] is False and s["latency"]["verdict"] == "no"
    assert s["accuracy"]["norm_top1"] == 0.5 and s["accuracy"]["norm_best_top1"] == 0.6
    edit("benchmark", verdict="inconclusive")
    assert build_summary(Run.load(rd))["verdicts"]["cost_unchanged"] is None
