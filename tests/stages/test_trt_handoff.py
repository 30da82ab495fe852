"""The TensorRT hand-off on CPU: stages.lib.trt_* and the bundle's run_trt.py driven by the strict fake TensorRT
(tests/fakes), its surface checked against the recorded real bindings, and each failure path TensorRT has."""
from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from stages.lib import trt_buffers, trt_build, trt_env, trt_rules, trt_runtime
from stages.lib.errors import PipelineError
from tests.fakes import fake_cuda, fake_tensorrt

ROOT = Path(__file__).parents[2]
RECORD = json.loads((ROOT / "tests/fakes/trt_surface.json").read_text())
VERSIONS = {k: v["version"] for k, v in RECORD.items() if not k.startswith("_")}


# ----------------------------------------------------------------------------- helpers
def tiny_onnx(path: Path, fp16_io: bool = False) -> Path:
    """input [batch, 1, 28, 28] -> Flatten -> MatMul -> Add -> logits [batch, 10]; fp16 throughout when fp16_io
    (what ModelOpt AutoCast gives with keep_io_types=False)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dt, et = (np.float16, TensorProto.FLOAT16) if fp16_io else (np.float32, TensorProto.FLOAT)
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((784, 10)) * 0.05).astype(dt), "W"),
             numpy_helper.from_array(rng.standard_normal(10).astype(dt), "b")]
    nodes = [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["logits"])]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", et, ["batch", 1, 28, 28])],
                     [helper.make_tensor_value_info("logits", et, ["batch", 10])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(["logits"], {"input": x.astype(s.get_inputs()[0].type == "tensor(float16)" and np.float16 or np.float32)})[0]


def build(tmp_path: Path, onnx_path: Path, precision: str = "fp32", **kw) -> Path:
    plan = tmp_path / f"model_{precision}.plan"
    kw = {"min_batch": 1, "opt_batch": 4, "max_batch": 8, **kw}
    trt_build.build_engine(onnx_path, plan, precision=precision, timing_cache_path=tmp_path / "cache", log=lambda m: None, **kw)
    return plan


def load_run_trt():
    spec = importlib.util.spec_from_file_location("bundle_run_trt", ROOT / "stages/bundle_files/run_trt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- the fake against the real bindings
@pytest.mark.parametrize("key", sorted(VERSIONS))
def test_fake_surface_is_the_real_one(key):
    """Every name the fake offers exists in the real bindings of that version, and version-dependent enum
    members (FP16 gone in 11, SAME_COMPUTE_CAPABILITY from 10.9) are present exactly where they are real."""
    real, fake = RECORD[key], fake_tensorrt.surface(fake_tensorrt.make(VERSIONS[key]))
    assert not set(fake["module"]) - set(real["module"]), "module names the real bindings lack"
    for cls, names in fake["classes"].items():
        assert cls in real["classes"], cls
        assert not set(names) - set(real["classes"][cls]), (cls, set(names) - set(real["classes"][cls]))
    known = {e: set().union(*(fake_tensorrt.surface(fake_tensorrt.make(v))["enums"][e] for v in VERSIONS.values()))
             for e in fake["enums"]}
    for e, members in fake["enums"].items():
        assert set(members) == set(real["enums"][e]) & known[e], (e, VERSIONS[key])


@pytest.mark.parametrize("key", sorted(VERSIONS))
def test_fake_return_types_are_the_real_ones(key):
    """Methods return what the real ones return (IHostMemory, Dims, DataType, ...), per the recorded signatures."""
    m, checked = fake_tensorrt.make(VERSIONS[key]), 0
    for (cls, attr), sigs in ((k.split(".", 1), s) for k, s in RECORD[key]["signatures"].items()):
        fn = getattr(getattr(m, cls, None), attr, None)
        ann = getattr(fn, "__annotations__", {}).get("return") if callable(fn) else None
        if ann is None or attr.startswith("_"):
            continue
        real = {re.sub(r".*[.:]", "", s.rsplit("->", 1)[1].strip()).replace("]", "") for s in sigs if "->" in s}
        want = re.sub(r"^(Optional|List|list)\[", "", str(ann)).replace("]", "")
        want = re.sub(r"^(Optional|List|list)\[", "", want)
        assert want in real, (cls, attr, want, real)
        checked += 1
    assert checked >= 15, checked  # the record really has the signatures


def test_fake_is_strict(env):
    config = env.Builder(env.Logger(env.Logger.WARNING)).create_builder_config()
    with pytest.raises(AttributeError):
        config.builder_optimisation_level = 3  # the real pybind object has no such attribute either
    with pytest.raises(TypeError):
        config.set_flag("fp16")
    with pytest.raises(TypeError):
        env.Builder(object())
    assert config.get_flag(env.BuilderFlag.TF32)  # TensorRT's default, which fp32 builds must clear
    mem = config.create_timing_cache(b"").serialize()
    assert isinstance(mem, env.IHostMemory) and not isinstance(mem, (bytes, bytearray)) and not hasattr(mem, "startswith")
    assert memoryview(mem).tobytes().startswith(b"FAKECACHE") and mem.nbytes == len(memoryview(mem).tobytes())
    assert not hasattr(fake_tensorrt.make("11.4.0").BuilderFlag, "FP16")
    assert not hasattr(fake_tensorrt.make("10.8.0").HardwareCompatibilityLevel, "SAME_COMPUTE_CAPABILITY")


# ----------------------------------------------------------------------------- 1. exact plan version
def test_plan_version_is_checked_to_the_patch(env, tmp_path, monkeypatch):
    plan = build(tmp_path, tiny_onnx(tmp_path / "model.onnx"))
    side = trt_rules.load_sidecar(plan.with_suffix(".json"))
    here = {"tensorrt_version": "10.3.0", "gpu_name": "Fake GPU", "compute_capability": "8.7"}
    trt_rules.check_compatibility(side, here)
    run_trt = load_run_trt()
    assert run_trt.compatibility_problem(side, "10.3.0", ("Fake GPU", "8.7")) is None
    for other in ("10.3.1", "10.4.0", "10.3.0.27" if len(trt_rules.parse_version(side["tensorrt_version"])) > 3 else "10.3.2"):
        with pytest.raises(PipelineError, match=r"exact version.*rebuild the engine with trtexec on the device.*trtexec --onnx="):
            trt_rules.check_compatibility(side, {**here, "tensorrt_version": other})
        assert "trtexec --onnx=model.onnx" in run_trt.compatibility_problem(side, other, ("Fake GPU", "8.7"))
    assert trt_rules.same_tensorrt("10.3.0.26", "10.3.0") and not trt_rules.same_tensorrt("10.3.0.26", "10.3.0.30")
    fake_tensorrt.install(monkeypatch, "10.3.1")  # the device has another patch release: refused before deserializing
    with pytest.raises(PipelineError) as e:
        trt_runtime.TrtRunner(plan)
    assert "trtexec on the device" in str(e.value) and "deserialize" not in str(e.value)
    assert not fake_cuda.DEVICE
    from stages.lib.bundle_check import engine_checks  # `bundle verify` warns with the same rule and command

    warnings = engine_checks(tmp_path, {"engines": [{"sidecar": "model_fp32.json"}]})
    assert len(warnings) == 1 and warnings[0].severity == "warning"
    assert "10.3.1" in warnings[0].message and "trtexec --onnx" in warnings[0].message


# ----------------------------------------------------------------------------- 2. construction failures, None results
def test_cuda_start_failure_is_explained(env, tmp_path):
    onnx_path = tiny_onnx(tmp_path / "model.onnx")
    plan = build(tmp_path, onnx_path)
    env._fake.cuda_fails = True
    ok, reason = trt_env.trt_available()
    assert not ok and "could not start CUDA" in reason and "nullptr" in reason
    with pytest.raises(PipelineError, match="could not start CUDA.*driver"):
        build(tmp_path, onnx_path)
    with pytest.raises(PipelineError, match="could not start CUDA"):
        trt_runtime.TrtRunner(plan)
    assert not fake_cuda.DEVICE  # buffers freed on the way out
    run_trt = load_run_trt()
    with pytest.raises(SystemExit, match="could not start CUDA"):
        run_trt.Engine(plan, trt_rules.load_sidecar(plan.with_suffix(".json")))


@pytest.mark.parametrize("fault, match", [("build_fails", "could not build the fp32 engine"),
                                          ("parse_errors", "could not parse .*broken op"),
                                          ("deserialize_fails", "could not deserialize .*trtexec"),
                                          ("context_fails", "create_execution_context")])
def test_tensorrt_failures_are_pipeline_errors(env, tmp_path, fault, match):
    onnx_path = tiny_onnx(tmp_path / "model.onnx")
    if fault in ("build_fails", "parse_errors"):
        setattr(env._fake, fault, ["broken op"] if fault == "parse_errors" else True)
        with pytest.raises(PipelineError, match=match):
            build(tmp_path, onnx_path)
        assert not (tmp_path / "model_fp32.plan").exists() and not (tmp_path / "model_fp32.json").exists()
        return
    plan = build(tmp_path, onnx_path)
    setattr(env._fake, fault, True)
    with pytest.raises(PipelineError, match=match):
        trt_runtime.TrtRunner(plan)
    assert not fake_cuda.DEVICE
    with pytest.raises(SystemExit, match="could not load|execution context"):
        load_run_trt().Engine(plan, trt_rules.load_sidecar(plan.with_suffix(".json")))


# ----------------------------------------------------------------------------- 3. extras by CUDA major
def test_tensorrt_extras_match_the_cuda_driver():
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")
    packaging = pytest.importorskip("packaging.requirements", reason="needs packaging (installed with pytest)")
    Requirement = packaging.Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def reqs(name):
        return {r.name: r for r in map(Requirement, extras[name])}

    for extra, major in (("tensorrt-cu12", 12), ("tensorrt-cu13", 13)):
        r = reqs(extra)
        assert f"tensorrt-cu{major}" in r and "tensorrt" not in r, extra  # bare `tensorrt` resolves to cu13
        assert r[f"tensorrt-cu{major}"].specifier.contains("11.4.0")
        assert major == 13 or r[f"tensorrt-cu{major}"].specifier.contains("10.3.0")  # JetPack 6's TensorRT on CUDA 12
        cp = r["cuda-python"].specifier
        assert cp.contains(f"{major}.9.0") and not cp.contains(f"{major + 1}.0.0") and not cp.contains(f"{major - 1}.8.0")
    for name, spec in extras.items():  # no extra pulls the metapackage that picks CUDA 13 for everyone
        assert "tensorrt" not in {Requirement(s).name for s in spec}, name
    readme = (ROOT / "README.md").read_text()
    assert "tensorrt-cu12" in readme and "tensorrt-cu13" in readme and "580" in readme and "JetPack" in readme


# ----------------------------------------------------------------------------- 4. engine dtypes in run_trt.py
def test_run_trt_feeds_the_engines_own_dtypes(env, tmp_path):
    onnx16 = tiny_onnx(tmp_path / "model.onnx", fp16_io=True)
    plan = build(tmp_path, onnx16, max_batch=8)
    side = trt_rules.load_sidecar(plan.with_suffix(".json"))
    assert [i["dtype"] for i in side["inputs"]] == ["float16"]
    x = np.random.default_rng(2).standard_normal((19, 1, 28, 28)).astype(np.float32)
    ref = ort_run(onnx16, x).astype(np.float32)
    engine = load_run_trt().Engine(plan, side)
    out = engine.infer(x)  # 19 images: 8 + 8 + 3, each converted to fp16 on the way in
    assert out.dtype == np.float32 and out.shape == (19, 10)
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3)
    with pytest.raises(SystemExit, match=r"batch of 9 is outside the engine's profile \(1 .. 8\)"):
        engine.run_batch(x[:9])
    with trt_runtime.TrtRunner(plan) as runner:  # the pipeline's runner agrees
        np.testing.assert_allclose(runner.infer(x[:8]).astype(np.float32), ref[:8], rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- 5. platform
def test_platform_is_recorded_and_checked(env, tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.3, GCID: 1, BOARD: generic, EABI: aarch64\n")
    (tmp_path / "proc/driver/nvidia").mkdir(parents=True)
    (tmp_path / "proc/driver/nvidia/version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue\n")
    assert trt_rules.platform_info(root=tmp_path)["l4t"] == "36.4.3" and trt_rules.platform_info(root=tmp_path)["driver"] == "550.54.15"
    assert trt_rules.platform_info(root=tmp_path / "none")["l4t"] is None
    plan = build(tmp_path, tiny_onnx(tmp_path / "model.onnx"))
    side = trt_rules.load_sidecar(plan.with_suffix(".json"))
    plat = side["platform"]
    assert plat["os"] and plat["arch"] and plat["cuda_driver"] == "12.4" and plat["cuda_runtime"] == "12.6"
    here = {"tensorrt_version": side["tensorrt_version"], "gpu_name": "Fake GPU", "compute_capability": "8.7", "platform": plat}
    trt_rules.check_compatibility(side, here)
    jetson = {**plat, "arch": plat["arch"], "l4t": "36.4.3"}
    cases = [({**plat, "arch": "aarch64" if plat["arch"] != "aarch64" else "x86_64"}, "CPU architecture"),
             ({**plat, "os": "Windows"}, "operating system"), (jetson, "JetPack")]
    for p, what in cases:
        with pytest.raises(PipelineError, match=what):
            trt_rules.check_compatibility(side, {**here, "platform": p})
    amp = {**side, "hardware_compatibility": "ampere_plus", "platform": jetson}
    with pytest.raises(PipelineError, match="JetPack does not support"):
        trt_rules.check_compatibility(amp, {**here, "platform": jetson})
    notes = trt_rules.compatibility_notes(side, {**here, "platform": {**plat, "driver": "999.1"}})
    assert not notes or all("driver" in n or "GPU" in n for n in notes)
    run_trt = load_run_trt()  # the bundle's runner applies the same platform rules
    for p, _ in cases:
        assert run_trt.compatibility_problem(side, side["tensorrt_version"], ("Fake GPU", "8.7"), p)
    assert run_trt.compatibility_problem(side, side["tensorrt_version"], ("Fake GPU", "8.7"), plat) is None
    monkeypatch.setattr(trt_rules, "platform_info", lambda cuda=None, root="/": jetson)
    with pytest.raises(PipelineError, match="not supported on JetPack"):
        build(tmp_path, tmp_path / "model.onnx", hardware_compatibility="ampere_plus")


# ----------------------------------------------------------------------------- 6. no dead version-compatible path
def test_version_compatible_claims_do_not_loosen_the_check(env, tmp_path):
    plan = build(tmp_path, tiny_onnx(tmp_path / "model.onnx"))
    side = trt_rules.load_sidecar(plan.with_suffix(".json"))
    assert "version_compatible" not in side
    vc = {**side, "version_compatible": True}  # e.g. an old sidecar: nothing built it, nothing can load it so
    here = {"tensorrt_version": "10.9.0", "gpu_name": "Fake GPU", "compute_capability": "8.7"}
    with pytest.raises(PipelineError, match="exact version"):
        trt_rules.check_compatibility(vc, here)
    assert load_run_trt().compatibility_problem(vc, "10.9.0", ("Fake GPU", "8.7"))


# ----------------------------------------------------------------------------- 7. buffer backend
def test_broken_pycuda_falls_back_to_cuda_python(env, tmp_path, monkeypatch):
    fake_cuda.install(monkeypatch, pycuda="broken")
    bufs = trt_buffers._make_buffers()
    assert bufs.name == "cuda-python" and "pycuda" in bufs.note and "cuInit failed" in bufs.note
    bufs.close()
    ok, reason = trt_env.trt_available()
    assert ok and "buffers via cuda-python" in reason and "pycuda" in reason
    plan = build(tmp_path, tiny_onnx(tmp_path / "model.onnx"))
    with trt_runtime.TrtRunner(plan) as runner:
        assert runner.backend == "cuda-python" and any("cuda-python" in n and "pycuda" in n for n in runner.notes)
    engine = load_run_trt().Engine(plan, trt_rules.load_sidecar(plan.with_suffix(".json")))
    assert engine.bufs.name == "cuda-python" and "cuInit failed" in engine.bufs.note


# ----------------------------------------------------------------------------- 8. set_input_shape checked
def test_rejected_input_shape_names_shape_and_profile(env, tmp_path):
    plan = build(tmp_path, tiny_onnx(tmp_path / "model.onnx"))
    env._fake.reject_shapes = True
    with pytest.raises(PipelineError, match=r"rejected input shape \(8, 1, 28, 28\).*profile is \(1, 1, 28, 28\) .. \(8, 1, 28, 28\)"):
        trt_runtime.TrtRunner(plan)
    assert not fake_cuda.DEVICE
    with pytest.raises(SystemExit, match=r"rejected input shape \(8, 1, 28, 28\).*\(1, 1, 28, 28\) .. \(8, 1, 28, 28\)"):
        load_run_trt().Engine(plan, trt_rules.load_sidecar(plan.with_suffix(".json")))


# ----------------------------------------------------------------------------- 9. same compute capability needs Turing
def test_same_compute_capability_needs_turing(tmp_path, monkeypatch):
    fake_cuda.DEVICE.clear()
    fake_cuda.install(monkeypatch, gpu=("Tesla V100", 7, 0))
    fake = fake_tensorrt.install(monkeypatch, "10.16.1")
    with pytest.raises(PipelineError, match=r"Turing or newer.*7\.0"):
        build(tmp_path, tiny_onnx(tmp_path / "model.onnx"), hardware_compatibility="same_compute_capability")
    assert not [c for c in fake._fake.calls if c[0] == "build"]  # refused before building
    fake_cuda.install(monkeypatch, gpu=("Tesla T4", 7, 5))
    build(tmp_path, tmp_path / "model.onnx", hardware_compatibility="same_compute_capability")
    assert [c[1]["hw"] for c in fake._fake.calls if c[0] == "build"] == ["SAME_COMPUTE_CAPABILITY"]


# ----------------------------------------------------------------------------- 10. trtexec command == the build
def _trtexec_settings(cmd: str) -> dict:
    out = {}
    for tok in shlex.split(cmd.replace("\\\n", " "))[1:]:
        k, _, v = tok.lstrip("-").partition("=")
        out[k] = v or True
    return out


def _config_as_trtexec(call: dict, input_name: str) -> dict:
    """What trtexec would need to be told to build with the config TensorRT actually received."""
    lo, opt, hi = call["profile"][input_name]
    spec = lambda s: f"{input_name}:{'x'.join(map(str, s))}"  # noqa: E731
    out = {"minShapes": spec(lo), "optShapes": spec(opt), "maxShapes": spec(hi),
           "memPoolSize": f"workspace:{call['pools']['WORKSPACE'] >> 20}M", "builderOptimizationLevel": str(call["level"])}
    if "TF32" not in call["flags"]:
        out["noTF32"] = True  # trtexec enables TF32 unless told otherwise
    if "FP16" in call["flags"]:
        out["fp16"] = True
    if call["strongly_typed"]:
        out["stronglyTyped"] = True
    if call["hw"] != "NONE":
        out["hardwareCompatibilityLevel"] = {"AMPERE_PLUS": "ampere+", "SAME_COMPUTE_CAPABILITY": "sameComputeCapability"}[call["hw"]]
    return out


@pytest.mark.parametrize("version", ["10.16.1", "11.4.0"])
@pytest.mark.parametrize("hw", ["none", "ampere_plus", "same_compute_capability"])
def test_trtexec_command_is_the_pipelines_build(tmp_path, monkeypatch, version, hw):
    from types import SimpleNamespace

    from stages.lib.trt_int8 import build_int8_engine
    from stages.lib.trt_rules import trtexec_commands

    fake_cuda.DEVICE.clear()
    fake_cuda.install(monkeypatch)
    fake = fake_tensorrt.install(monkeypatch, version)
    onnx_path = tiny_onnx(tmp_path / "model.onnx")
    qdq = tiny_onnx(tmp_path / "model_int8.onnx")  # the fake builds any ONNX; the name is what the line ships
    cfg = SimpleNamespace(min_batch=2, opt_batch=4, max_batch=16, workspace_mb=512, optimization_level=4, hardware_compatibility=hw)
    shipped = trtexec_commands(cfg, trt_build.onnx_io(onnx_path)[0][0], int8=True)
    kw = dict(min_batch=2, opt_batch=4, max_batch=16, workspace_mb=512, optimization_level=4, hardware_compatibility=hw)
    for precision in ("fp32", "fp16", "int8"):
        if precision == "int8":  # the engine stage's int8 path
            build_int8_engine(qdq, tmp_path / "model_int8.plan", timing_cache_path=tmp_path / "cache", log=lambda m: None, **kw)
        else:
            build(tmp_path, onnx_path, precision, **kw)
        call = [c[1] for c in fake._fake.calls if c[0] == "build"][-1]
        side = trt_rules.load_sidecar(tmp_path / f"model_{precision}.json")
        got = _trtexec_settings(side["trtexec"])
        key = precision if precision != "fp16" else ("fp16_trt10" if version.startswith("10") else "fp16_trt11")
        assert _trtexec_settings(shipped[key]) == got  # the bundle's command is the sidecar's
        assert got.pop("onnx") == {"fp16_trt11": "model_fp16.onnx", "int8": "model_int8.onnx"}.get(key, "model.onnx")
        assert got.pop("saveEngine") == f"device_{precision}.plan"
        want = _config_as_trtexec(call, "input")
        if version.startswith("11") and precision != "int8":  # trtexec 11 is always strongly typed, as the network is
            assert want.pop("stronglyTyped")
        assert got == want, (precision, side["trtexec"])
    assert "--noTF32" in shipped["fp32"] and "--noTF32" not in shipped["fp16_trt10"]
    int8_line = shipped["int8"]
    assert "--stronglyTyped" in int8_line and "--noTF32" in int8_line and "--fp16" not in int8_line and "--int8" not in int8_line
    assert side["quantization"].startswith("explicit") and side["platform"] and side["precision"] == "int8"


def test_int8_build_refuses_precision_flags_on_a_strongly_typed_network(env, tmp_path):
    """The fake fails, as TensorRT does, when a strongly typed network also gets a precision flag."""
    from stages.lib.trt_int8 import network_flags

    builder = env.Builder(env.Logger())
    net = builder.create_network(network_flags(env))
    assert net.get_flag(env.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    env.OnnxParser(net, env.Logger()).parse_from_file(str(tiny_onnx(tmp_path / "m.onnx")))
    config = builder.create_builder_config()
    config.set_flag(env.BuilderFlag.INT8)
    assert builder.build_serialized_network(net, config) is None and "not allowed" in env._fake.log[-1]
    with pytest.raises(PipelineError, match="unsupported engine precision 'int4'"):
        trt_rules.BuildSettings(precision="int4", input_name="input", min_shape=(1,), opt_shape=(1,), max_shape=(1,))
