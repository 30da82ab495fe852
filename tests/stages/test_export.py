"""Stage `export`: four checked ONNX files, onnxruntime parity, dynamic batch, metadata, graph identity."""
from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from stages.lib.errors import PipelineError

KINDS = {"merged": "model.onnx", "vanilla": "vanilla.onnx", "unmerged": "unmerged.onnx", "teacher": "teacher.onnx"}


def _ctx(upstream, out, cfg=None):
    from stages.lib.context import StageContext

    names = ("data", "teacher", "distill", "merge")
    return StageContext(name="export", out_dir=out, run_dir=out.parent, cfg=cfg or _cfg(upstream),
                        inputs={k: upstream[k] for k in names},
                        input_records={k: upstream["records"][k] for k in names}, log=lambda m: None)


def _cfg(upstream):
    cfg = upstream["cfg"].model_copy(deep=True)
    cfg.export.parity_samples = 48
    return cfg


@pytest.fixture(scope="module")
def exported(upstream, tmp_path_factory):
    """One real export run shared by the tests below (the expensive part: ~15 s on 2 cores)."""
    from pipeline.graph import stage_module

    export_stage = stage_module("export")

    out = tmp_path_factory.mktemp("export")
    t0 = time.perf_counter()
    metrics = export_stage.run(_ctx(upstream, out))
    seconds = time.perf_counter() - t0
    report = json.loads((out / "export.json").read_text())
    print(f"\nexport stage: {seconds:.1f} s in total; per model: "
          + ", ".join(f"{k} {v['export_seconds']:.1f} s" for k, v in report["models"].items()))
    return {"dir": out, "metrics": metrics, "report": report, "seconds": seconds}


def _torch_models(upstream):
    from models.norm import LogitsOnly
    from stages.lib.checkpoints import load_model, load_norm_student

    merged, _ = load_model(upstream["merge"] / "model.pt")
    ns, _ = load_norm_student(upstream["distill"] / "norm_student.pt")
    teacher, _ = load_model(upstream["teacher"] / "model.pt")
    return {"merged": merged, "vanilla": merged, "unmerged": LogitsOnly(ns).eval(), "teacher": teacher}


def test_all_files_exist_and_pass_the_full_checker(exported):
    import onnx

    files = sorted(p.name for p in exported["dir"].iterdir())
    assert files == sorted([*KINDS.values(), "export.json"])  # no temporary leftovers
    for name in KINDS.values():
        onnx.checker.check_model(str(exported["dir"] / name), full_check=True)
    m = exported["metrics"]
    assert m["opset"] == 18 and m["exporter"] == "dynamo" and m["ort_parity_ok"] is True
    assert all(m[f"{f.replace('.', '_')}_bytes"] == (exported["dir"] / f).stat().st_size for f in KINDS.values())
    from stages.lib.io import sha256_file

    assert m["model_onnx_sha256"] == sha256_file(exported["dir"] / "model.onnx")


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_matches_torch_at_any_batch(exported, upstream, batch):
    from stages.lib import onnx_utils

    torch.manual_seed(batch)
    x = torch.randn(batch, 1, 28, 28)
    for kind, model in _torch_models(upstream).items():
        got = onnx_utils.run_ort(onnx_utils.ort_session(exported["dir"] / KINDS[kind]), x.numpy())
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == (batch, 10), kind
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4, err_msg=kind)


def test_stage_reports_parity_per_model(exported):
    for kind, facts in exported["report"]["models"].items():
        p = facts["parity"]
        assert p["ok"] and p["samples"] == 48 and p["elements"] == 48 * 10, kind
        assert p["max_abs_diff"] < 1e-3 and p["top1_agreement"] == 1.0, kind
    assert exported["metrics"]["ort_max_abs_diff"] == max(f["parity"]["max_abs_diff"]
                                                          for f in exported["report"]["models"].values())


def test_metadata_props(exported, upstream):
    import pipeline
    from stages.lib.io import sha256_file
    from stages.lib.onnx_utils import read_metadata

    dataset = json.loads((upstream["data"] / "dataset.json").read_text())
    sources = {"merged": upstream["merge"] / "model.pt", "vanilla": upstream["merge"] / "model.pt",
               "unmerged": upstream["distill"] / "norm_student.pt", "teacher": upstream["teacher"] / "model.pt"}
    for kind, name in KINDS.items():
        md = read_metadata(exported["dir"] / name)
        assert md["kind"] == kind
        assert md["model"] == ("resnet14" if kind == "teacher" else "resnet8")
        assert json.loads(md["classes"]) == dataset["classes"] and md["num_classes"] == "10"
        assert md["input_layout"] == "NCHW" and json.loads(md["input_shape"]) == [-1, 1, 28, 28]
        assert json.loads(md["mean"]) == dataset["mean"] and json.loads(md["std"]) == dataset["std"]
        assert md["torch_version"] == torch.__version__ and md["norm_pipeline_version"] == pipeline.__version__
        assert md["source_sha256"] == sha256_file(sources[kind]) and md["exporter"] == "dynamo"


