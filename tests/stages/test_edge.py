"""The edge hand-off kit: golden self-test, device report + ingest, INT8 quantization with its gates.

The bundle's runners are run as the edge team runs them: a fresh Python in which ``import torch`` fails."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stages.lib.errors import PipelineError
from tests.stages.test_bundle import NO_TORCH, _run_bundle
from tests.stages.test_engine import FakeRunner, export_dir, fake_build, fake_trt, make_export_dir  # noqa: F401 - fixtures

KIT = Path(__file__).resolve().parents[2] / "stages" / "bundle_files"


def _edgekit():
    sys.path.insert(0, str(KIT))
    try:
        import edgekit
    finally:
        sys.path.remove(str(KIT))
    return edgekit


def _runner(bundle: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """bundle/run_onnx.py in a Python where torch cannot be imported."""
    return subprocess.run([sys.executable, "-c", NO_TORCH, str(bundle / "run_onnx.py"), *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd or bundle)


def _quant_cfg(upstream, **over):
    from pipeline.config import QuantizeCfg

    cfg = upstream["cfg"].model_copy(deep=True)
    cfg.quantize = QuantizeCfg(**{"calibration_samples": 32, "batch_sizes": [2], "blocks": 2, "block_runs": 1,
                                  "warmup": 0, "bootstrap": 100, **over})
    return cfg


@pytest.fixture(scope="module")
def quantized(upstream, tmp_path_factory):
    """A finished quantize stage folder on the tiny model (real onnxruntime quantization)."""
    from pipeline.graph import stage_module

    quantize_stage = stage_module("quantize")
    from stages.lib.context import StageContext

    base = tmp_path_factory.mktemp("quant")
    export = make_export_dir(upstream, base / "export")
    out = base / "quantize"
    out.mkdir()
    ctx = StageContext(name="quantize", out_dir=out, run_dir=base, cfg=_quant_cfg(upstream, max_drop=100.0),
                       inputs={"data": upstream["data"], "export": export}, input_records={}, log=lambda m: None)
    return out, quantize_stage.run(ctx)


@pytest.fixture(scope="module")
def kit_bundle(upstream, quantized, tmp_path_factory):
    """A bundle made with the quantize stage's output (INT8 and fp16 shipped)."""
    base = tmp_path_factory.mktemp("kitbundle")
    return _run_bundle(upstream, base, engines=False, extra_inputs={"quantize": quantized[0]},
                       extra_records={"quantize": {"metrics": quantized[1]}})


# ----------------------------------------------------------------------------- 1. golden self-test
def test_golden_npz_is_stratified_real_pixels(kit_bundle, upstream):
    from stages.lib.datasets import load_raw

    bundle = kit_bundle[0] / "bundle"
    m = json.loads((bundle / "manifest.json").read_text())
    st = m["selftest"]
    with np.load(bundle / "golden.npz") as z:
        images, labels, logits, idx = z["images"], z["labels"], z["logits"], z["indices"]
    assert images.dtype == np.uint8 and images.shape == (64, 1, 28, 28) and logits.shape == (64, 10)
    raw = load_raw("fashion_mnist", Path(json.loads((upstream["data"] / "dataset.json").read_text())["root"]))["val"]
    np.testing.assert_array_equal(images, raw[0].numpy()[idx])  # exactly as read from the dataset
    np.testing.assert_array_equal(labels, raw[1].numpy()[idx])
    assert st["indices"] == idx.tolist() and st["classes_covered"] == 10 and np.bincount(labels).min() >= 6
    assert set(st["tolerances"]) == {"fp32", "fp16", "int8"} and st["tolerances"]["int8"]["atol"] is None
    assert "golden.npz" in m["files"] and "edgekit.py" in m["files"]


def test_selftest_passes_without_torch_for_every_shipped_precision(kit_bundle):
    bundle = kit_bundle[0] / "bundle"
    for prec in ("fp32", "fp16", "int8"):
        res = _runner(bundle, "--selftest", "--precision", prec)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"self-test passed: {prec}"), res.stdout


