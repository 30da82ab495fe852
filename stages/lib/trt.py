"""TensorRT and CUDA, isolated: engine build, sidecar metadata, compatibility rules, a small runner.

Written against the documented API of TensorRT 10.3+ and 11.x (see shared/TENSORRT.md): no
EXPLICIT_BATCH, no hard-coded enum integers, optional features looked up with ``getattr``. FP16 on
TensorRT 11 (strongly typed networks, no ``BuilderFlag.FP16``) goes through an FP16 copy of the ONNX
(``convert_onnx_to_fp16``). Pure-Python parts (versions, compatibility, sidecars, profiles, the ONNX
conversion) are kept apart from GPU calls so they are tested on CPU machines; ``tensorrt``, ``pycuda``
and ``cuda-python`` are imported only inside the functions that need them.
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np

from stages.lib.errors import PipelineError
from stages.lib.io import atomic_write_bytes, atomic_write_text, sha256_file

SIDECAR_FORMAT = "norm-pipeline/trt-engine/1"
HW_LEVELS = {"none": "NONE", "ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}
INSTALL_HINT = "pip install 'norm-pipeline[tensorrt]' on a machine with an NVIDIA GPU"


# ----------------------------------------------------------------------------- pure helpers
def parse_version(v: str) -> tuple[int, ...]:
    """'10.3.0.26' -> (10, 3, 0, 26); trailing non-numeric parts ('11.4.1.post1') are ignored."""
    out = []
    for part in str(v).split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
    if not out:
        raise ValueError(f"not a version string: {v!r}")
    return tuple(out)


def parse_cc(cc: str | tuple | list) -> tuple[int, int]:
    """Compute capability '8.6' or (8, 6) -> (8, 6)."""
    parts = parse_version(cc) if isinstance(cc, str) else tuple(int(c) for c in cc)
    return (parts[0], parts[1] if len(parts) > 1 else 0)


def check_profile(min_batch: int, opt_batch: int, max_batch: int) -> None:
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise PipelineError(f"invalid TensorRT batch profile min={min_batch} opt={opt_batch} max={max_batch}: "
                            "need 1 <= engine.min_batch <= engine.opt_batch <= engine.max_batch")


def profile_shapes(input_shape: list, min_batch: int, opt_batch: int, max_batch: int) -> dict[str, list[int]]:
    """min/opt/max shapes for an NCHW input whose only dynamic axis is the batch (axis 0)."""
    check_profile(min_batch, opt_batch, max_batch)
    rest = list(input_shape[1:])
    if any(not isinstance(d, int) or d <= 0 for d in rest):
        raise PipelineError(f"the ONNX input shape {input_shape} has dynamic axes besides the batch; "
                            "re-export with a fixed input size")
    return {"min": [min_batch, *rest], "opt": [opt_batch, *rest], "max": [max_batch, *rest]}


def format_parser_errors(onnx_path: Path | str, errors: list[str]) -> str:
    shown = "; ".join(errors[:5]) + (f"; ... ({len(errors) - 5} more)" if len(errors) > 5 else "")
    return (f"TensorRT could not parse {onnx_path}: {shown or 'no error details'}; check the export stage's opset "
            "(>= 18) and that every operator is supported by this TensorRT version")


def _parser_error_text(err: Any) -> str:
    """One line from an ``IParserError`` (desc, node name and operator when available)."""
    desc = err.desc() if callable(getattr(err, "desc", None)) else str(err)
    where = []
    for attr in ("node_name", "node_operator"):
        fn = getattr(err, attr, None)
        try:
            val = fn() if callable(fn) else None
        except Exception:  # noqa: BLE001 - optional detail only
            val = None
        if val:
            where.append(str(val))
    return f"{desc} [{' / '.join(where)}]" if where else str(desc)


_ONNX_DTYPES = {1: "float32", 10: "float16", 11: "float64", 6: "int32", 7: "int64", 9: "bool", 2: "uint8", 3: "int8", 16: "bfloat16"}


def onnx_io(onnx_path: Path | str) -> tuple[list[dict], list[dict]]:
    """Graph inputs and outputs as [{"name", "shape" (-1 for dynamic), "dtype"}], initializers excluded."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}

    def describe(vi) -> dict:
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        return {"name": vi.name, "shape": shape, "dtype": _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type))}

    return ([describe(v) for v in model.graph.input if v.name not in inits], [describe(v) for v in model.graph.output])


