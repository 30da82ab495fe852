"""The fake TensorRT's builder side: Builder, network, ONNX parser, builder config, optimization profile,
timing cache. Defined per fake module by ``build_api`` (tests/fakes/fake_tensorrt.py ``make``), so each class
sees that fake's version, enums and faults."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from tests.fakes.fake_trt_base import MAGIC, NULLPTR, Faults, _check, _onnx_io, _shape_arg


def build_api(t: SimpleNamespace, fake: Faults) -> dict[str, type]:
    """The builder classes of the fake ``t`` (its version, enums and helpers), switched by ``fake``."""
    v, version = t.v, t.version
    BuilderFlag = t.BuilderFlag
    MemoryPoolType = t.MemoryPoolType
    HardwareCompatibilityLevel = t.HardwareCompatibilityLevel
    NetworkDefinitionCreationFlag = t.NetworkDefinitionCreationFlag
    Dims = t.Dims
    IHostMemory = t.IHostMemory
    ILogger = t.ILogger
    host_memory = t.host_memory
    log = t.log

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
            if not all(a <= b <= c for a, b, c in zip(lo, mid, hi, strict=False)) or not len(lo) == len(mid) == len(hi):
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

    return {"ITimingCache": ITimingCache, "IOptimizationProfile": IOptimizationProfile, "IBuilderConfig": IBuilderConfig,
            "INetworkDefinition": INetworkDefinition, "IParserError": IParserError, "OnnxParser": OnnxParser,
            "Builder": Builder}
