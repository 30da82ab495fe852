"""export.exporter=torchscript: the TorchScript exporter alone (what configs/tiny.yaml uses to stay fast)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.lib.errors import PipelineError


def _calls(monkeypatch) -> list[bool]:
    from stages.lib import onnx_utils

    real, seen = onnx_utils._torch_export, []

    def spy(*args, dynamo, **kw):
        seen.append(dynamo)
        return real(*args, dynamo=dynamo, **kw)

    monkeypatch.setattr(onnx_utils, "_torch_export", spy)
    return seen


def test_torchscript_only_never_tries_dynamo(tmp_path, monkeypatch):
    from models import create_model
    from stages.lib import onnx_utils

    seen = _calls(monkeypatch)
    model = create_model("resnet8", num_classes=10, in_chans=1).eval()
    info = onnx_utils.export_onnx(model, tmp_path / "m.onnx", kind="vanilla", example=torch.randn(2, 1, 28, 28),
                                  opset=18, max_batch=8, metadata={"kind": "vanilla"}, exporter="torchscript")
    assert seen == [False] and info == {"exporter": "torchscript", "dynamo_error": None}
    assert onnx_utils.read_metadata(tmp_path / "m.onnx")["exporter"] == "torchscript"
    x = np.random.default_rng(0).standard_normal((5, 1, 28, 28)).astype(np.float32)  # a batch size not exported
    with torch.no_grad():
        np.testing.assert_allclose(onnx_utils.run_ort(onnx_utils.ort_session(tmp_path / "m.onnx"), x),
                                   model(torch.from_numpy(x)).numpy(), rtol=1e-3, atol=1e-4)


def test_torchscript_only_failure_is_one_clear_error(tmp_path, monkeypatch):
    from stages.lib import onnx_utils

    def broken(*args, dynamo, **kw):
        raise RuntimeError("Unsupported: aten::weird_op\nstack")

    monkeypatch.setattr(onnx_utils, "_torch_export", broken)
    with pytest.raises(PipelineError, match=r"^ONNX export of merged failed: Unsupported: aten::weird_op "
                                            r"\(TorchScript exporter; export.exporter=auto also tries dynamo\); replace"):
        onnx_utils.export_onnx(torch.nn.Identity(), tmp_path / "m.onnx", kind="merged", example=torch.randn(2, 3),
                               opset=18, max_batch=8, metadata={}, exporter="torchscript")


def test_the_stage_exports_everything_with_torchscript(upstream, make_ctx):
    """The export stage hands export.exporter to every export: the wiring, on the real upstream artifacts."""
    import json

    from pipeline.graph import stage_module

    export_stage = stage_module("export")
    from pipeline.config import load_config

    cfg = upstream["cfg"].model_copy(update={"export": upstream["cfg"].export.model_copy(
        update={"exporter": "torchscript", "parity_samples": 16})})
    ctx = make_ctx("export", cfg=cfg)
    metrics = export_stage.run(ctx)
    files = json.loads((ctx.out_dir / "export.json").read_text())["models"]
    assert {f["exporter"] for f in files.values()} == {"torchscript"} and len(files) == 4
    assert metrics["graph_identical"] is True
    with pytest.raises(PipelineError, match=r"export\.exporter"):
        load_config(None, ["export.exporter=tensorflow"])