def make_sidecar(*, plan_path: Path, onnx_path: Path, precision: str, fp16_mode: Optional[str], tensorrt_version: str,
                 gpu: dict, profile: dict, hardware_compatibility: str, inputs: list[dict], outputs: list[dict],
                 build_seconds: float, optimization_level: int, workspace_mb: int, version_compatible: bool = False) -> dict:
    """What the engine needs next to it: the plan itself stays byte-for-byte TensorRT's (trtexec loads it)."""
    return {
        "format": SIDECAR_FORMAT, "plan": Path(plan_path).name, "plan_sha256": sha256_file(plan_path),
        "plan_bytes": Path(plan_path).stat().st_size, "onnx": Path(onnx_path).name, "onnx_sha256": sha256_file(onnx_path),
        "precision": precision, "fp16_mode": fp16_mode, "tensorrt_version": tensorrt_version,
        "gpu_name": gpu.get("name"), "compute_capability": gpu.get("compute_capability"),
        "hardware_compatibility": hardware_compatibility, "version_compatible": version_compatible,
        "profile": profile, "inputs": inputs, "outputs": outputs, "build_seconds": round(build_seconds, 3),
        "builder_optimization_level": optimization_level, "workspace_mb": workspace_mb,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def sidecar_path_for(plan_path: Path | str) -> Path:
    return Path(plan_path).with_suffix(".json")


def load_sidecar(path: Path | str) -> dict:
    path = Path(path)
    try:
        side = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"engine sidecar {path} not found: it records the TensorRT version and GPU the engine was built for; "
                            "rebuild the engine with `norm-pipeline stage engine`") from None
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(f"engine sidecar {path} is not readable JSON ({e})") from None
    if not isinstance(side, dict) or side.get("format") != SIDECAR_FORMAT:
        raise PipelineError(f"{path} is not a norm-pipeline engine sidecar (no {SIDECAR_FORMAT!r} format tag)")
    return side


def _rebuild_hint(side: dict) -> str:
    return f"rebuild the engine on this machine from {side.get('onnx', 'model.onnx')} (see the bundle README's trtexec command)"


def check_compatibility(sidecar: dict, runtime_info: dict) -> None:
    """Refuse to load an engine on a TensorRT version or GPU it was not built for, with the reason.

    Rules: TensorRT major.minor must match (a version-compatible build accepts any newer runtime);
    compute capability must match, except ``ampere_plus`` builds (any GPU with cc >= 8.0).
    """
    plan = sidecar.get("plan", "engine")
    built, here = sidecar.get("tensorrt_version"), runtime_info.get("tensorrt_version")
    if not here:
        raise PipelineError(f"{plan} needs TensorRT {built}, which is not installed here; {INSTALL_HINT}")
    bv, hv = parse_version(built), parse_version(here)
    if sidecar.get("version_compatible"):
        if hv < bv:
            raise PipelineError(f"{plan} was built with TensorRT {built} (version-compatible), which needs a runtime >= {built}; "
                                f"this machine has TensorRT {here}: upgrade TensorRT or {_rebuild_hint(sidecar)}")
    elif bv[:2] != hv[:2]:
        want = ".".join(map(str, bv[:2]))
        raise PipelineError(f"{plan} was built with TensorRT {built} but this machine has TensorRT {here}: engines only load "
                            f"on the TensorRT version that built them; install TensorRT {want} or {_rebuild_hint(sidecar)}")
    built_cc, here_cc = sidecar.get("compute_capability"), runtime_info.get("compute_capability")
    if not here_cc:
        raise PipelineError(f"{plan} needs an NVIDIA GPU but no CUDA device is visible here")
    level = sidecar.get("hardware_compatibility", "none")
    if level == "ampere_plus":
        if parse_cc(here_cc) < (8, 0):
            raise PipelineError(f"{plan} was built hardware-compatible for Ampere and newer (compute capability >= 8.0); "
                                f"this GPU ({runtime_info.get('gpu_name')}) has {here_cc}: {_rebuild_hint(sidecar)}")
    elif parse_cc(built_cc) != parse_cc(here_cc):
        raise PipelineError(f"{plan} was built for compute capability {built_cc} ({sidecar.get('gpu_name')}) but this GPU "
                            f"({runtime_info.get('gpu_name')}) has {here_cc}: {_rebuild_hint(sidecar)}, or build with "
                            "engine.hardware_compatibility=ampere_plus for a portable engine")


