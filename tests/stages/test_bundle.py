"""The bundle stage: contents, manifest hashes, verify_bundle (folder and .tar.gz, tampering, unsafe
archives), and the runners as the edge team would run them (run_onnx.py without PyTorch)."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from stages.lib import errors, trt_env, trt_rules
from stages.lib.bundle_check import Problem, error, verify_bundle, warning
from stages.lib.tarball import make_tarball
from tests.stages.test_engine import fake_build, make_export_dir

NO_TORCH = ("import runpy, sys; sys.modules['torch'] = None; script = sys.argv[1]; sys.argv = sys.argv[1:]; "
            "runpy.run_path(script, run_name='__main__')")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_bundle(upstream, base: Path, *, engines: bool, cfg=None, extra_inputs=None, extra_records=None):
    """Run the bundle stage into ``base/bundle_stage``; with a fake engine folder and benchmark when asked."""
    from pipeline.graph import stage_module

    bundle_stage = stage_module("bundle")
    from stages.lib.context import StageContext

    export = make_export_dir(upstream, base / "export")
    ins = {k: upstream[k] for k in ("data", "teacher", "distill", "merge")}
    ins.update(export=export, verify=base, baseline=base)
    records = {**upstream["records"], "verify": {"metrics": {"top1_agreement": 1.0, "fp32_max_rel_diff": 2e-7}},
               "export": {"metrics": {"ort_max_abs_diff": 3e-6, "graph_identical": True, "model_onnx_bytes": 1}},
               "baseline": {"metrics": {"ce_top1": 0.35}}}
    if engines:
        (base / "engine").mkdir()
        for p in ("fp32", "fp16"):
            fake_build(export / "model.onnx", base / "engine" / f"model_{p}.plan", precision=p, min_batch=1, opt_batch=8,
                       max_batch=64, timing_cache_path=base / "cache")
        (base / "benchmark").mkdir()
        (base / "benchmark" / "benchmark.json").write_text(json.dumps({"table": [{"model": "merged", "batch": 1, "ms": 0.5}]}))
        ins.update(engine=base / "engine", benchmark=base / "benchmark")
        records.update(engine={"metrics": {"fp32_top1": 0.41, "fp32_top1_agreement": 1.0}}, benchmark={"metrics": {"verdict": "same"}})
    ins.update(extra_inputs or {})
    records.update(extra_records or {})
    out = base / "bundle_stage"
    out.mkdir()
    ctx = StageContext(name="bundle", out_dir=out, run_dir=base, cfg=cfg or upstream["cfg"], inputs=ins,
                       input_records={k: records[k] for k in ins if k in records}, log=lambda m: None)
    return out, bundle_stage.run(ctx)


@pytest.fixture(scope="module")
def plain(upstream, tmp_path_factory):
    """A bundle as made on a CPU machine: no engine, no benchmark."""
    return _run_bundle(upstream, tmp_path_factory.mktemp("plain"), engines=False)


@pytest.fixture(scope="module")
def with_engines(upstream, tmp_path_factory):
    return _run_bundle(upstream, tmp_path_factory.mktemp("full"), engines=True)


def test_bundle_contents_and_manifest(plain, upstream):
    out, metrics = plain
    bundle = out / "bundle"
    names = sorted(p.name for p in bundle.iterdir())
    assert names == sorted(["model.onnx", "model_fp16.onnx", "run_onnx.py", "run_trt.py", "edgekit.py", "golden.npz",
                            "README.md", "manifest.json", "SHA256SUMS"])
    m = json.loads((bundle / "manifest.json").read_text())
    assert set(m["files"]) == set(names) - {"manifest.json", "SHA256SUMS"}
    for name, entry in m["files"].items():
        assert entry == {"sha256": _sha(bundle / name), "bytes": (bundle / name).stat().st_size}
    assert _sha(bundle / "model.onnx") == _sha(out.parent / "export" / "model.onnx")
    meta = json.loads((upstream["data"] / "dataset.json").read_text())
    assert m["classes"] == meta["classes"] and m["input"] == {
        "name": "input", "shape": ["batch", 1, 28, 28], "dtype": "float32", "layout": "NCHW",
        "profile": {"min": [1, 1, 28, 28], "opt": [8, 1, 28, 28], "max": [64, 1, 28, 28]}}
    pp = m["preprocessing"]
    assert pp["mean"] == meta["mean"] and pp["std"] == meta["std"] and pp["resize"] == "direct" and pp["scale"] == 1 / 255
    assert m["accuracy"]["teacher_top1"] == 0.5 and m["accuracy"]["distill_top1"] == 0.4
    assert m["accuracy"]["baseline_ce_top1"] == 0.35 and m["accuracy"]["verify"]["top1_agreement"] == 1.0
    assert "model_onnx_bytes" not in m["accuracy"]["export"] and m["engines"] == [] and m["latency"] is None
    assert m["versions"]["onnx"] and m["versions"]["onnxruntime"] and m["fp16_onnx_check"]["top1_agreement_vs_fp32"] >= 0.9
    sums = dict(reversed(line.split("  ", 1)) for line in (bundle / "SHA256SUMS").read_text().splitlines())
    assert sums == {**{n: e["sha256"] for n, e in m["files"].items()}, "manifest.json": _sha(bundle / "manifest.json")}
    readme = (bundle / "README.md").read_text()
    assert "{{" not in readme and "--minShapes=input:1x1x28x28" in readme and "--maxShapes=input:64x1x28x28" in readme
    assert "--fp16" in readme and "--onnx=model_fp16.onnx" in readme and "sha256sum -c SHA256SUMS" in readme
    assert metrics["files"] == len(names) and metrics["engines"] == 0
    assert metrics["bundle_bytes"] == sum(p.stat().st_size for p in bundle.iterdir())
    assert metrics["tar_sha256"] == _sha(out / "bundle.tar.gz") and not list(out.glob(".*tmp"))


def test_fresh_bundle_verifies_as_folder_and_tarball(plain):
    out, _ = plain
    assert verify_bundle(out / "bundle") == []
    assert verify_bundle(out / "bundle.tar.gz") == []
    with tarfile.open(out / "bundle.tar.gz") as tar:
        members = tar.getmembers()
    assert all(m.name == "bundle" or m.name.startswith("bundle/") for m in members)
    assert all((m.isfile() or m.isdir()) and m.uid == 0 for m in members)


def test_bundle_with_engines_and_latency(with_engines):
    out, metrics = with_engines
    bundle = out / "bundle"
    m = json.loads((bundle / "manifest.json").read_text())
    assert metrics["engines"] == 2 and {e["plan"] for e in m["engines"]} == {"model_fp32.plan", "model_fp16.plan"}
    assert _sha(bundle / "model_fp32.plan") == _sha(out.parent / "engine" / "model_fp32.plan")
    assert m["gpu"] == {"name": "Fake GPU", "compute_capability": "8.7"} and m["latency"]["table"][0]["ms"] == 0.5
    assert m["accuracy"]["engine"] == {"fp32_top1": 0.41, "fp32_top1_agreement": 1.0}
    assert "model_fp16.plan" in (bundle / "README.md").read_text()


# The engines were built (faked) with TensorRT 10.3.0.26 on a "Fake GPU" of compute capability 8.7; what
# verify_bundle says about them depends only on the machine it runs on, so every machine is simulated here.
@pytest.mark.parametrize("here, needles", [
    ({"tensorrt_version": None, "gpu_name": None, "compute_capability": None},
     ["TensorRT is not installed here", "10.3.0.26", "Fake GPU", "8.7"]),
    ({"tensorrt_version": "10.3.0.26", "gpu_name": "Fake GPU", "compute_capability": "8.7"}, None),  # loads: no warning
    ({"tensorrt_version": "10.8.0", "gpu_name": "Fake GPU", "compute_capability": "8.7"},
     ["built with TensorRT 10.3.0.26 but this machine has TensorRT 10.8.0"]),
    ({"tensorrt_version": "10.3.0.26", "gpu_name": "NVIDIA H200", "compute_capability": "9.0"},
     ["built for compute capability 8.7 (Fake GPU) but this GPU (NVIDIA H200) has 9.0"]),
    ({"tensorrt_version": "10.3.0.26", "gpu_name": None, "compute_capability": None}, ["no CUDA device is visible"]),
])
def test_verify_bundle_engine_warnings_per_machine(with_engines, monkeypatch, here, needles):
    monkeypatch.setattr(trt_env, "runtime_info", lambda: dict(here))
    problems = verify_bundle(with_engines[0] / "bundle")
    if needles is None:
        assert problems == []
        return
    assert len(problems) == 2 and all(p.severity == "warning" for p in problems), problems
    for plan, p in zip(("model_fp16.plan", "model_fp32.plan"), sorted(str(p) for p in problems), strict=True):
        assert p.startswith("warning: ") and plan in p and all(n in p for n in needles), p


def test_verify_reports_tampering(plain, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(plain[0] / "bundle", bundle)
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))
    (bundle / "README.md").write_text((bundle / "README.md").read_text() + "edited\n")
    (bundle / "extra.txt").write_text("not in the manifest")
    (bundle / "run_trt.py").unlink()
    problems = verify_bundle(bundle)
    assert error("sha256 mismatch: model.onnx was modified or is corrupt") in problems
    assert any(p.severity == "error" and p.message.startswith("size mismatch: README.md") for p in problems)
    assert error("unlisted file: extra.txt") in problems and error("missing file: run_trt.py") in problems
    assert len(problems) == 4
    tar = make_tarball(bundle, tmp_path / "tampered.tar.gz")
    assert sorted(map(str, verify_bundle(tar))) == sorted(map(str, problems))
    m = json.loads((bundle / "manifest.json").read_text())
    m["classes"][0] = "renamed"
    (bundle / "manifest.json").write_text(json.dumps(m))
    assert error("manifest.json does not match SHA256SUMS (edited after bundling?)") in verify_bundle(bundle)
    (bundle / "manifest.json").write_text("{not json")
    assert verify_bundle(bundle)[0].message.startswith("manifest.json is not readable JSON")
    (bundle / "manifest.json").unlink()
    assert verify_bundle(bundle) == [error(f"manifest.json missing in {bundle}")]


def test_problem_severity_and_the_line_users_see():
    assert str(error("missing file: x")) == "missing file: x"
    assert str(warning("TensorRT is not installed here")) == "warning: TensorRT is not installed here"
    with pytest.raises(ValueError, match="severity"):
        Problem("fatal", "x")


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


@pytest.mark.parametrize("name,kind", [("../evil.txt", tarfile.REGTYPE), ("/tmp/evil.txt", tarfile.REGTYPE),
                                       ("bundle/../../evil.txt", tarfile.REGTYPE), ("bundle/link", tarfile.SYMTYPE)])
def test_verify_refuses_unsafe_archives(tmp_path, name, kind):
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    problems = verify_bundle(_tar_with(tmp_path / "bad.tar.gz", info))
    assert len(problems) == 1 and problems[0].severity == "error"
    assert "unsafe path" in problems[0].message or "link or special file" in problems[0].message
    assert not (tmp_path.parent / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    assert "not a readable tar archive" in verify_bundle(tmp_path / "junk.tar.gz")[0].message


# ----------------------------------------------------------------------------- the runners
def _val_images(upstream, n: int):
    """The first ``n`` validation images as uint8 arrays and as the pipeline's normalised float batch."""
    from stages.lib.datasets import load_raw, val_batches

    meta = json.loads((upstream["data"] / "dataset.json").read_text())
    raw = load_raw("fashion_mnist", Path(meta["root"]))["val"][0][:n].numpy()
    x = next(iter(val_batches(meta, batch_size=n)))[0].numpy()
    return raw, x, meta


