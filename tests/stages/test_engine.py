"""stages/lib/trt_*.py and the engine stage: pure parts on CPU (fp16 ONNX, compatibility rules, sidecars,
parity bookkeeping with fake engines); real TensorRT builds only where TensorRT and a GPU exist."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from stages.lib import trt_build, trt_env, trt_rules, trt_runtime
from stages.lib.errors import PipelineError, StageSkipped

_EXPORTS: dict[str, Path] = {}
TRT_OK, TRT_REASON = trt_env.trt_available()


def make_export_dir(upstream, dest: Path) -> Path:
    """A minimal finished `export` folder: model.onnx of the merged student (dynamo, dynamic batch, metadata).

    Cached per upstream run so test modules share one export (the dynamo exporter takes ~10 s here).
    """
    key = str(upstream["base"])
    if key in _EXPORTS:  # exported once per session; each caller gets its own copy at dest
        import shutil

        if Path(dest) != _EXPORTS[key]:
            shutil.copytree(_EXPORTS[key], dest, dirs_exist_ok=True)
        return Path(dest)
    import onnx
    import torch

    from stages.lib.checkpoints import load_model

    meta = json.loads((upstream["data"] / "dataset.json").read_text())
    model, m_meta = load_model(upstream["merge"] / "model.pt")
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(2, 1, 28, 28),), str(path), input_names=["input"],
                          output_names=["logits"], opset_version=18, dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    proto = onnx.load(str(path))
    props = {"classes": json.dumps(meta["classes"]), "mean": json.dumps(meta["mean"]), "std": json.dumps(meta["std"]),
             "input_layout": "NCHW", "input_shape": json.dumps([-1, 1, 28, 28]), "num_classes": "10",
             "model": m_meta["model"], "kind": "merged"}
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(path))
    (dest / "export.json").write_text(json.dumps({"models": {"merged": {"file": "model.onnx"}}}))
    _EXPORTS[key] = dest
    return dest


@pytest.fixture(scope="module")
def export_dir(upstream, tmp_path_factory):
    return make_export_dir(upstream, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def val_x(upstream):
    from stages.lib.datasets import val_batches

    meta = json.loads((upstream["data"] / "dataset.json").read_text())
    x, y = next(iter(val_batches(meta, batch_size=64)))
    return x.numpy(), y.numpy()


def _ort(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- fp16 ONNX
def test_fp16_conversion_close_to_fp32(export_dir, val_x, tmp_path):
    import onnx

    dst = tmp_path / "model_fp16.onnx"
    stats = trt_build.convert_onnx_to_fp16(export_dir / "model.onnx", dst)
    g = onnx.load(str(dst)).graph
    assert stats["initializers"] > 0 and stats["clipped_values"] == 0
    assert [i.type.tensor_type.elem_type for i in g.input] == [onnx.TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in g.output] == [onnx.TensorProto.FLOAT]
    assert not [i.name for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert g.node[0].op_type == "Cast" and g.node[-1].op_type == "Cast"
    assert {p.key for p in onnx.load(str(dst)).metadata_props} >= {"classes", "mean", "std"}
    x = val_x[0]
    a = _ort(export_dir / "model.onnx").run(["logits"], {"input": x})[0]
    b = _ort(dst).run(["logits"], {"input": x})[0]
    assert b.dtype == np.float32 and b.shape == a.shape
    err = np.abs(a - b).max() / np.abs(a).max()
    assert 0 < err < 1e-2, err  # > 0: the arithmetic really is fp16 now
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.95


def _synthetic(path: Path) -> None:
    """Constants, Resize scales (fp32-only input), ConstantOfShape, an internal Cast, two outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"), numpy_helper.from_array(np.array([1, 4, 1, 1], np.int64), "shape"),
             numpy_helper.from_array(np.array([1e6, 1.0, 1e6, 2.0], np.float32).reshape(1, 4, 1, 1), "big")]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Constant", [], ["k"], value_float=0.5),
             helper.make_node("Mul", ["c", "k"], ["m"]), helper.make_node("Resize", ["m", "", "scales"], ["r"], mode="nearest"),
             helper.make_node("ConstantOfShape", ["shape"], ["z"]), helper.make_node("Add", ["r", "z"], ["a"]),
             helper.make_node("Cast", ["a"], ["a32"], to=TensorProto.FLOAT), helper.make_node("Relu", ["a32"], ["y"]),
             helper.make_node("GlobalAveragePool", ["y"], ["out"]), helper.make_node("Min", ["out", "big"], ["out2"])]
    graph = helper.make_graph(nodes, "syn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2, 5, 5])],
                         [helper.make_tensor_value_info("out2", TensorProto.FLOAT, ["b", 4, 1, 1]),
                          helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, 10, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_fp16_conversion_edge_cases(tmp_path):
    _synthetic(tmp_path / "s.onnx")
    stats = trt_build.convert_onnx_to_fp16(tmp_path / "s.onnx", tmp_path / "s16.onnx")
    assert stats["constants"] == 1 and stats["clipped_values"] == 2  # 1e6 does not fit in fp16: clipped to 65504
    assert stats["casts"] == 4  # input, two outputs, Resize scales back to fp32
    x = np.random.default_rng(1).standard_normal((3, 2, 5, 5)).astype(np.float32)
    for a, b in zip(_ort(tmp_path / "s.onnx").run(None, {"x": x}), _ort(tmp_path / "s16.onnx").run(None, {"x": x}), strict=True):
        assert b.dtype == np.float32 and b.shape == a.shape
        np.testing.assert_allclose(b, a, atol=2e-2, rtol=2e-2)


def test_fp16_conversion_refuses_subgraphs(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "b", [], [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "if.onnx"))
    with pytest.raises(PipelineError, match="subgraph"):
        trt_build.convert_onnx_to_fp16(tmp_path / "if.onnx", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


# ----------------------------------------------------------------------------- the stage without TensorRT
@pytest.mark.skipif(TRT_OK, reason="TensorRT and a GPU are present here")
def test_engine_stage_skips_without_tensorrt(make_ctx, export_dir):
    from pipeline.graph import stage_module

    engine_stage = stage_module("engine")

    assert "tensorrt" in TRT_REASON.lower() or "gpu" in TRT_REASON.lower()
    with pytest.raises(StageSkipped) as e:
        engine_stage.run(make_ctx("engine", inputs={"export": export_dir}))
    assert str(e.value) == TRT_REASON


# ----------------------------------------------------------------------------- the stage, with fake engines
class FakeRunner:
    """Stands in for TrtRunner: onnxruntime plus optional noise; insists the batch fits the engine profile."""

    noise = {"fp32": 0.0, "fp16": 0.0}
    onnx_path: Path = Path("model.onnx")
    seen: list = []
    closed: list = []

    def __init__(self, plan_path, sidecar_path=None):
        side = trt_rules.load_sidecar(trt_rules.sidecar_path_for(plan_path))
        self.precision, self.notes = side["precision"], []
        self.min, self.max = side["profile"]["min"][0], side["profile"]["max"][0]
        self.session, self.rng = _ort(self.onnx_path), np.random.default_rng(0)

    def infer(self, x):
        assert self.min <= len(x) <= self.max, len(x)
        FakeRunner.seen.append(len(x))
        out = self.session.run(["logits"], {"input": x})[0]
        return out + np.float32(self.noise[self.precision]) * self.rng.standard_normal(out.shape).astype(np.float32)

    def time(self, x, iters):
        assert len(x) <= self.max
        return [0.25] * iters

    def close(self):
        FakeRunner.closed.append(self.precision)


def fake_build(onnx_path, plan_path, *, precision, min_batch, opt_batch, max_batch, timing_cache_path=None, **kw):
    Path(plan_path).write_bytes(b"fake plan " + precision.encode())
    ins, outs = trt_build.onnx_io(onnx_path)
    side = trt_rules.make_sidecar(plan_path=plan_path, onnx_path=onnx_path, precision=precision, fp16_mode=None,
                            tensorrt_version="10.3.0.26", gpu={"name": "Fake GPU", "compute_capability": "8.7"},
                            profile={"input": "input", **trt_rules.profile_shapes(ins[0]["shape"], min_batch, opt_batch, max_batch)},
                            hardware_compatibility=kw.get("hardware_compatibility", "none"), inputs=ins, outputs=outs,
                            build_seconds=0.1, optimization_level=kw.get("optimization_level", 3),
                            workspace_mb=kw.get("workspace_mb", 1024))
    assert timing_cache_path is not None
    trt_rules.sidecar_path_for(plan_path).write_text(json.dumps(side))
    return side


@pytest.fixture
def fake_trt(monkeypatch, export_dir):
    monkeypatch.setattr(trt_env, "trt_available", lambda: (True, "fake TensorRT"))
    monkeypatch.setattr(trt_build, "build_engine", fake_build)
    monkeypatch.setattr(trt_runtime, "TrtRunner", FakeRunner)
    monkeypatch.setattr(FakeRunner, "onnx_path", export_dir / "model.onnx")
    monkeypatch.setattr(FakeRunner, "noise", {"fp32": 0.0, "fp16": 0.0})
    FakeRunner.seen, FakeRunner.closed = [], []
    return FakeRunner


def _cfg(upstream, tmp_path):
    from pipeline.config import EngineCfg

    cfg = upstream["cfg"].model_copy(deep=True)
    cfg.engine = EngineCfg(min_batch=30, opt_batch=40, max_batch=64, timing_cache=tmp_path / "cache")
    cfg.data.eval_batch_size = 50  # 128 images -> 50, 50, 28: the last batch is padded up to min_batch
    return cfg


def test_engine_stage_with_fake_engines(upstream, make_ctx, export_dir, fake_trt, tmp_path):
    from pipeline.graph import stage_module

    engine_stage = stage_module("engine")

    ctx = make_ctx("engine", inputs={"export": export_dir}, cfg=_cfg(upstream, tmp_path))
    metrics = engine_stage.run(ctx)
    report = json.loads((ctx.out_dir / "engine.json").read_text())
    assert report["ok"] and report["samples"] == 128 and set(report["engines"]) == {"fp32", "fp16"}
    for p in ("fp32", "fp16"):
        assert (ctx.out_dir / f"model_{p}.plan").is_file() and (ctx.out_dir / f"model_{p}.json").is_file()
        assert metrics[f"{p}_top1"] == metrics["ort_top1"] and metrics[f"{p}_top1_agreement"] == 1.0
        assert metrics[f"{p}_max_abs_diff"] == 0.0 and metrics[f"{p}_parity_ok"] and metrics[f"{p}_latency_ms"] == 0.25
        assert report["engines"][p]["latency"]["batch"] == 40
    assert metrics["tensorrt_version"] == "10.3.0.26" and metrics["gpu"] == "Fake GPU"
    assert 30 in fake_trt.seen and sorted(fake_trt.closed) == ["fp16", "fp32"]
    assert json.loads(json.dumps(metrics)) == metrics  # plain JSON values, nothing lost on the way to record.json
    assert metrics["samples"] == report["samples"] and metrics["ort_top1"] == report["ort_top1"] and metrics["parity_ok"]
    for p in ("fp32", "fp16"):  # every flat figure is the report's, per precision (not the other one's)
        e = report["engines"][p]
        assert (metrics[f"{p}_top1"], metrics[f"{p}_failed_elements"], metrics[f"{p}_plan_bytes"]) == \
            (e["top1"], e["parity"]["failed_elements"], e["plan_bytes"])
        assert metrics[f"{p}_plan_bytes"] == (ctx.out_dir / f"model_{p}.plan").stat().st_size


def test_engine_stage_parity_failure_writes_report(upstream, make_ctx, export_dir, fake_trt, tmp_path, monkeypatch):
    from pipeline.graph import stage_module

    engine_stage = stage_module("engine")

    monkeypatch.setattr(FakeRunner, "noise", {"fp32": 0.0, "fp16": 1.0})
    ctx = make_ctx("engine", inputs={"export": export_dir}, cfg=_cfg(upstream, tmp_path))
    with pytest.raises(PipelineError, match="fp16: .* elements off"):
        engine_stage.run(ctx)
    report = json.loads((ctx.out_dir / "engine.json").read_text())
    assert not report["ok"] and report["engines"]["fp32"]["parity"]["ok"]
    assert not report["engines"]["fp16"]["parity"]["ok"] and report["engines"]["fp16"]["parity"]["failed_elements"] > 0
    assert sorted(fake_trt.closed) == ["fp16", "fp32"]


# ----------------------------------------------------------------------------- the strict fake TensorRT
@pytest.mark.parametrize("version", ["10.3.0", "11.4.0"])
def test_build_and_run_with_fake_tensorrt(monkeypatch, export_dir, val_x, tmp_path, version):
    """The student's real ONNX through build_engine and TrtRunner with tests/fakes (TensorRT 10: FP16 builder
    flag; 11: strongly typed, an fp16 copy of the ONNX), every device buffer freed afterwards."""
    from tests.fakes import fake_cuda, fake_tensorrt

    fake_cuda.DEVICE.clear()
    fake_cuda.install(monkeypatch)
    fake = fake_tensorrt.install(monkeypatch, version)
    x = val_x[0]
    ref = _ort(export_dir / "model.onnx").run(["logits"], {"input": x})[0]
    for precision in ("fp32", "fp16"):
        plan = tmp_path / f"model_{precision}.plan"
        side = trt_build.build_engine(export_dir / "model.onnx", plan, precision=precision, min_batch=1, opt_batch=8,
                                max_batch=64, workspace_mb=256, hardware_compatibility="ampere_plus",
                                timing_cache_path=tmp_path / "cache", log=lambda m: None)
        fp16_mode = None if precision == "fp32" else ("fp16_onnx" if version.startswith("11") else "builder_flag")
        assert side["fp16_mode"] == fp16_mode and side["tensorrt_version"] == version
        assert plan.read_bytes().startswith(fake_tensorrt.MAGIC) and trt_rules.load_sidecar(plan.with_suffix(".json")) == side
        with trt_runtime.TrtRunner(plan) as runner:
            out = runner.infer(x)
            assert runner.time(x[:8], 3) == [0.5] * 3
            with pytest.raises(PipelineError, match="outside the engine's profile"):
                runner.infer(np.zeros((65, 1, 28, 28), np.float32))
        err = np.abs(out - ref).max()
        assert err == 0 if fp16_mode != "fp16_onnx" else 0 < err < 1e-2 * np.abs(ref).max()
    builds = [c[1] for c in fake._fake.calls if c[0] == "build"]
    assert [b["hw"] for b in builds] == ["AMPERE_PLUS", "AMPERE_PLUS"]
    assert "TF32" not in builds[0]["flags"] and "TF32" in builds[1]["flags"]  # fp32 means fp32; fp16 keeps the default
    assert ("FP16" in builds[1]["flags"]) == version.startswith("10")
    assert builds[0]["pools"] == {"WORKSPACE": 256 << 20} and ("create_network", 0) in fake._fake.calls
    assert builds[0]["profile"] == {"input": [[1, 1, 28, 28], [8, 1, 28, 28], [64, 1, 28, 28]]}
    assert (tmp_path / "cache").read_bytes() == b"FAKECACHE2"  # loaded by the second build, extended, saved again
    if version.startswith("10.3"):
        with pytest.raises(PipelineError, match="SAME_COMPUTE_CAPABILITY"):
            trt_build.build_engine(export_dir / "model.onnx", tmp_path / "x.plan", precision="fp32", min_batch=1, opt_batch=1,
                             max_batch=1, hardware_compatibility="same_compute_capability")
    (tmp_path / "model_fp32.plan").write_bytes(fake_tensorrt.MAGIC + b"tampered")
    with pytest.raises(PipelineError, match="does not match its sidecar"):
        trt_runtime.TrtRunner(tmp_path / "model_fp32.plan")
    assert not fake_cuda.DEVICE  # every fake device buffer was freed


# ----------------------------------------------------------------------------- real TensorRT (GPU machines)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.tensorrt
@pytest.mark.skipif(not TRT_OK, reason=f"needs TensorRT and a GPU: {TRT_REASON}")
def test_build_and_run_engine_matches_onnxruntime(export_dir, val_x, tmp_path, precision):
    from stages.lib.io import sha256_file

    plan = tmp_path / f"model_{precision}.plan"
    side = trt_build.build_engine(export_dir / "model.onnx", plan, precision=precision, min_batch=1, opt_batch=8, max_batch=64,
                            workspace_mb=256, timing_cache_path=tmp_path / "cache")
    assert side["plan_sha256"] == sha256_file(plan) and (tmp_path / "cache").stat().st_size > 0
    assert side["tensorrt_version"] == trt_env.tensorrt_version() and side["profile"]["max"] == [64, 1, 28, 28]
    x = val_x[0]
    ref = _ort(export_dir / "model.onnx").run(["logits"], {"input": x})[0]
    tol = 1e-3 if precision == "fp32" else 5e-2
    with trt_runtime.TrtRunner(plan) as runner:
        out = runner.infer(x)
        assert out.shape == ref.shape and np.abs(out - ref).max() <= tol * max(1.0, np.abs(ref).max())
        assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.95
        np.testing.assert_allclose(runner.infer(x[:1]), out[:1], atol=tol, rtol=tol)
        ms = runner.time(x[:8], 20)
        assert len(ms) == 20 and min(ms) > 0
        with pytest.raises(PipelineError, match="outside the engine's profile"):
            runner.infer(np.zeros((65, 1, 28, 28), np.float32))


@pytest.mark.tensorrt
@pytest.mark.skipif(not TRT_OK, reason=f"needs TensorRT and a GPU: {TRT_REASON}")
def test_engine_stage_on_gpu(upstream, make_ctx, export_dir, tmp_path):
    from pipeline.graph import stage_module

    engine_stage = stage_module("engine")

    ctx = make_ctx("engine", inputs={"export": export_dir}, cfg=_cfg(upstream, tmp_path))
    metrics = engine_stage.run(ctx)
    assert metrics["parity_ok"] and metrics["fp32_top1_agreement"] >= 0.99 and metrics["fp16_top1_agreement"] >= 0.95
