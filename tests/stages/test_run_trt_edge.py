"""run_trt.py --selftest / --report on the strict fake TensorRT: the bundle's TensorRT runner run as the edge team
runs it (a fresh Python without torch), with the fake TensorRT 10.3.0 and fake CUDA installed in that process.

Engines are built in the test process by the pipeline's own build (stages.lib.trt_build through the same fake), so the
plan, its sidecar and the bundle are what the pipeline ships."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stages.lib import trt_build
from stages.lib.io import sha256_file
from tests.stages.test_bundle import _run_bundle
from tests.stages.test_trt_handoff import tiny_onnx

ROOT = Path(__file__).resolve().parents[2]
# the device: no torch, the fake TensorRT 10.3.0 and fake cuda-python, then the runner as a script
BOOT = ("import runpy, sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); "
        "from pytest import MonkeyPatch; from tests.fakes import fake_cuda, fake_tensorrt; mp = MonkeyPatch(); "
        "fake_cuda.install(mp); fake_tensorrt.install(mp, '10.3.0'); script = sys.argv[2]; sys.argv = sys.argv[2:]; "
        "runpy.run_path(script, run_name='__main__')")


@pytest.fixture(scope="module")
def bundle(upstream, tmp_path_factory) -> Path:
    """A finished bundle (golden.npz, model.onnx, runners) without prebuilt engines."""
    out, _ = _run_bundle(upstream, tmp_path_factory.mktemp("trtbundle"), engines=False)
    return out / "bundle"


def engine(env, onnx: Path, folder: Path, precision: str = "fp32") -> Path:
    """The pipeline's build of ``onnx`` into ``folder/model_<precision>.plan`` (+ sidecar), on the fake."""
    from stages.lib.trt_int8 import build_int8_engine

    folder.mkdir(parents=True, exist_ok=True)
    plan = folder / f"model_{precision}.plan"
    kw = dict(min_batch=1, opt_batch=4, max_batch=8, log=lambda m: None)
    if precision == "int8":
        build_int8_engine(onnx, plan, **kw)
    else:
        trt_build.build_engine(onnx, plan, precision=precision, **kw)
    return plan