def compatibility_notes(sidecar: dict, runtime_info: dict) -> list[str]:
    """Differences that do not stop loading but are worth a line in the log (patch version, GPU model)."""
    notes = []
    built, here = sidecar.get("tensorrt_version"), runtime_info.get("tensorrt_version")
    if built and here and parse_version(built) != parse_version(here):
        notes.append(f"engine built with TensorRT {built}, running on {here}")
    if sidecar.get("hardware_compatibility", "none") == "none" and sidecar.get("gpu_name") != runtime_info.get("gpu_name"):
        notes.append(f"engine built on {sidecar.get('gpu_name')}, running on {runtime_info.get('gpu_name')} "
                     "(same compute capability; TensorRT advises rebuilding per GPU model)")
    return notes


from stages.lib.onnx_fp16 import convert_onnx_to_fp16  # noqa: E402,F401 - used by build_engine, re-exported


# ----------------------------------------------------------------------------- environment
def tensorrt_version() -> Optional[str]:
    try:
        import tensorrt as trt
    except Exception:  # noqa: BLE001 - broken installs count as absent
        return None
    return str(trt.__version__)


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python layout
    return cudart


def gpu_info(device: int = 0) -> Optional[dict]:
    """{"name", "compute_capability": "8.6", "source"} of a CUDA device, or None; no torch import needed."""
    try:
        cudart = _import_cudart()
        err, count = cudart.cudaGetDeviceCount()
        if err == cudart.cudaError_t.cudaSuccess and count > device:
            err, p = cudart.cudaGetDeviceProperties(device)
            if err == cudart.cudaError_t.cudaSuccess:
                name = p.name.decode(errors="replace") if isinstance(p.name, bytes) else str(p.name)
                return {"name": name.split("\x00")[0].strip(), "compute_capability": f"{p.major}.{p.minor}", "source": "cuda-python"}
    except Exception:  # noqa: BLE001 - missing package or driver: try the next source
        pass
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() > device:
            dev = cuda.Device(device)
            major, minor = dev.compute_capability()
            return {"name": dev.name(), "compute_capability": f"{major}.{minor}", "source": "pycuda"}
    except Exception:  # noqa: BLE001
        pass
    torch = sys.modules.get("torch")  # only when already imported: importing torch is not cheap
    if torch is not None and torch.cuda.is_available() and torch.cuda.device_count() > device:
        major, minor = torch.cuda.get_device_capability(device)
        return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}", "source": "torch"}
    return None


def runtime_info() -> dict:
    gpu = gpu_info() or {}
    return {"tensorrt_version": tensorrt_version(), "gpu_name": gpu.get("name"), "compute_capability": gpu.get("compute_capability")}


def _buffer_backend_name() -> Optional[str]:
    if importlib.util.find_spec("pycuda") is not None:
        return "pycuda"
    try:
        _import_cudart()
        return "cuda-python"
    except ImportError:
        return None


def trt_available() -> tuple[bool, str]:
    """(True, description) when engines can be built and run here, else (False, the reason)."""
    try:
        import tensorrt as trt
    except Exception as e:  # noqa: BLE001
        return False, f"tensorrt is not importable ({type(e).__name__}: {str(e)[:120]}); {INSTALL_HINT}"
    gpu = gpu_info()
    if gpu is None:
        return False, f"no CUDA GPU visible (tensorrt {trt.__version__} is installed)"
    backend = _buffer_backend_name()
    if backend is None:
        return False, "neither pycuda nor cuda-python is installed for device buffers: pip install cuda-python"
    return True, (f"TensorRT {trt.__version__} on {gpu['name']} (compute capability {gpu['compute_capability']}, "
                  f"buffers via {backend})")



