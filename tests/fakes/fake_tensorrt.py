"""A strict fake ``tensorrt`` module: the slice of the Python API this project uses, failing where the real
one fails, so code that passes here does not meet its first error on a GPU machine.

Strict like the pybind11 bindings: every class has ``__slots__`` (a misspelt attribute such as
``config.builder_optimisation_level = 3`` raises AttributeError), enums are real enums (``BuilderFlag.FP16``
is absent on 11.x, ``HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY`` before 10.9), arguments are
type-checked, and results have the real types: ``IHostMemory`` (a buffer, not bytes), ``Dims`` (not a tuple),
``DataType``, ``TensorIOMode``. Its names are checked against a record of the real bindings
(tests/fakes/trt_surface.json, made by tests/fakes/record_trt_surface.py) for 10.3, 10.16 and 11.4.

An "engine" is the ONNX run by onnxruntime on the CPU, reading and writing the fake device memory of
``tests.fakes.fake_cuda``; its input/output types are the ONNX graph's (an fp16-I/O ONNX gives an fp16-I/O
engine, as TensorRT does). Plans carry the TensorRT version that built them and load only on that version.

This module makes the fake module (enums, logger, Dims, host memory) and assembles it with the builder
classes (fake_trt_build.py) and the runtime classes (fake_trt_runtime.py); shared checks, faults and the
plan format are in fake_trt_base.py.

Failure paths, switched on per fake (``make(..., **faults)``, or ``fake._fake.<fault> = ...`` later):
``cuda_fails`` (Builder/Runtime raise ``TypeError: pybind11::init(): factory function returned nullptr``),
``parse_errors`` (list of messages: parse_from_file returns False), ``build_fails`` (build_serialized_network
returns None), ``deserialize_fails`` (deserialize_cuda_engine returns None), ``context_fails``
(create_execution_context returns None), ``reject_shapes`` (set_input_shape returns False; it also does so,
like the real one, for a shape outside the profile). Like the real builder it also refuses (returns None) a
strongly typed network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; every network on 11.x) given a
precision flag (FP16/INT8/BF16).

Use::

    from tests.fakes import fake_cuda, fake_tensorrt
    fake_cuda.install(monkeypatch)                                  # device memory + cuda-python
    trt = fake_tensorrt.install(monkeypatch, "10.3.0", build_fails=True)   # sys.modules["tensorrt"]
    trt._fake.calls     # what was called, in order (builder settings, shapes, ...)
    trt._fake.log       # what TensorRT would have logged
"""
from __future__ import annotations

import ctypes
import enum
import sys
import types
from typing import Any

import numpy as np

from tests.fakes.fake_trt_base import MAGIC, NULLPTR, Faults, _check, _vt  # noqa: F401 - MAGIC, NULLPTR: for tests
from tests.fakes.fake_trt_build import build_api
from tests.fakes.fake_trt_runtime import runtime_api

FAKE_MODULES = ("tests.fakes.fake_tensorrt", "tests.fakes.fake_trt_build", "tests.fakes.fake_trt_runtime")