def test_run_onnx_without_torch_matches_pipeline(plain, upstream, tmp_path):
    from PIL import Image

    bundle = plain[0] / "bundle"
    raw, x, meta = _val_images(upstream, 12)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(raw):
        Image.fromarray(img[0], mode="L").save(folder / f"img_{i:02d}.png")
    res = subprocess.run([sys.executable, "-c", NO_TORCH, str(bundle / "run_onnx.py"), str(folder), "--json", "--top-k", "3"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    import onnxruntime as ort

    logits = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert [Path(g["file"]).name for g in got] == [f"img_{i:02d}.png" for i in range(12)]
    for g, p in zip(got, probs, strict=True):
        assert len(g["top_k"]) == 3 and g["top_k"][0]["class"] == meta["classes"][g["top_k"][0]["index"]]
        np.testing.assert_allclose([t["prob"] for t in g["top_k"]], p[[t["index"] for t in g["top_k"]]], atol=1e-5)
    agree = np.mean([g["top_k"][0]["index"] == int(p.argmax()) for g, p in zip(got, probs, strict=True)])
    assert agree >= 11 / 12


def test_run_onnx_text_output_on_a_photo(plain, upstream, tmp_path):
    from PIL import Image

    bundle = plain[0] / "bundle"
    rgb = (np.random.default_rng(0).random((50, 40, 3)) * 255).astype(np.uint8)  # RGB, not 28x28: converted + resized
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "photo.png")
    res = subprocess.run([sys.executable, "-X", "importtime", "-c", NO_TORCH, str(bundle / "run_onnx.py"),
                          str(tmp_path / "photo.png"), "--top-k", "4"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    imported = {ln.split("|")[-1].strip() for ln in res.stderr.splitlines() if ln.startswith("import time:")}
    assert "onnxruntime" in imported and "PIL.Image" in imported and not imported & {"torch", "torchvision"}
    lines = res.stdout.strip().splitlines()
    classes = json.loads((bundle / "manifest.json").read_text())["classes"]
    assert lines[0].endswith("photo.png") and len(lines) == 5
    for rank, line in enumerate(lines[1:], 1):
        assert line.strip().startswith(f"{rank}. ") and any(c in line for c in classes) and "(class " in line


def _load_run_trt(bundle: Path):
    spec = importlib.util.spec_from_file_location("bundle_run_trt", bundle / "run_trt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_trt_rules_match_the_pipeline(with_engines):
    bundle = with_engines[0] / "bundle"
    run_trt = _load_run_trt(bundle)
    side = trt_rules.load_sidecar(bundle / "model_fp32.json")
    cases = [(side, "10.3.0.26", ("Orin", "8.7")), (side, "10.3.1", ("Fake GPU", "8.7")), (side, "10.4.0", ("x", "8.7")),
             (side, "11.1.0", ("x", "8.7")), (side, "10.3.0", ("RTX", "8.6")), (side, None, ("x", "8.7")), (side, "10.3.0", None),
             ({**side, "hardware_compatibility": "ampere_plus"}, "10.3.0", ("RTX", "8.6")),
             ({**side, "hardware_compatibility": "ampere_plus"}, "10.3.0", ("T4", "7.5")),
             ({**side, "version_compatible": True}, "10.8.0", ("x", "8.7")),
             ({**side, "version_compatible": True}, "10.2.0", ("x", "8.7"))]
    for s, version, gpu in cases:
        info = {"tensorrt_version": version, "gpu_name": gpu[0] if gpu else None, "compute_capability": gpu[1] if gpu else None}
        try:
            trt_rules.check_compatibility(s, info)
            pipeline_ok = True
        except errors.PipelineError:
            pipeline_ok = False
        assert (run_trt.compatibility_problem(s, version, gpu) is None) == pipeline_ok, (version, gpu, s["hardware_compatibility"])


@pytest.mark.skipif(trt_env.tensorrt_version() is not None, reason="TensorRT is installed here")
def test_run_trt_refuses_clearly_without_tensorrt(with_engines, tmp_path):
    bundle = with_engines[0] / "bundle"
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8), mode="L").save(tmp_path / "a.png")
    res = subprocess.run([sys.executable, "-c", NO_TORCH, str(bundle / "run_trt.py"), str(tmp_path / "a.png"),
                          "--engine", str(bundle / "model_fp16.plan")], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "refusing to load the engine: model_fp16.plan needs TensorRT 10.3.0.26, which is not installed" in res.stderr
    rebuilt = tmp_path / "model_fp16.plan"  # a plan rebuilt on the device, next to the pipeline's old sidecar
    rebuilt.write_bytes(b"another plan")
    shutil.copyfile(bundle / "model_fp16.json", tmp_path / "model_fp16.json")
    res = subprocess.run([sys.executable, "-c", NO_TORCH, str(bundle / "run_trt.py"), str(tmp_path / "a.png"),
                          "--engine", str(rebuilt)], capture_output=True, text=True, timeout=120)
    assert "describes another build of model_fp16.plan" in res.stderr and "tensorrt is not installed" in res.stderr
