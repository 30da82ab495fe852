"""ONNX helpers for the export stage: export with a dynamic batch, metadata, onnxruntime, graph identity.

``onnx`` and ``onnxruntime`` are imported inside the functions that need them, so importing this module
costs nothing on machines that never export.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from stages.lib.errors import PipelineError
from stages.lib.io import disk_full, no_space_error

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(e: BaseException) -> str:
    """The informative line of an exporter error (the dynamo exporter puts it under "Exception summary")."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
    if "## Exception summary" in lines[:-1]:
        lines = lines[lines.index("## Exception summary") + 1 :]
    line = re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>:", r"\1:", lines[0]) if lines else type(e).__name__
    return line[:300]


@contextlib.contextmanager
def _quiet_stdout():
    """Silence fd 1 (the TorchScript exporter dumps its IR graph there from C++ when it fails)."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no real stdout: nothing to silence
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def _torch_export(model: nn.Module, example: torch.Tensor, path: Path, *, opset: int, max_batch: int,
                  dynamo: bool) -> None:
    """One torch.onnx.export call with a dynamic batch axis named ``batch``."""
    common = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=max_batch)
            torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch},), **common)
        else:
            with _quiet_stdout():
                torch.onnx.export(model, (example,), str(path), dynamo=False,
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **common)


class _Skipped(Exception):
    """The dynamo exporter was not tried."""


def export_onnx(model: nn.Module, path: Path | str, *, kind: str, example: torch.Tensor, opset: int, max_batch: int,
                metadata: Mapping[str, str], exporter: str = "auto") -> dict:
    """Export ``model`` (eval, CPU) to ``path`` atomically; embed ``metadata``; run the full ONNX checker.

    ``exporter="auto"`` tries the dynamo exporter first and the TorchScript exporter only if dynamo fails;
    ``"torchscript"`` uses TorchScript alone. Returns ``{"exporter": "dynamo" | "torchscript", "dynamo_error":
    str | None}``. Any failure is a PipelineError.
    """
    import onnx

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.onnx")
    info: dict[str, Any] = {"exporter": "dynamo", "dynamo_error": None}
    model = model.eval()
    try:
        try:
            if exporter == "torchscript":
                raise _Skipped("not tried (export.exporter=torchscript)")
            _torch_export(model, example, tmp, opset=opset, max_batch=max_batch, dynamo=True)
        except Exception as e:  # noqa: BLE001 - any exporter failure: try the other exporter
            if no_space_error(e):  # not the model's fault: say so instead of blaming an operator
                raise disk_full(path, no_space_error(e)) from None
            info.update(exporter="torchscript", dynamo_error=None if isinstance(e, _Skipped) else _first_line(e))
            try:
                _torch_export(model, example, tmp, opset=opset, max_batch=max_batch, dynamo=False)
            except Exception as e2:  # noqa: BLE001
                if no_space_error(e2):
                    raise disk_full(path, no_space_error(e2)) from None
                why = (f"{info['dynamo_error']} (TorchScript exporter: {_first_line(e2)})" if info["dynamo_error"]
                       else f"{_first_line(e2)} (TorchScript exporter; export.exporter=auto also tries dynamo)")
                raise PipelineError(f"ONNX export of {kind} failed: {why}; replace the unsupported operation in the "
                                    "model with ONNX-exportable ones") from None
        proto = onnx.load(str(tmp))
        set_metadata(proto, {**metadata, "exporter": info["exporter"]})
        onnx.save(proto, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as e:  # noqa: BLE001 - checker errors have several types
            raise PipelineError(f"ONNX checker rejected the {kind} export: {_first_line(e)}") from None
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return info


def set_metadata(proto: Any, props: Mapping[str, str]) -> None:
    """Replace ``metadata_props`` entries with ``props`` (string values), keeping other keys."""
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    for key, value in [*keep, *props.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)


def read_metadata(path: Path | str) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


# ----------------------------------------------------------------------------- onnxruntime
def ort_session(path: Path | str, threads: int | None = None):
    """A CPU onnxruntime session (warnings silenced)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_ort(session, x: np.ndarray) -> np.ndarray:
    """Logits for one NCHW float32 batch."""
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]


def compare_outputs(actual: np.ndarray, expected: np.ndarray, *, atol: float, rtol: float) -> dict:
    """Polygraphy's rule: an element fails only if ``|a-b| > atol`` AND ``|a-b| > rtol * |b|``."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        return {"ok": False, "shape_mismatch": [list(actual.shape), list(expected.shape)], "max_abs_diff": float("inf"),
                "max_rel_diff": float("inf"), "failed_elements": int(expected.size), "elements": int(expected.size)}
    diff = np.abs(actual - expected)
    rel = diff / np.maximum(np.abs(expected), np.finfo(np.float64).tiny)
    failed = (diff > atol) & (diff > rtol * np.abs(expected))
    failed |= ~np.isfinite(actual)
    return {"ok": not bool(failed.any()), "max_abs_diff": float(diff.max(initial=0.0)),
            "max_rel_diff": float(rel.max(initial=0.0)), "failed_elements": int(failed.sum()),
            "elements": int(expected.size)}


# ----------------------------------------------------------------------------- structure
def _dims(value_info: Any) -> list:
    shape = value_info.type.tensor_type.shape
    return [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in shape.dim]


def _plain_attrs(node: Any) -> tuple:
    """Node attributes that define the computation's shape (strides, pads, axes ...), not tensor values."""
    import onnx

    out = []
    for a in node.attribute:
        if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT, onnx.AttributeProto.STRING,
                      onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS, onnx.AttributeProto.STRINGS):
            v = onnx.helper.get_attribute_value(a)
            out.append((a.name, tuple(v) if isinstance(v, (list, tuple)) else v))
    return tuple(sorted(out))


def graph_signature(path: Path | str) -> dict:
    """What makes two graphs the same computation, names aside: ops in order, weights' shapes, I/O shapes."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    inits = [tuple(int(d) for d in t.dims) for t in g.initializer]
    return {
        "ops": [n.op_type for n in g.node],
        "attrs": [_plain_attrs(n) for n in g.node],
        "initializer_shapes": sorted(inits),
        "initializer_params": int(sum(int(np.prod(s)) for s in inits)),
        "inputs": [(i.name, i.type.tensor_type.elem_type, _dims(i)) for i in g.input],
        "outputs": [(o.name, o.type.tensor_type.elem_type, _dims(o)) for o in g.output],
    }


def compare_graphs(a: dict, b: dict) -> dict:
    """Structural identity of two signatures, and how ``a`` differs from ``b`` when it does."""
    checks = {"ops_equal": a["ops"] == b["ops"], "attrs_equal": a["attrs"] == b["attrs"],
              "initializers_equal": a["initializer_shapes"] == b["initializer_shapes"],
              "io_equal": a["inputs"] == b["inputs"] and a["outputs"] == b["outputs"]}
    ops_a, ops_b = Counter(a["ops"]), Counter(b["ops"])
    return {"identical": all(checks.values()), **checks, "ops": len(a["ops"]), "reference_ops": len(b["ops"]),
            "extra_ops": dict(sorted((ops_a - ops_b).items())), "missing_ops": dict(sorted((ops_b - ops_a).items())),
            "params": a["initializer_params"], "reference_params": b["initializer_params"],
            "extra_params": a["initializer_params"] - b["initializer_params"]}