def run_trt(bundle: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The bundle's own run_trt.py (and edgekit.py next to it)."""
    return subprocess.run([sys.executable, "-c", BOOT, str(ROOT), str(bundle / "run_trt.py"), *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def one_error_line(res: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in res.stderr.strip().splitlines() if not ln.startswith("note:")]
    assert res.returncode == 1 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


# ----------------------------------------------------------------------------- self-test
def test_selftest_passes_on_the_pipelines_engines(env, bundle, tmp_path):
    manifest = str(bundle / "manifest.json")
    # each with its own tolerance, the precision read from the engine's sidecar; the fake runs any ONNX in fp32, so
    # the int8 path (strongly typed build) is driven from model.onnx here
    for precision in ("fp32", "fp16", "int8"):
        plan = engine(env, bundle / "model.onnx", tmp_path, precision)
        res = run_trt(bundle, "--selftest", "--engine", str(plan), "--manifest", manifest, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"self-test passed: {precision} {plan.name}, top-1 agrees on 64/64"), res.stdout


def test_tampered_preprocessing_fails_in_one_line(env, bundle, tmp_path):
    plan = engine(env, bundle / "model.onnx", tmp_path / "e")
    m = json.loads((bundle / "manifest.json").read_text())
    m["preprocessing"]["mean"] = [m["preprocessing"]["mean"][0] + 0.2]
    bad = tmp_path / "manifest_tampered.json"  # a copy elsewhere: the runner still finds the bundle's files
    bad.write_text(json.dumps(m))
    line = one_error_line(run_trt(bundle, "--selftest", "--engine", str(plan), "--manifest", str(bad), cwd=tmp_path))
    assert line.startswith("error: fp32 self-test failed:") and "preprocessing" in line


def test_wrong_engine_fails_in_one_line(env, bundle, tmp_path):
    plan = engine(env, tiny_onnx(tmp_path / "other.onnx"), tmp_path / "e")  # same input and classes, another model
    line = one_error_line(run_trt(bundle, "--selftest", "--engine", str(plan), "--manifest", str(bundle / "manifest.json"),
                                  cwd=tmp_path))
    assert line.startswith("error: fp32 self-test failed:") and "logits off" in line


def test_engine_without_sidecar_needs_its_precision(env, bundle, tmp_path):
    plan = engine(env, bundle / "model.onnx", tmp_path / "e")
    plan.with_suffix(".json").unlink()  # as trtexec leaves it on the device
    args = ("--selftest", "--engine", str(plan), "--manifest", str(bundle / "manifest.json"))
    line = one_error_line(run_trt(bundle, *args, cwd=tmp_path))
    assert "precision of model_fp32.plan is unknown" in line and "--precision" in line
    res = run_trt(bundle, *args, "--precision", "fp32", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("self-test passed: fp32"), res.stderr


# ----------------------------------------------------------------------------- device report and ingest
def _report(env, bundle: Path, tmp_path: Path, manifest: Path | None = None, onnx: Path | None = None) -> tuple:
    plan = engine(env, onnx or bundle / "model.onnx", tmp_path / "e")
    out = tmp_path / "device.json"
    res = run_trt(bundle, "--report", str(out), "--engine", str(plan), "--manifest", str(manifest or bundle / "manifest.json"),
                  "--batch-sizes", "1,4", "--iters", "5", "--warmup", "1", cwd=tmp_path)
    return res, out, plan


def test_report_holds_device_facts_latency_and_engine_hash(env, bundle, tmp_path):
    res, out, plan = _report(env, bundle, tmp_path)
    assert res.returncode == 0, res.stderr
    rep = json.loads(out.read_text())
    assert rep["format"] == "norm-pipeline/device-report/1" and rep["runner"] == "run_trt.py"
    dev = rep["device"]
    assert dev["tensorrt_version"] == "10.3.0" and dev["gpu_name"] == "Fake GPU" and dev["compute_capability"] == "8.7"
    assert dev["cuda_driver_version"] == "12.4" and dev["cuda_runtime_version"] == "12.6"
    assert dev["engine_sha256"] == sha256_file(plan) and dev["buffer_backend"] == "cuda-python" and dev["machine"]
    assert rep["backend"]["name"] == "tensorrt" and rep["backend"]["buffers"] == "cuda-python"
    assert rep["artifact"] == {"file": plan.name, "sha256": sha256_file(plan), "bytes": plan.stat().st_size,
                               "precision": "fp32", "source_onnx_sha256": sha256_file(bundle / "model.onnx")}
    assert rep["selftest"]["ok"] is True and rep["selftest"]["precision"] == "fp32" and rep["selftest"]["samples"] == 64
    assert [r["batch"] for r in rep["latency"]] == [1, 4] and all(r["runs"] == 5 and r["warmup"] == 1 for r in rep["latency"])
    for r in rep["latency"]:
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["median_ci95_ms"][0] <= r["p50_ms"] <= r["median_ci95_ms"][1]
        assert r["throughput_per_s"] > 0


def _run_dir(bundle: Path, tmp_path: Path) -> Path:
    rd = tmp_path / "run"
    shutil.copytree(bundle, rd / "bundle" / "bundle")
    return rd


def test_report_ingests_into_the_run(env, bundle, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    res, out, _ = _report(env, bundle, tmp_path)
    assert res.returncode == 0, res.stderr
    rd = _run_dir(bundle, tmp_path)
    got = CliRunner().invoke(main, ["bundle", "ingest", str(out), "--run-dir", str(rd)])
    assert got.exit_code == 0, got.output
    stored = list((rd / "devices").glob("*.json"))
    assert len(stored) == 1 and "fake-gpu-run_trt-fp32" in stored[0].name
    assert json.loads(stored[0].read_text())["device"]["tensorrt_version"] == "10.3.0"


def test_report_for_another_bundle_is_refused(env, bundle, tmp_path):
    """A bundle with another model.onnx (hashes consistent in its own manifest): its report does not ingest here."""
    from click.testing import CliRunner

    from pipeline.cli import main

    other = tmp_path / "other_bundle"
    shutil.copytree(bundle, other)
    tiny_onnx(other / "model.onnx")
    m = json.loads((other / "manifest.json").read_text())
    m["files"]["model.onnx"]["sha256"] = sha256_file(other / "model.onnx")
    (other / "manifest.json").write_text(json.dumps(m))
    res, out, _ = _report(env, other, tmp_path, onnx=other / "model.onnx")
    assert out.is_file(), res.stderr  # written even though the self-test fails (golden logits of another model)
    rep = json.loads(out.read_text())
    assert rep["bundle"]["model_onnx_sha256"] == sha256_file(other / "model.onnx")
    rd = _run_dir(bundle, tmp_path)
    got = CliRunner().invoke(main, ["bundle", "ingest", str(out), "--run-dir", str(rd)])
    assert got.exit_code == 2 and "belongs to another bundle" in got.output and "Traceback" not in got.output
    assert not (rd / "devices").exists()


def test_help_and_readme_name_the_selftest_and_report(bundle, tmp_path):
    res = run_trt(bundle, "--help", cwd=tmp_path)
    assert res.returncode == 0 and "--selftest" in res.stdout and "--report" in res.stdout and "--precision" in res.stdout
    res = run_trt(bundle, cwd=tmp_path)  # nothing to do: a usage error, not a traceback
    assert res.returncode == 2 and "--selftest / --report" in res.stderr and "Traceback" not in res.stderr
    readme = (bundle / "README.md").read_text()
    assert "python run_trt.py --selftest --engine" in readme and "python run_trt.py --report" in readme
    assert "engine's sha256" in readme