def make(version: str = "10.3.0", **faults: Any) -> types.ModuleType:
    """A fresh fake ``tensorrt`` of ``version`` ('10.3.0', '10.16.1', '11.4.0', ...) with the given faults."""
    v = _vt(version)
    fake = Faults(**faults)
    m = types.ModuleType("tensorrt")
    m.__version__, m._fake = version, fake

    flags = ["DEBUG", "REFIT", "TF32", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"]
    if v[0] < 11:  # TensorRT 11 removed the precision flags (strongly typed networks)
        flags += ["FP16", "INT8", "BF16"]
    BuilderFlag = enum.Enum("BuilderFlag", flags)
    MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE", "DLA_MANAGED_SRAM", "DLA_LOCAL_DRAM", "DLA_GLOBAL_DRAM",
                                                  "TACTIC_DRAM", "TACTIC_SHARED_MEMORY"])
    HardwareCompatibilityLevel = enum.Enum("HardwareCompatibilityLevel", ["NONE", "AMPERE_PLUS"]
                                           + (["SAME_COMPUTE_CAPABILITY"] if v >= (10, 9) else []))
    # an IntEnum, as pybind enums convert with int(); EXPLICIT_BATCH is gone in 11, STRONGLY_TYPED is in both
    NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                                 ([("EXPLICIT_BATCH", 0)] if v[0] < 11 else []) + [("STRONGLY_TYPED", 1)])
    TensorIOMode = enum.Enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    DataType = enum.Enum("DataType", ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8", "BF16", "INT64", "INT4"])
    _Severity = enum.Enum("Severity", ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"])

    def nptype(trt_type: Any) -> type:
        """Like the real one: numpy type of a DataType, TypeError for types numpy lacks (BF16, FP8, INT4)."""
        table = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
                 DataType.INT64: np.int64, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8}
        if trt_type in table:
            return table[trt_type]
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")

    class ILogger:
        __slots__ = ()
        Severity = _Severity

    class Logger(ILogger):
        __slots__ = ("min_severity",)
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = list(_Severity)

        def __init__(self, min_severity: Any = _Severity.WARNING) -> None:
            _check(min_severity, _Severity, "Logger.__init__")
            self.min_severity = min_severity

    def log(msg: str) -> None:
        fake.log.append(msg)

    class Dims:
        """Like trt.Dims: a sequence of ints (len, index; iteration through them), not a tuple."""

        __slots__ = ("_d",)

        def __init__(self, shape: Any = ()) -> None:
            self._d = tuple(int(d) for d in shape)

        def __len__(self) -> int:
            return len(self._d)

        def __getitem__(self, i: int) -> int:
            return self._d[i]

        def __eq__(self, other: object) -> bool:
            return tuple(self) == tuple(other) if isinstance(other, (Dims, tuple, list)) else NotImplemented

        def __repr__(self) -> str:
            return repr(self._d)

    class IHostMemory:
        """Base of the buffer objects ``host_memory`` returns (the buffer protocol via ctypes, no bytes methods)."""

        __slots__ = ()

    def host_memory(data: bytes) -> IHostMemory:
        cls = type("IHostMemory", (ctypes.c_ubyte * len(data), IHostMemory),
                   {"__slots__": (), "nbytes": property(lambda self: len(data)), "dtype": property(lambda self: DataType.UINT8)})
        return cls.from_buffer_copy(data)

    scope = dict(locals())
    api = {name: obj for name, obj in scope.items() if name[:1].isupper() or name == "nptype"}
    t = types.SimpleNamespace(v=v, version=version, log=log, host_memory=host_memory, **api)
    api.update(build_api(t, fake), **runtime_api(t, fake))
    for name, obj in api.items():
        setattr(m, name, obj)
    del m.IParserError  # real: returned by OnnxParser.get_error, not a module-level name
    return m


def install(monkeypatch, version: str = "10.3.0", **faults: Any) -> types.ModuleType:
    """``make(version, **faults)`` as ``sys.modules['tensorrt']`` for the test (monkeypatch undoes it)."""
    m = make(version, **faults)
    monkeypatch.setitem(sys.modules, "tensorrt", m)
    return m


def surface(m: types.ModuleType) -> dict:
    """The fake's public names: module-level, per class (methods/properties it defines) and enum members."""
    out: dict = {"module": sorted(n for n in vars(m) if not n.startswith("_")), "classes": {}, "enums": {}}
    for name in out["module"]:
        obj = getattr(m, name)
        if isinstance(obj, type) and issubclass(obj, enum.Enum):
            out["enums"][name] = sorted(obj.__members__)
        elif isinstance(obj, type):
            names = set()
            for klass in obj.__mro__:
                if klass.__module__ in FAKE_MODULES:
                    names |= {n for n in vars(klass) if not n.startswith("_") and n not in ("Severity",)}
            dunders = {n for n in ("__len__", "__getitem__", "__iter__", "__eq__") if n in vars(obj)}
            out["classes"][name] = sorted(names | dunders)
    return out