def test_tampered_preprocessing_fails_the_selftest(kit_bundle, tmp_path):
    bundle = kit_bundle[0] / "bundle"
    m = json.loads((bundle / "manifest.json").read_text())
    good = tmp_path / "manifest_copy.json"
    good.write_text(json.dumps(m))  # a copy elsewhere still finds the bundle's files
    assert _runner(bundle, "--selftest", "--manifest", str(good)).returncode == 0
    m["preprocessing"]["mean"] = [m["preprocessing"]["mean"][0] + 0.2]
    bad = tmp_path / "manifest_tampered.json"
    bad.write_text(json.dumps(m))
    res = _runner(bundle, "--selftest", "--manifest", str(bad))
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith("error: fp32 self-test failed:") and "preprocessing" in res.stderr


def test_compare_golden_uses_per_precision_tolerances():
    ek = _edgekit()
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((20, 5)).astype(np.float32) * 3
    golden = {"logits": ref, "labels": ref.argmax(1)}
    tols = {"fp32": {"atol": 1e-3, "rtol": 1e-3, "min_top1_agreement": 1.0},
            "fp16": {"atol": 5e-2, "rtol": 5e-2, "min_top1_agreement": 0.95},
            "int8": {"atol": None, "rtol": None, "min_top1_agreement": 0.9}}
    noisy = ref + 0.02 * np.sign(rng.standard_normal(ref.shape)).astype(np.float32)
    assert not ek.compare_golden(noisy, golden, tols["fp32"], "fp32")["ok"]
    assert ek.compare_golden(noisy, golden, tols["fp16"], "fp16")["ok"]
    flipped = ref.copy()
    flipped[0] = -flipped[0]  # one decision changes: 19/20 agree
    assert ek.compare_golden(flipped, golden, tols["int8"], "int8")["ok"]
    assert not ek.compare_golden(flipped, golden, tols["fp16"], "fp16")["ok"]  # 95% passes but logits are far off
    res = ek.compare_golden(flipped[:, :3], golden, tols["int8"], "int8")
    assert not res["ok"] and "shape" in res["reason"]


def test_latency_summary_and_median_ci():
    ek = _edgekit()
    calls = []
    rows = ek.measure_latency(lambda x: calls.append(len(x)), np.zeros((3, 1, 4, 4), np.float32), [1, 5], warmup=2,
                              iters=7, timer=iter(np.arange(0, 100, 0.001)).__next__)
    assert calls.count(1) == 9 and calls.count(5) == 9
    assert [r["batch"] for r in rows] == [1, 5] and all(r["runs"] == 7 and r["warmup"] == 2 for r in rows)
    assert rows[0]["p50_ms"] == pytest.approx(1.0) and rows[1]["throughput_per_s"] == pytest.approx(5000, rel=1e-6)
    lo, hi = ek.bootstrap_median_ci([1.0, 2.0, 3.0, 4.0, 100.0], n_boot=500)
    assert 1.0 <= lo <= 3.0 <= hi <= 100.0
    with pytest.raises(ValueError):
        ek.parse_batches("1,x")


