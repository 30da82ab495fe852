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
import json
import sys
import types
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tests.fakes import fake_cuda

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

    def _shape_arg(shape: Any, what: str, kinds: tuple = (tuple, list)) -> tuple:
        if not isinstance(shape, kinds) or not all(isinstance(d, (int, np.integer)) for d in shape):
            raise TypeError(f"{what}(): incompatible function arguments: shape must be Dims or a sequence of ints")
        return tuple(int(d) for d in shape)

    class ITimingCache:
        __slots__ = ("_builds",)

        def __init__(self, builds: int) -> None:
            self._builds = builds

        def serialize(self) -> IHostMemory:
            return host_memory(b"FAKECACHE" + str(self._builds).encode())

    class IOptimizationProfile:
        __slots__ = ("_shapes",)

        def __init__(self) -> None:
            self._shapes: dict = {}

        def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - the real names
            _check(input, str, "set_shape")
            lo, mid, hi = (_shape_arg(s, "set_shape", (Dims, tuple, list)) for s in (min, opt, max))
            if not all(a <= b <= c for a, b, c in zip(lo, mid, hi)) or not len(lo) == len(mid) == len(hi):
                raise ValueError("set_shape: need min <= opt <= max")  # real: logs an error and the build fails
            self._shapes[input] = (lo, mid, hi)

    class IBuilderConfig:
        __slots__ = ("_flags", "_pools", "_level", "_hw", "_profiles", "_cache")

        def __init__(self) -> None:
            self._flags = {BuilderFlag.TF32}  # the real default: TF32 on
            self._pools, self._level, self._hw, self._profiles, self._cache = {}, 3, HardwareCompatibilityLevel.NONE, [], None

        @property
        def builder_optimization_level(self) -> int:
            return self._level

        @builder_optimization_level.setter
        def builder_optimization_level(self, value: int) -> None:
            _check(value, int, "builder_optimization_level")
            self._level = value

        @property
        def hardware_compatibility_level(self) -> Any:
            return self._hw

        @hardware_compatibility_level.setter
        def hardware_compatibility_level(self, value: Any) -> None:
            _check(value, HardwareCompatibilityLevel, "hardware_compatibility_level")
            self._hw = value

        def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
            _check(pool, MemoryPoolType, "set_memory_pool_limit")
            _check(pool_size, int, "set_memory_pool_limit")
            self._pools[pool] = pool_size

        def get_memory_pool_limit(self, pool: Any) -> int:
            return self._pools.get(pool, 0)

        def set_flag(self, flag: Any) -> None:
            _check(flag, BuilderFlag, "set_flag")
            self._flags.add(flag)

        def clear_flag(self, flag: Any) -> None:
            _check(flag, BuilderFlag, "clear_flag")
            self._flags.discard(flag)

        def get_flag(self, flag: Any) -> bool:
            _check(flag, BuilderFlag, "get_flag")
            return flag in self._flags

        def add_optimization_profile(self, profile: Any) -> int:
            _check(profile, IOptimizationProfile, "add_optimization_profile")
            self._profiles.append(profile)
            return len(self._profiles) - 1

        def create_timing_cache(self, serialized_timing_cache: Any) -> Optional[ITimingCache]:
            data = memoryview(serialized_timing_cache).tobytes()
            if data and not data.startswith(b"FAKECACHE"):
                log("timing cache: invalid blob")
                return None
            return ITimingCache(int(data[9:] or b"0"))

        def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
            _check(cache, ITimingCache, "set_timing_cache")
            self._cache = cache
            return True

        def get_timing_cache(self) -> Optional[ITimingCache]:
            return self._cache

    class INetworkDefinition:
        __slots__ = ("_onnx", "_flags")

        def __init__(self, flags: int = 0) -> None:
            self._onnx: Optional[bytes] = None
            self._flags = flags

        def get_flag(self, flag: Any) -> bool:
            _check(flag, NetworkDefinitionCreationFlag, "get_flag")
            return bool(self._flags & (1 << int(flag)))

        @property
        def _strongly_typed(self) -> bool:
            return v[0] >= 11 or self.get_flag(NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # 11: always

        @property
        def num_inputs(self) -> int:
            return len(_onnx_io(self._onnx)[0]) if self._onnx else 0

    class IParserError:
        __slots__ = ("_desc",)

        def __init__(self, desc: str) -> None:
            self._desc = desc

        def desc(self) -> str:
            return self._desc

        def node_name(self) -> str:
            return "node_0"

        def node_operator(self) -> str:
            return "Foo"

    class OnnxParser:
        __slots__ = ("_network", "_errors")

        def __init__(self, network: Any, logger: Any) -> None:
            _check(network, INetworkDefinition, "OnnxParser.__init__")
            _check(logger, ILogger, "OnnxParser.__init__")
            self._network, self._errors = network, []

        def parse_from_file(self, model: str) -> bool:
            _check(model, str, "parse_from_file")
            if fake.parse_errors:
                self._errors = [IParserError(e) for e in fake.parse_errors]
                return False
            self._network._onnx = Path(model).read_bytes()
            return True

        @property
        def num_errors(self) -> int:
            return len(self._errors)

        def get_error(self, index: int) -> IParserError:
            return self._errors[index]

    class Builder:
        __slots__ = ("_logger",)

        def __init__(self, logger: Any) -> None:
            _check(logger, ILogger, "Builder.__init__")
            if fake.cuda_fails:
                raise TypeError(NULLPTR)
            self._logger = logger

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            _check(flags, int, "create_network")
            fake.calls.append(("create_network", flags))
            return INetworkDefinition(flags)

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: Any, config: Any) -> Optional[IHostMemory]:
            _check(network, INetworkDefinition, "build_serialized_network")
            _check(config, IBuilderConfig, "build_serialized_network")
            ins = _onnx_io(network._onnx)[0] if network._onnx else []
            shapes = {n: s for p in config._profiles for n, s in p._shapes.items()}
            fake.calls.append(("build", {"flags": sorted(f.name for f in config._flags), "level": config._level,
                                         "hw": config._hw.name, "pools": {p.name: n for p, n in config._pools.items()},
                                         "profile": {n: [list(x) for x in s] for n, s in shapes.items()},
                                         "strongly_typed": network._strongly_typed}))
            if fake.build_fails or network._onnx is None:
                log("Error: engine build failed")
                return None
            precision_flags = sorted(f.name for f in config._flags if f.name in ("FP16", "INT8", "BF16"))
            if network._strongly_typed and precision_flags:  # real: an API usage error, no engine
                log(f"Error: precision flags {precision_flags} are not allowed with a strongly typed network")
                return None
            if any(-1 in i["shape"] and i["name"] not in shapes for i in ins):
                log("Error: network has dynamic inputs but no optimization profile")
                return None
            if config._cache is not None:
                config._cache._builds += 1
            header = {"version": version, "profile": {n: [list(x) for x in s] for n, s in shapes.items()}}
            return host_memory(MAGIC + json.dumps(header).encode() + b"\n" + network._onnx)

    class IExecutionContext:
        __slots__ = ("_engine", "_shapes", "_addr")

        def __init__(self, engine: Any) -> None:
            self._engine, self._shapes, self._addr = engine, {}, {}

        def set_input_shape(self, name: str, shape: Any) -> bool:
            _check(name, str, "set_input_shape")
            shape = _shape_arg(shape, "set_input_shape")
            lo, _, hi = self._engine._profile.get(name, (None, None, None))
            if fake.reject_shapes or lo is None or len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
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
            for n, out in zip(eng._outputs, outs):
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

    for name, obj in list(locals().items()):
        if name[:1].isupper() or name == "nptype":
            setattr(m, name, obj)
    del m.IParserError  # real: returned by OnnxParser.get_error, not a module-level name
    return m


def _onnx_io(onnx_bytes: bytes) -> tuple[list[dict], list[dict]]:
    import onnx

    g = onnx.load_from_string(onnx_bytes).graph
    inits = {i.name for i in g.initializer}

    def describe(vi) -> dict:
        tt = vi.type.tensor_type
        return {"name": vi.name, "elem": tt.elem_type, "shape": [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]}

    return [describe(i) for i in g.input if i.name not in inits], [describe(o) for o in g.output]


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
                if klass.__module__ == __name__:
                    names |= {n for n in vars(klass) if not n.startswith("_") and n not in ("Severity",)}
            dunders = {n for n in ("__len__", "__getitem__", "__iter__", "__eq__") if n in vars(obj)}
            out["classes"][name] = sorted(names | dunders)
    return out
