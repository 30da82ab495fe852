"""ONNX -> FP16 copy for TensorRT 11 (strongly typed networks: no BuilderFlag.FP16; the ONNX must carry fp16).

Float weights and compute become float16; graph inputs and outputs stay float32 (Cast nodes at the edges), so
callers feed and read float32 exactly as with the fp32 model. Pure ONNX, tested with onnxruntime on CPU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.lib.errors import PipelineError
from stages.lib.io import atomic_write_bytes

_FP32_ONLY_SLOTS = {"Resize": (2,), "Upsample": (1,)}  # scales inputs are tensor(float) only
_FP16_MAX = float(np.finfo(np.float16).max)


def _to_half(arr: np.ndarray) -> tuple[np.ndarray, int]:
    finite = np.isfinite(arr)
    clipped = int(np.count_nonzero(finite & (np.abs(arr) > _FP16_MAX)))
    return np.where(finite, np.clip(arr, -_FP16_MAX, _FP16_MAX), arr).astype(np.float16), clipped


def convert_onnx_to_fp16(src: Path | str, dst: Path | str) -> dict:
    """FP16 weights and compute with float32 graph inputs and outputs (Cast nodes at the edges).

    TensorRT 11 builds strongly typed networks: the precision comes from the ONNX itself. Returns
    counts of what changed. Control-flow subgraphs are refused rather than converted half-way.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    F, H = TensorProto.FLOAT, TensorProto.FLOAT16
    model = onnx.load(str(src))
    g = model.graph
    for node in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise PipelineError(f"fp16 conversion of {src}: node {node.name or node.op_type} has a subgraph, which is not supported")
    stats = {"initializers": 0, "clipped_values": 0, "casts": 0, "constants": 0}
    inits = {i.name for i in g.initializer}
    for init in g.initializer:
        if init.data_type == F:
            half, clipped = _to_half(numpy_helper.to_array(init))
            init.CopyFrom(numpy_helper.from_array(half, init.name))
            stats["initializers"] += 1
            stats["clipped_values"] += clipped
    for node in g.node:
        _node_to_fp16(node, stats, F, H, helper, numpy_helper)
    used = {n for node in g.node for n in (*node.input, *node.output)} | {v.name for v in (*g.input, *g.output)}

    def fresh(base: str) -> str:
        name, i = f"{base}__fp16", 0
        while name in used:
            i += 1
            name = f"{base}__fp16_{i}"
        used.add(name)
        return name

    head, body, tail = [], [], []
    renamed: dict[str, str] = {}
    for vi in g.input:
        if vi.type.tensor_type.elem_type == F and vi.name not in inits:
            renamed[vi.name] = fresh(vi.name)
            head.append(helper.make_node("Cast", [vi.name], [renamed[vi.name]], to=H, name=f"{vi.name}_to_fp16"))
        elif vi.name in inits and vi.type.tensor_type.elem_type == F:
            vi.type.tensor_type.elem_type = H
    out_names = {vi.name for vi in g.output if vi.type.tensor_type.elem_type == F}
    if out_names & set(renamed):
        raise PipelineError(f"fp16 conversion of {src}: a graph output is also a graph input")
    for name in out_names:
        renamed[name] = fresh(name)
        tail.append(helper.make_node("Cast", [renamed[name]], [name], to=F, name=f"{name}_to_fp32"))
    for node in g.node:
        for i, n in enumerate(node.input):
            if n in renamed:
                node.input[i] = renamed[n]
        for i, n in enumerate(node.output):
            if n in renamed:
                node.output[i] = renamed[n]
        for slot in _FP32_ONLY_SLOTS.get(node.op_type, ()):
            if slot < len(node.input) and node.input[slot]:
                cast_out = fresh(node.input[slot] + "_fp32")
                body.append(helper.make_node("Cast", [node.input[slot]], [cast_out], to=F, name=f"{cast_out}_cast"))
                node.input[slot] = cast_out
                stats["casts"] += 1
        body.append(node)
    stats["casts"] += len(head) + len(tail)
    del g.node[:]
    g.node.extend(head + body + tail)
    for vi in g.value_info:
        if vi.type.tensor_type.elem_type == F:
            vi.type.tensor_type.elem_type = H
    try:
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:  # noqa: BLE001 - any checker failure means the conversion is unusable
        raise PipelineError(f"fp16 conversion of {src} produced an invalid graph ({str(e).splitlines()[0][:200]}); "
                            "build fp16 engines on TensorRT 10.x (BuilderFlag.FP16) or export the model in half precision") from None
    atomic_write_bytes(dst, model.SerializeToString())
    return stats


def _node_to_fp16(node, stats: dict, F: int, H: int, helper, numpy_helper) -> None:
    """Retype float32 constants and dtype attributes inside one node."""
    for attr in node.attribute:
        if attr.name == "to" and node.op_type == "Cast" and attr.i == F:
            attr.i = H
        elif attr.name == "dtype" and node.op_type in ("EyeLike", "RandomNormal", "RandomUniform") and attr.i == F:
            attr.i = H
        elif attr.name == "value" and attr.t.data_type == F:
            half, clipped = _to_half(numpy_helper.to_array(attr.t))
            attr.t.CopyFrom(numpy_helper.from_array(half, attr.t.name))
            stats["constants"] += 1
            stats["clipped_values"] += clipped
    if node.op_type == "Constant" and node.attribute and node.attribute[0].name in ("value_float", "value_floats"):
        a = node.attribute[0]
        arr = np.array(a.f if a.name == "value_float" else list(a.floats), dtype=np.float32)
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(_to_half(arr)[0])))
        stats["constants"] += 1
    if node.op_type in ("RandomNormal", "RandomUniform") and not any(a.name == "dtype" for a in node.attribute):
        node.attribute.append(helper.make_attribute("dtype", H))
    if node.op_type == "ConstantOfShape" and not any(a.name == "value" for a in node.attribute):
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))