def test_graph_identity(exported):
    from stages.lib.onnx_utils import compare_graphs, graph_signature

    ident = exported["report"]["graph_identity"]
    assert ident["merged_vs_vanilla"]["identical"] is True and exported["metrics"]["graph_identical"] is True
    un = ident["unmerged_vs_vanilla"]
    assert un["identical"] is False and un["extra_ops"].get("Conv", 0) >= 2 and un["extra_params"] > 0
    assert exported["metrics"]["unmerged_extra_ops"] == sum(un["extra_ops"].values())
    sig = {k: graph_signature(exported["dir"] / f) for k, f in KINDS.items()}
    assert exported["metrics"]["onnx_ops"] == len(sig["merged"]["ops"])
    assert sig["merged"]["inputs"][0][2] == ["batch", 1, 28, 28]  # dynamic batch axis
    assert compare_graphs(sig["merged"], sig["vanilla"])["identical"]
    assert not compare_graphs(sig["teacher"], sig["vanilla"])["identical"]  # a different network is told apart


def test_parity_failure_raises_after_writing_the_report(exported, upstream, tmp_path, monkeypatch):
    from pipeline.graph import stage_module
    from stages.lib import onnx_utils

    export_stage = stage_module("export")

    def reuse(model, path, *, kind, **_):  # skip the slow export: the files are the real ones
        shutil.copy(exported["dir"] / KINDS[kind], path)
        return {"exporter": "dynamo", "dynamo_error": None}

    real_run = onnx_utils.run_ort
    monkeypatch.setattr(onnx_utils, "export_onnx", reuse)
    monkeypatch.setattr(onnx_utils, "run_ort", lambda s, x: real_run(s, x) + 1e-2)
    out = tmp_path / "export"
    out.mkdir()
    with pytest.raises(PipelineError, match=r"onnxruntime output differs from PyTorch beyond export.atol"):
        export_stage.run(_ctx(upstream, out))
    report = json.loads((out / "export.json").read_text())
    assert report["parity"]["ok"] is False
    assert all(f["parity"]["failed_elements"] > 0 for f in report["models"].values())


class _Zeta(nn.Module):
    """aten::special_zeta has no ONNX translation in either exporter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.zeta(x.flatten(1)[:, :10].abs() + 2, torch.ones(1))


def test_unexportable_model_raises(upstream, tmp_path, monkeypatch):
    from pipeline.graph import stage_module

    export_stage = stage_module("export")

    real = export_stage.load_models

    def with_bad_teacher(ctx):
        models = real(ctx)
        return {"teacher": {**models["teacher"], "model": _Zeta()}, **{k: v for k, v in models.items() if k != "teacher"}}

    monkeypatch.setattr(export_stage, "load_models", with_bad_teacher)
    out = tmp_path / "export"
    out.mkdir()
    with pytest.raises(PipelineError, match=r"^ONNX export of teacher failed: ") as err:
        export_stage.run(_ctx(upstream, out))
    assert "zeta" in str(err.value) and "\n" not in str(err.value)  # the reason, on one line
    assert list(out.iterdir()) == []  # nothing half-written


def test_torchscript_fallback_is_recorded(tmp_path, monkeypatch):
    from models.registry import create_model
    from stages.lib import onnx_utils

    real = onnx_utils._torch_export

    def no_dynamo(*args, dynamo, **kw):
        if dynamo:
            raise RuntimeError("dynamo exporter unavailable\nmore detail")
        return real(*args, dynamo=dynamo, **kw)

    monkeypatch.setattr(onnx_utils, "_torch_export", no_dynamo)
    model = create_model("resnet8", num_classes=10, in_chans=1).eval()
    info = onnx_utils.export_onnx(model, tmp_path / "m.onnx", kind="vanilla", example=torch.randn(2, 1, 28, 28),
                                  opset=18, max_batch=8, metadata={"kind": "vanilla"})
    assert info == {"exporter": "torchscript", "dynamo_error": "dynamo exporter unavailable"}
    assert onnx_utils.read_metadata(tmp_path / "m.onnx") == {"kind": "vanilla", "exporter": "torchscript"}
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    got = onnx_utils.run_ort(onnx_utils.ort_session(tmp_path / "m.onnx"), x)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.from_numpy(x)).numpy(), rtol=1e-3, atol=1e-4)


def test_compare_outputs_follows_polygraphy():
    from stages.lib.onnx_utils import compare_outputs

    expected = np.array([100.0, 1.0])
    ok = compare_outputs(expected + [0.5, 0.0], expected, atol=0.1, rtol=0.01)  # 0.5 <= 1% of 100
    assert ok["ok"] and ok["max_abs_diff"] == 0.5
    bad = compare_outputs(expected + [0.0, 0.5], expected, atol=0.1, rtol=0.01)  # 0.5 > 0.1 and > 1% of 1
    assert not bad["ok"] and bad["failed_elements"] == 1 and bad["max_rel_diff"] == 0.5
    assert not compare_outputs(np.zeros((2, 3)), np.zeros((3, 3)), atol=1, rtol=1)["ok"]
