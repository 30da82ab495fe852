"""The fake TensorRT's runtime side: Runtime, engine, execution context. An "engine" is the ONNX run by
onnxruntime on the CPU, reading and writing the fake device memory of ``tests.fakes.fake_cuda``. Defined per
fake module by ``runtime_api`` (tests/fakes/fake_tensorrt.py ``make``)."""
from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np

from tests.fakes import fake_cuda
from tests.fakes.fake_trt_base import _DTYPES, MAGIC, NULLPTR, Faults, _check, _onnx_io, _shape_arg


def runtime_api(t: SimpleNamespace, fake: Faults) -> dict[str, type]:
    """The runtime classes of the fake ``t`` (its version, enums and helpers), switched by ``fake``."""
    version = t.version
    TensorIOMode = t.TensorIOMode
    DataType = t.DataType
    Dims = t.Dims
    ILogger = t.ILogger
    nptype = t.nptype
    log = t.log

    class IExecutionContext:
        __slots__ = ("_engine", "_shapes", "_addr")

        def __init__(self, engine: Any) -> None:
            self._engine, self._shapes, self._addr = engine, {}, {}

        def set_input_shape(self, name: str, shape: Any) -> bool:
            _check(name, str, "set_input_shape")
            shape = _shape_arg(shape, "set_input_shape")
            lo, _, hi = self._engine._profile.get(name, (None, None, None))
            if fake.reject_shapes or lo is None or len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi, strict=False)):
                log(f"Error: set_input_shape({name}, {shape}) outside the profile")
                return False
            self._shapes[name] = shape
            return True

        def get_tensor_shape(self, name: str) -> Dims:
            shape = list(self._engine._decl[name])
            batch = next(iter(self._shapes.values()), (-1,))[0]
            return Dims([batch if d == -1 else d for d in shape])

        def set_tensor_address(self, name: str, memory: int) -> bool:
            _check(memory, int, "set_tensor_address")
            self._addr[name] = memory
            return name in self._engine._decl

        def execute_async_v3(self, stream_handle: int) -> bool:
            _check(stream_handle, int, "execute_async_v3")
            eng = self._engine
            if set(self._addr) != set(eng._decl) or not self._shapes:
                log("Error: execute_async_v3 before every address and input shape was set")
                return False
            feeds = {}
            for n in eng._inputs:
                dt = np.dtype(nptype(eng._types[n]))
                shape = self._shapes[n]
                feeds[n] = fake_cuda.region(self._addr[n], int(np.prod(shape)) * dt.itemsize).view(dt).reshape(shape).copy()
            outs = eng._session.run(eng._outputs, feeds)
            for n, out in zip(eng._outputs, outs, strict=True):
                out = np.ascontiguousarray(out, dtype=nptype(eng._types[n]))
                fake_cuda.region(self._addr[n], out.nbytes)[:] = out.reshape(-1).view(np.uint8)
            return True

    class ICudaEngine:
        __slots__ = ("_session", "_inputs", "_outputs", "_types", "_decl", "_profile")

        def __init__(self, onnx_bytes: bytes, profile: dict) -> None:
            import onnxruntime as ort

            ins, outs = _onnx_io(onnx_bytes)
            self._session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
            self._inputs, self._outputs = [i["name"] for i in ins], [o["name"] for o in outs]
            self._types = {t["name"]: getattr(DataType, _DTYPES[t["elem"]]) for t in ins + outs}
            self._decl = {t["name"]: t["shape"] for t in ins + outs}
            self._profile = {n: tuple(tuple(x) for x in s) for n, s in profile.items()}

        @property
        def num_io_tensors(self) -> int:
            return len(self._decl)

        def get_tensor_name(self, index: int) -> str:
            return [*self._inputs, *self._outputs][index]

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            return TensorIOMode.INPUT if name in self._inputs else TensorIOMode.OUTPUT if name in self._outputs else TensorIOMode.NONE

        def get_tensor_dtype(self, name: str) -> DataType:
            return self._types[name]

        def get_tensor_shape(self, name: str) -> Dims:
            return Dims(self._decl[name])

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
            if profile_index != 0 or name not in self._profile:
                raise IndexError(f"no profile {profile_index} for {name}")
            return [Dims(s) for s in self._profile[name]]

        def create_execution_context(self) -> Optional[IExecutionContext]:
            return None if fake.context_fails else IExecutionContext(self)

    class Runtime:
        __slots__ = ("_logger", "_host_code")

        def __init__(self, logger: Any) -> None:
            _check(logger, ILogger, "Runtime.__init__")
            if fake.cuda_fails:
                raise TypeError(NULLPTR)
            self._logger, self._host_code = logger, False

        @property
        def engine_host_code_allowed(self) -> bool:
            return self._host_code

        @engine_host_code_allowed.setter
        def engine_host_code_allowed(self, value: bool) -> None:
            self._host_code = bool(value)

        def deserialize_cuda_engine(self, serialized_engine: Any) -> Optional[ICudaEngine]:
            data = memoryview(serialized_engine).tobytes()
            if fake.deserialize_fails or not data.startswith(MAGIC):
                log("Error: deserialization failed: not a plan")
                return None
            head, _, onnx_bytes = data[len(MAGIC):].partition(b"\n")
            header = json.loads(head)
            if header["version"] != version:
                log(f"Error: The engine plan file is not compatible with this version of TensorRT, expecting library "
                    f"version {version} got {header['version']}, please rebuild.")
                return None
            return ICudaEngine(onnx_bytes, header["profile"])

    return {"IExecutionContext": IExecutionContext, "ICudaEngine": ICudaEngine, "Runtime": Runtime}