# ----------------------------------------------------------------------------- device buffers (GPU)
class _CudaPythonBuffers:
    """Device memory, one stream and events through cuda-python (calls return ``(err, value)``)."""

    name = "cuda-python"

    def __init__(self) -> None:
        self.rt = _import_cudart()
        self.stream = self._call(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def _call(self, result, what: str):
        err, rest = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            raise PipelineError(f"CUDA call {what} failed: {err}")
        return rest[0] if len(rest) == 1 else None

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def alloc(self, nbytes: int) -> int:
        return int(self._call(self.rt.cudaMalloc(nbytes), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self._call(self.rt.cudaFree(ptr), "cudaFree")

    def htod(self, ptr: int, host: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, self.stream), "cudaMemcpyAsync")

    def dtoh(self, host: np.ndarray, ptr: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, self.stream), "cudaMemcpyAsync")

    def sync(self) -> None:
        self._call(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def event(self):
        return self._call(self.rt.cudaEventCreate(), "cudaEventCreate")

    def record(self, ev) -> None:
        self._call(self.rt.cudaEventRecord(ev, self.stream), "cudaEventRecord")

    def elapsed_ms(self, start, end) -> float:
        self._call(self.rt.cudaEventSynchronize(end), "cudaEventSynchronize")
        return float(self._call(self.rt.cudaEventElapsedTime(start, end), "cudaEventElapsedTime"))

    def drop_event(self, ev) -> None:
        self.rt.cudaEventDestroy(ev)

    def close(self) -> None:
        self.rt.cudaStreamDestroy(self.stream)


class _PycudaBuffers:
    """The same interface through pycuda (the primary context, so TensorRT and torch share it)."""

    name = "pycuda"

    def __init__(self) -> None:
        import pycuda.driver as cuda

        try:
            import pycuda.autoprimaryctx  # noqa: F401
        except ImportError:
            import pycuda.autoinit  # noqa: F401
        self.cuda, self.stream, self._mem = cuda, cuda.Stream(), {}

    @property
    def stream_handle(self) -> int:
        return int(self.stream.handle)

    def alloc(self, nbytes: int) -> int:
        mem = self.cuda.mem_alloc(nbytes)
        self._mem[int(mem)] = mem
        return int(mem)

    def free(self, ptr: int) -> None:
        self._mem.pop(ptr).free()

    def htod(self, ptr: int, host: np.ndarray) -> None:
        self.cuda.memcpy_htod_async(ptr, host, self.stream)

    def dtoh(self, host: np.ndarray, ptr: int) -> None:
        self.cuda.memcpy_dtoh_async(host, ptr, self.stream)

    def sync(self) -> None:
        self.stream.synchronize()

    def event(self):
        return self.cuda.Event()

    def record(self, ev) -> None:
        ev.record(self.stream)

    def elapsed_ms(self, start, end) -> float:
        end.synchronize()
        return float(end.time_since(start))

    def drop_event(self, ev) -> None:
        pass  # pycuda frees events when they are garbage-collected

    def close(self) -> None:
        pass


def _make_buffers():
    name = _buffer_backend_name()
    if name is None:
        raise PipelineError("running TensorRT engines needs pycuda or cuda-python for device buffers: pip install cuda-python")
    return _PycudaBuffers() if name == "pycuda" else _CudaPythonBuffers()


# ----------------------------------------------------------------------------- build (GPU)
_LOGGER: list = []


def _logger(trt):
    """One logger per process: TensorRT warns when builders and runtimes get different ones."""
    if not _LOGGER:
        _LOGGER.append(trt.Logger(trt.Logger.WARNING))
    return _LOGGER[0]


def _set_timing_cache(config, path: Optional[Path], log) -> None:
    data = Path(path).read_bytes() if path and Path(path).is_file() else b""
    try:
        cache = config.create_timing_cache(data)
        ok = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
    except Exception:  # noqa: BLE001 - a corrupt cache file must not stop the build
        ok = False
    if not ok:
        if data:
            log(f"timing cache {path} does not fit this TensorRT/GPU; starting a fresh one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def build_engine(onnx_path: Path | str, plan_path: Path | str, *, precision: str, min_batch: int, opt_batch: int,
                 max_batch: int, workspace_mb: int = 1024, optimization_level: int = 3, hardware_compatibility: str = "none",
                 timing_cache_path: Optional[Path | str] = None, log=print) -> dict:
    """Build ``plan_path`` (bytes exactly as TensorRT serialised them) and its sidecar JSON; returns the sidecar."""
    import tensorrt as trt

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if precision not in ("fp32", "fp16"):
        raise PipelineError(f"unsupported engine precision {precision!r}; use fp32 or fp16 (INT8 needs Q/DQ nodes, later work)")
    if hardware_compatibility not in HW_LEVELS:
        raise PipelineError(f"engine.hardware_compatibility={hardware_compatibility!r}; use one of {', '.join(HW_LEVELS)}")
    inputs, outputs = onnx_io(onnx_path)
    if len(inputs) != 1:
        raise PipelineError(f"{onnx_path} has {len(inputs)} inputs; the engine stage expects exactly one image input")
    shapes = profile_shapes(inputs[0]["shape"], min_batch, opt_batch, max_batch)
    gpu = gpu_info()
    if gpu is None:
        raise PipelineError("building a TensorRT engine needs a CUDA GPU, and none is visible")
    if hardware_compatibility == "ampere_plus" and parse_cc(gpu["compute_capability"]) < (8, 0):
        raise PipelineError("engine.hardware_compatibility=ampere_plus must be built on an Ampere or newer GPU; "
                            f"{gpu['name']} is {gpu['compute_capability']}")
    with tempfile.TemporaryDirectory(prefix="norm-trt-") as tmp:
        source, fp16_mode = onnx_path, None
        if precision == "fp16":
            if getattr(trt.BuilderFlag, "FP16", None) is not None:  # TensorRT 10.x
                fp16_mode = "builder_flag"
            else:  # TensorRT 11: strongly typed, the ONNX carries the precision
                source, fp16_mode = Path(tmp) / "model_fp16.onnx", "fp16_onnx"
                convert_onnx_to_fp16(onnx_path, source)
        logger = _logger(trt)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode since 10.0
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(source)):
            errors = [_parser_error_text(parser.get_error(i)) for i in range(parser.num_errors)]
            raise PipelineError(format_parser_errors(onnx_path, errors))
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
        config.builder_optimization_level = int(optimization_level)
        if fp16_mode == "builder_flag":
            config.set_flag(trt.BuilderFlag.FP16)
        tf32 = getattr(trt.BuilderFlag, "TF32", None)
        if precision == "fp32" and tf32 is not None:
            config.clear_flag(tf32)  # "fp32" means fp32: TF32 convolutions would loosen parity
        if hardware_compatibility != "none":
            level = getattr(getattr(trt, "HardwareCompatibilityLevel", None), HW_LEVELS[hardware_compatibility], None)
            if level is None:
                raise PipelineError(f"TensorRT {trt.__version__} has no hardware compatibility level "
                                    f"{HW_LEVELS[hardware_compatibility]} "
                                    "(SAME_COMPUTE_CAPABILITY needs 10.9+); set engine.hardware_compatibility=none")
            config.hardware_compatibility_level = level
        profile = builder.create_optimization_profile()
        profile.set_shape(inputs[0]["name"], shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
        _set_timing_cache(config, Path(timing_cache_path) if timing_cache_path else None, log)
        t0 = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        seconds = time.perf_counter() - t0
    if plan is None:
        raise PipelineError(f"TensorRT could not build the {precision} engine from {onnx_path} (see the TensorRT log above); "
                            "a larger engine.workspace_mb or a smaller engine.max_batch may help")
    atomic_write_bytes(plan_path, memoryview(plan).tobytes())
    if timing_cache_path:
        atomic_write_bytes(timing_cache_path, memoryview(config.get_timing_cache().serialize()).tobytes())
    sidecar = make_sidecar(plan_path=plan_path, onnx_path=onnx_path, precision=precision, fp16_mode=fp16_mode,
                           tensorrt_version=str(trt.__version__), gpu=gpu, profile={"input": inputs[0]["name"], **shapes},
                           hardware_compatibility=hardware_compatibility, inputs=inputs, outputs=outputs, build_seconds=seconds,
                           optimization_level=optimization_level, workspace_mb=workspace_mb)
    atomic_write_text(sidecar_path_for(plan_path), json.dumps(sidecar, indent=2))
    return sidecar


# ----------------------------------------------------------------------------- run (GPU)
class TrtRunner:
    """Run a serialized engine on numpy batches; refuses engines built for another TensorRT or GPU."""

    def __init__(self, plan_path: Path | str, sidecar_path: Path | str | None = None) -> None:
        import tensorrt as trt

        self.plan_path = Path(plan_path)
        self.sidecar = load_sidecar(sidecar_path or sidecar_path_for(self.plan_path))
        if self.sidecar.get("plan_sha256") != sha256_file(self.plan_path):
            raise PipelineError(f"{self.plan_path} does not match its sidecar's sha256 (rebuilt or corrupt?); "
                                "re-run `norm-pipeline stage engine`")
        info = runtime_info()
        check_compatibility(self.sidecar, info)
        self.notes = compatibility_notes(self.sidecar, info)
        self._ptrs: dict[str, int] = {}
        self._bufs = _make_buffers()
        try:
            self._runtime = trt.Runtime(_logger(trt))
            self.engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
            if self.engine is None:
                raise PipelineError(f"TensorRT could not deserialize {self.plan_path} (see the log above); "
                                    f"{_rebuild_hint(self.sidecar)}")
            self.context = self.engine.create_execution_context()
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            if len(ins) != 1:
                raise PipelineError(f"{self.plan_path} has {len(ins)} inputs; TrtRunner handles one")
            self.input_name, self.outputs = ins[0], [n for n in names if n not in ins]
            self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
            pmin, _, pmax = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.min_shape, self.max_shape = tuple(pmin), tuple(pmax)
            self.context.set_input_shape(self.input_name, self.max_shape)
            for n in names:  # buffers sized for the largest batch, bound once
                nbytes = int(np.prod(tuple(self.context.get_tensor_shape(n)))) * self.dtypes[n].itemsize
                self._ptrs[n] = self._bufs.alloc(max(nbytes, 1))
                self.context.set_tensor_address(n, self._ptrs[n])
        except BaseException:
            self.close()
            raise

    @property
    def output_name(self) -> str:
        return "logits" if "logits" in self.outputs else self.outputs[0]

    def _load_input(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.dtypes[self.input_name])
        if x.ndim != len(self.max_shape) or any(not lo <= d <= hi for d, lo, hi in zip(x.shape, self.min_shape, self.max_shape)):
            raise PipelineError(f"input shape {tuple(x.shape)} is outside the engine's profile {self.min_shape} .. {self.max_shape}")
        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            raise PipelineError(f"TensorRT rejected input shape {tuple(x.shape)}")
        self._bufs.htod(self._ptrs[self.input_name], x)
        return x  # the caller keeps it alive until the stream is synchronised

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self._bufs.stream_handle):
            raise PipelineError(f"TensorRT execution of {self.plan_path.name} failed (see the TensorRT log)")

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Host batch in, host output ``logits`` (or the first output) out."""
        keep = self._load_input(x)
        self._execute()
        out = np.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.dtypes[self.output_name])
        self._bufs.dtoh(out, self._ptrs[self.output_name])
        self._bufs.sync()
        del keep
        return out

    def time(self, x: np.ndarray, iters: int = 100, warmup: int = 10) -> list[float]:
        """Per-inference GPU milliseconds (CUDA events around execute_async_v3; no host/device copies)."""
        keep = self._load_input(x)
        self._bufs.sync()
        for _ in range(warmup):
            self._execute()
        start, end = self._bufs.event(), self._bufs.event()
        times = []
        for _ in range(iters):
            self._bufs.record(start)
            self._execute()
            self._bufs.record(end)
            times.append(self._bufs.elapsed_ms(start, end))
        self._bufs.drop_event(start)
        self._bufs.drop_event(end)
        del keep
        return times

    def close(self) -> None:
        bufs = getattr(self, "_bufs", None)
        if bufs is not None:
            for ptr in self._ptrs.values():
                bufs.free(ptr)
            self._ptrs.clear()
            bufs.close()
            self._bufs = None
        self.context = self.engine = None

    def __enter__(self) -> "TrtRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
