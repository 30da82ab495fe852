"""Shared pieces of the strict fake TensorRT (tests/fakes/fake_tensorrt.py): the fault switches, argument
checks like pybind11's, the plan format and the ONNX reader the fake engines use."""
from __future__ import annotations

from typing import Any

import numpy as np

MAGIC = b"FAKEPLAN\n"
NULLPTR = "pybind11::init(): factory function returned nullptr"
_DTYPES = {1: "FLOAT", 10: "HALF", 6: "INT32", 7: "INT64", 3: "INT8", 2: "UINT8", 9: "BOOL", 16: "BF16"}


def _vt(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:3])


class Faults:
    """The fake's switches and records (kept off the public surface: ``trt._fake``)."""

    def __init__(self, **kw: Any) -> None:
        self.cuda_fails = self.build_fails = self.deserialize_fails = self.context_fails = self.reject_shapes = False
        self.parse_errors: list[str] = []
        for k, v in kw.items():
            if not hasattr(self, k):
                raise TypeError(f"unknown fault {k!r}")
            setattr(self, k, v)
        self.calls: list[tuple] = []
        self.log: list[str] = []


def _check(value: Any, kind: Any, what: str) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"{what}(): incompatible function arguments: got {type(value).__name__}")


def _check(value: Any, kind: Any, what: str) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"{what}(): incompatible function arguments: got {type(value).__name__}")


def _shape_arg(shape: Any, what: str, kinds: tuple = (tuple, list)) -> tuple:
    if not isinstance(shape, kinds) or not all(isinstance(d, (int, np.integer)) for d in shape):
        raise TypeError(f"{what}(): incompatible function arguments: shape must be Dims or a sequence of ints")
    return tuple(int(d) for d in shape)


def _onnx_io(onnx_bytes: bytes) -> tuple[list[dict], list[dict]]:
    import onnx

    g = onnx.load_from_string(onnx_bytes).graph
    inits = {i.name for i in g.initializer}

    def describe(vi) -> dict:
        tt = vi.type.tensor_type
        return {"name": vi.name, "elem": tt.elem_type, "shape": [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]}

    return [describe(i) for i in g.input if i.name not in inits], [describe(o) for o in g.output]
