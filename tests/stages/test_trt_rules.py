"""The TensorRT rules and environment on CPU: versions, optimization profiles, parser errors, sidecars,
compatibility (stages/lib/trt_rules.py, trt_build.py's parser messages) and the environment fingerprint
(stages/lib/trt_env.py). The engine stage and engine builds are in test_engine.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stages.lib import trt_buffers, trt_build, trt_env, trt_rules
from stages.lib.errors import PipelineError


# ----------------------------------------------------------------------------- versions, profiles, sidecars
def test_versions_and_profiles():
    assert trt_rules.parse_version("10.3.0.26") == (10, 3, 0, 26)
    assert trt_rules.parse_version("11.4.1.post1") == (11, 4, 1)
    assert trt_rules.parse_cc("8.7") == (8, 7) and trt_rules.parse_cc((9, 0)) == (9, 0)
    assert trt_rules.profile_shapes([-1, 1, 28, 28], 1, 8, 64) == {"min": [1, 1, 28, 28], "opt": [8, 1, 28, 28], "max": [64, 1, 28, 28]}
    with pytest.raises(PipelineError, match="min_batch <= engine.opt_batch"):
        trt_rules.profile_shapes([-1, 1, 28, 28], 8, 4, 64)
    with pytest.raises(PipelineError, match="dynamic axes besides the batch"):
        trt_rules.profile_shapes([-1, 3, -1, -1], 1, 1, 1)


class _ParserError:
    def __init__(self, desc, node):
        self._d, self._n = desc, node

    def desc(self):
        return self._d

    def node_name(self):
        return self._n

    def node_operator(self):
        return "Foo"


def test_parser_errors_are_listed():
    errs = [trt_build.parser_error_text(_ParserError(f"problem {i}", f"node_{i}")) for i in range(7)]
    msg = trt_build.format_parser_errors("m.onnx", errs)
    assert "problem 0 [node_0 / Foo]" in msg and "problem 4" in msg and "(2 more)" in msg and "m.onnx" in msg


def _sidecar(tmp_path, **over) -> dict:
    (tmp_path / "model_fp32.plan").write_bytes(b"\x00plan-bytes")
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    side = trt_rules.make_sidecar(plan_path=tmp_path / "model_fp32.plan", onnx_path=tmp_path / "model.onnx", precision="fp32",
                            fp16_mode=None, tensorrt_version="10.3.0.26", gpu={"name": "Orin", "compute_capability": "8.7"},
                            profile={"input": "input", "min": [1], "opt": [8], "max": [64]}, hardware_compatibility="none",
                            inputs=[], outputs=[], build_seconds=1.23456, optimization_level=3, workspace_mb=1024)
    return {**side, **over}


def test_sidecar_roundtrip(tmp_path):
    import hashlib

    side = _sidecar(tmp_path)
    assert side["plan_sha256"] == hashlib.sha256(b"\x00plan-bytes").hexdigest() and side["plan_bytes"] == 11
    assert side["onnx_sha256"] == hashlib.sha256(b"onnx").hexdigest() and side["build_seconds"] == 1.235
    path = trt_rules.sidecar_path_for(tmp_path / "model_fp32.plan")
    assert path.name == "model_fp32.json"
    path.write_text(json.dumps(side))
    assert trt_rules.load_sidecar(path) == side
    path.write_text(json.dumps({"plan": "x"}))
    with pytest.raises(PipelineError, match="not a norm-pipeline engine sidecar"):
        trt_rules.load_sidecar(path)
    with pytest.raises(PipelineError, match="not found"):
        trt_rules.load_sidecar(tmp_path / "nope.json")


def test_compatibility_rules(tmp_path):
    side = _sidecar(tmp_path)
    here = {"tensorrt_version": "10.3.0.26", "gpu_name": "Orin", "compute_capability": "8.7"}
    trt_rules.check_compatibility(side, here)
    trt_rules.check_compatibility(side, {**here, "tensorrt_version": "10.3.0"})  # build number unknown here: compared to the patch
    assert any("build number could not be compared" in n for n in trt_rules.compatibility_notes(side, {**here, "tensorrt_version": "10.3.0"}))
    for other in ("10.3.0.30", "10.3.1", "10.8.0"):  # TensorRT refuses any other version, patch and build included
        with pytest.raises(PipelineError) as e:
            trt_rules.check_compatibility(side, {**here, "tensorrt_version": other})
        assert "10.3.0.26" in str(e.value) and other in str(e.value) and "trtexec" in str(e.value)
    with pytest.raises(PipelineError, match=r"compute capability 8\.7.*has 8\.6"):
        trt_rules.check_compatibility(side, {**here, "compute_capability": "8.6", "gpu_name": "RTX 3090"})
    with pytest.raises(PipelineError, match="not installed"):
        trt_rules.check_compatibility(side, {**here, "tensorrt_version": None})
    with pytest.raises(PipelineError, match="no CUDA device"):
        trt_rules.check_compatibility(side, {**here, "compute_capability": None})
    amp = {**side, "hardware_compatibility": "ampere_plus", "compute_capability": "8.0"}
    for cc in ("8.6", "8.9", "9.0"):
        trt_rules.check_compatibility(amp, {**here, "compute_capability": cc})
    with pytest.raises(PipelineError, match=">= 8.0"):
        trt_rules.check_compatibility(amp, {**here, "compute_capability": "7.5"})
    same = {**side, "hardware_compatibility": "same_compute_capability"}
    trt_rules.check_compatibility(same, {**here, "gpu_name": "another 8.7 GPU"})
    assert not [n for n in trt_rules.compatibility_notes(same, {**here, "gpu_name": "another 8.7 GPU"}) if "GPU" in n]


# ----------------------------------------------------------------------------- environment
def test_environment_fingerprint_is_cheap():
    code = ("import sys, json; from stages.lib.trt_env import environment_fingerprint as f; fp = f(); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(json.dumps(fp))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=60)
    assert out.returncode == 0, out.stderr
    fp = json.loads(out.stdout)
    assert set(fp) == {"tensorrt", "cuda", "gpu", "compute_capability"}
    assert fp["cuda"] == (fp["gpu"] is not None)


def test_cuda_python_errors_are_pipeline_errors():
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed")
    if trt_env.gpu_info() is not None:
        pytest.skip("a CUDA GPU is visible: cudaStreamCreate would succeed")
    with pytest.raises(PipelineError, match="cudaStreamCreate"):
        trt_buffers._CudaPythonBuffers()