def test_bundle_verify_runs_the_onnx_selftest(kit_bundle, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main
    from stages.lib.bundle_check import verify_bundle
    from stages.lib.io import sha256_file

    bundle = kit_bundle[0] / "bundle"
    res = CliRunner().invoke(main, ["bundle", "verify", str(bundle)])
    assert res.exit_code == 0 and "ONNX self-test passed" in res.output, res.output
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["preprocessing"]["std"] = [s * 2 for s in m["preprocessing"]["std"]]  # consistent hashes, wrong recipe
    (copy / "manifest.json").write_text(json.dumps(m))
    sums = [ln for ln in (copy / "SHA256SUMS").read_text().splitlines() if not ln.endswith("manifest.json")]
    (copy / "SHA256SUMS").write_text("\n".join(sums + [f"{sha256_file(copy / 'manifest.json')}  manifest.json"]) + "\n")
    assert verify_bundle(copy) == []  # hashes alone cannot see it
    problems = verify_bundle(copy, selftest=True)
    assert all(p.severity == "error" and p.message.startswith("self-test (") and "self-test failed" in p.message
               for p in problems)
    assert {p.message.split(")")[0].removeprefix("self-test (") for p in problems} >= {"fp32", "fp16"}  # int8: decisions only
    res = CliRunner().invoke(main, ["bundle", "verify", str(copy)])
    assert res.exit_code == 1 and "failed verification" in res.output


# ----------------------------------------------------------------------------- 2. device report and ingest
@pytest.fixture(scope="module")
def device_json(kit_bundle, tmp_path_factory):
    bundle = kit_bundle[0] / "bundle"
    out = tmp_path_factory.mktemp("device") / "device.json"
    res = _runner(bundle, "--report", str(out), "--precision", "int8", "--batch-sizes", "1,4", "--iters", "5", "--warmup", "1")
    assert res.returncode == 0, res.stderr
    return out


def test_device_report_contents(device_json, kit_bundle):
    from stages.lib.io import sha256_file

    bundle = kit_bundle[0] / "bundle"
    rep = json.loads(device_json.read_text())
    assert rep["format"] == "norm-pipeline/device-report/1" and rep["runner"] == "run_onnx.py"
    assert rep["artifact"] == {"file": "model_int8.onnx", "sha256": sha256_file(bundle / "model_int8.onnx"),
                               "bytes": (bundle / "model_int8.onnx").stat().st_size, "precision": "int8",
                               "source_onnx_sha256": None}
    assert rep["bundle"]["model_onnx_sha256"] == sha256_file(bundle / "model.onnx")
    assert rep["selftest"]["ok"] is True and rep["selftest"]["samples"] == 64
    assert [r["batch"] for r in rep["latency"]] == [1, 4] and all(r["runs"] == 5 for r in rep["latency"])
    r = rep["latency"][0]
    assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["median_ci95_ms"][0] <= r["p50_ms"] <= r["median_ci95_ms"][1]
    assert rep["device"]["machine"] and rep["device"]["cpu_count"] and rep["backend"]["name"] == "onnxruntime"


def _run_dir_with_bundle(kit_bundle, tmp_path) -> Path:
    rd = tmp_path / "run"
    (rd / "bundle").mkdir(parents=True)
    shutil.copytree(kit_bundle[0] / "bundle", rd / "bundle" / "bundle")
    return rd


def test_ingest_stores_the_report_and_the_page_shows_it(device_json, kit_bundle, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    rd = _run_dir_with_bundle(kit_bundle, tmp_path)
    res = CliRunner().invoke(main, ["bundle", "ingest", str(device_json), "--run-dir", str(rd)])
    assert res.exit_code == 0, res.output
    stored = list((rd / "devices").glob("*.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text())["artifact"]["precision"] == "int8"
    html = (rd / "report.html").read_text()
    section = html[html.index('id="devices"'):html.index('id="stages"')]
    assert "model_int8.onnx" in section and "passed" in section and "b4: p50" in section
    CliRunner().invoke(main, ["bundle", "ingest", str(device_json), "--run-dir", str(rd)])
    assert len(list((rd / "devices").glob("*.json"))) == 1  # the same device again replaces its row


def test_ingest_refuses_foreign_and_broken_reports(device_json, kit_bundle, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.devices import ingest

    rd = _run_dir_with_bundle(kit_bundle, tmp_path)
    rep = json.loads(device_json.read_text())
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({**rep, "bundle": {**rep["bundle"], "model_onnx_sha256": "ab" * 32}}))
    with pytest.raises(PipelineError, match="belongs to another bundle"):
        ingest(foreign, rd)
    other_file = tmp_path / "other.json"
    other_file.write_text(json.dumps({**rep, "artifact": {**rep["artifact"], "sha256": "cd" * 32}}))
    with pytest.raises(PipelineError, match="not a file of this bundle"):
        ingest(other_file, rd)
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    res = CliRunner().invoke(main, ["bundle", "ingest", str(junk), "--run-dir", str(rd)])
    assert res.exit_code == 2 and "not a readable JSON device report" in res.output and "Traceback" not in res.output
    with pytest.raises(PipelineError, match="no bundle"):
        ingest(device_json, tmp_path)
    assert not (rd / "devices").exists()


# ----------------------------------------------------------------------------- 3. INT8
def test_quantize_stage_writes_qdq_int8_with_recorded_calibration(quantized, upstream):
    import onnx

    out, metrics = quantized
    q = json.loads((out / "quantize.json").read_text())
    g = onnx.load(str(out / "model_int8.onnx")).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("QuantizeLinear") > 5 and ops.count("DequantizeLinear") > 5 and "Conv" in ops
    scales = {i.name: i for i in g.initializer}
    per_channel = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[1] in scales
                   and len(scales[n.input[1]].dims) == 1 and scales[n.input[1]].dims[0] > 1]
    assert per_channel, "expected per-channel weight scales"
    cal = q["calibration"]
    assert cal["split"] == "train" and cal["samples"] == 32 and len(cal["indices"]) == 32 and len(cal["sha256"]) == 64
    from stages.lib.golden import calibration_slice

    meta = json.loads((upstream["data"] / "dataset.json").read_text())
    assert calibration_slice(meta, 32, 0)[1]["sha256"] == cal["sha256"] != calibration_slice(meta, 32, 1)[1]["sha256"]
    p = q["precisions"]
    assert p["fp32"]["samples"] == 128 and p["int8"]["shipped"] and p["fp16"]["shipped"]
    assert metrics["int8_drop_pts"] == pytest.approx((p["fp32"]["top1"] - p["int8"]["top1"]) * 100)
    cell = q["speed"]["cells"][0]
    assert cell["batch"] == 2 and cell["verdict"] in ("faster", "slower", "inconclusive")
    assert cell["speedup"] == pytest.approx(1 / cell["int8_over_fp32"]["ratio"])
    assert metrics["int8_speed_verdict"] == cell["verdict"] and p["int8"]["speedup_vs_fp32"]["batch"] == 2


def test_gate_refuses_a_model_that_drops_too_much(upstream, tmp_path, monkeypatch):
    from pipeline.graph import stage_module

    quantize_stage = stage_module("quantize")
    from stages.lib.context import StageContext

    real = quantize_stage.evaluate

    def worse_int8(sessions, batches, total=None):
        acc = real(sessions, batches, total)
        acc["int8"]["top1"] = acc["fp32"]["top1"] - 0.02  # 2 points below fp32
        return acc

    monkeypatch.setattr(quantize_stage, "evaluate", worse_int8)
    out = tmp_path / "quantize"
    out.mkdir()
    export = make_export_dir(upstream, tmp_path / "export")
    ctx = StageContext(name="quantize", out_dir=out, run_dir=tmp_path, cfg=_quant_cfg(upstream, max_drop=1.0),
                       inputs={"data": upstream["data"], "export": export}, input_records={}, log=lambda m: None)
    metrics = quantize_stage.run(ctx)
    q = json.loads((out / "quantize.json").read_text())
    assert not metrics["int8_shipped"] and metrics["int8_drop_pts"] == pytest.approx(2.0)
    assert "2.00 points below fp32" in q["precisions"]["int8"]["reason"] and "max_drop = 1.0" in q["precisions"]["int8"]["reason"]
    bundle_out, _ = _run_bundle(upstream, tmp_path / "b", engines=False, extra_inputs={"quantize": out},
                                extra_records={"quantize": {"metrics": metrics}})
    bundle = bundle_out / "bundle"
    rows = {r["precision"]: r for r in json.loads((bundle / "manifest.json").read_text())["precisions"]}
    assert not (bundle / "model_int8.onnx").exists() and rows["int8"]["file"] is None and "points below" in rows["int8"]["reason"]
    assert rows["fp16"]["shipped"] and (bundle / "model_fp16.onnx").is_file()
    assert "not shipped: int8 in onnxruntime CPU top-1" in (bundle / "README.md").read_text()
    assert q["precisions"]["int8"]["qdq_reference"]["shipped"]  # the Q/DQ arithmetic itself was not degraded
    res = _runner(bundle, "--selftest", "--precision", "int8")
    assert res.returncode != 0 and "ships no int8" in res.stderr


def test_manifest_lists_precisions_with_accuracy_agreement_speedup(kit_bundle, quantized):
    bundle = kit_bundle[0] / "bundle"
    m = json.loads((bundle / "manifest.json").read_text())
    rows = {r["precision"]: r for r in m["precisions"]}
    q = json.loads((quantized[0] / "quantize.json").read_text())["precisions"]
    assert rows["int8"]["file"] == "model_int8.onnx" and rows["int8"]["top1"] == q["int8"]["top1"]
    assert rows["int8"]["top1_agreement_vs_fp32"] == q["int8"]["top1_agreement_vs_fp32"]
    assert rows["int8"]["speedup_vs_fp32"]["speedup"] == q["int8"]["speedup_vs_fp32"]["speedup"]
    assert rows["fp32"]["speedup_vs_fp32"] == {"speedup": 1.0} and m["calibration"]["sha256"]
    readme = (bundle / "README.md").read_text()
    assert "| int8 | `model_int8.onnx` |" in readme and "--selftest" in readme and "--report device.json" in readme


def test_speed_verdict_is_three_valued():
    from stages.lib.latency_verdict import speed_verdict

    aa = {"ratio": 1.0, "lo": 0.98, "hi": 1.02}
    assert speed_verdict({"ratio": 0.5, "lo": 0.45, "hi": 0.55}, aa)[0] == "faster"
    assert speed_verdict({"ratio": 1.5, "lo": 1.4, "hi": 1.6}, aa)[0] == "slower"
    assert speed_verdict({"ratio": 0.99, "lo": 0.9, "hi": 1.1}, aa)[0] == "inconclusive"
    verdict, why = speed_verdict({"ratio": 0.5, "lo": 0.45, "hi": 0.55}, {"ratio": 1.1, "lo": 1.05, "hi": 1.15})
    assert verdict == "inconclusive" and "A/A" in why


def test_engine_stage_builds_int8_from_the_qdq_onnx(upstream, make_ctx, quantized, fake_trt, tmp_path, monkeypatch):  # noqa: F811
    from pipeline.graph import stage_module

    engine_stage = stage_module("engine")
    from stages.lib import trt_int8
    from tests.stages.test_engine import _cfg

    built = []

    def fake_int8(qdq, plan, **kw):
        built.append(Path(qdq).name)
        return fake_build(qdq, plan, precision="int8", **kw)

    monkeypatch.setattr(trt_int8, "build_int8_engine", fake_int8)
    monkeypatch.setattr(FakeRunner, "noise", {"fp32": 0.0, "fp16": 0.0, "int8": 0.0})
    export = make_export_dir(upstream, tmp_path / "export")
    ctx = make_ctx("engine", inputs={"export": export, "quantize": quantized[0]}, cfg=_cfg(upstream, tmp_path))
    metrics = engine_stage.run(ctx)
    assert built == ["model_int8.onnx"] and (ctx.out_dir / "model_int8.plan").is_file() and "int8_top1" in metrics
    side = json.loads((ctx.out_dir / "model_int8.json").read_text())
    assert side["precision"] == "int8" and side["onnx"] == "model_int8.onnx"
    ctx2 = make_ctx("engine2", inputs={"export": export}, cfg=_cfg(upstream, tmp_path))
    engine_stage.run(ctx2)
    report = json.loads((ctx2.out_dir / "engine.json").read_text())
    assert "int8" not in report["engines"] and "quantize stage did not run" in report["not_built"]["int8"]


def test_int8_network_is_strongly_typed_on_10_and_11():
    from types import SimpleNamespace

    from stages.lib.trt_int8 import network_flags

    class Flag10:
        STRONGLY_TYPED = 5  # an IntEnum-like member: int() works

    assert network_flags(SimpleNamespace(NetworkDefinitionCreationFlag=Flag10)) == 1 << 5
    assert network_flags(SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace())) == 0  # 11.x: no flag


def test_edgekit_and_runner_import_without_torch(kit_bundle):
    bundle = kit_bundle[0] / "bundle"
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); import edgekit, run_onnx; "
            "print(sorted(m for m in sys.modules if m.startswith(('torch', 'stages', 'pipeline'))))")
    res = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True, timeout=60, cwd="/")
    assert res.returncode == 0 and res.stdout.strip() == "['torch']", res.stdout + res.stderr
