"""TensorRT and CUDA, isolated: engine build, device buffers, a small runner.

Written against the API of TensorRT 10.3+ and 11.x (the rules and NVIDIA's references: docs/tensorrt.md):
no EXPLICIT_BATCH, no hard-coded enum integers, optional features looked up with ``getattr``. FP16 on
TensorRT 11 (strongly typed networks, no ``BuilderFlag.FP16``) goes through an FP16 copy of the ONNX
(``convert_onnx_to_fp16``). The pure rules (versions, platform, build settings, trtexec command, sidecars,
compatibility) live in ``stages.lib.trt_rules`` and are re-exported here. Every TensorRT call that can
fail by returning None or by raising TypeError (CUDA could not start) is checked. ``tensorrt``,
``pycuda`` and ``cuda-python`` are imported only inside the functions that need them; the tests drive
this module with a strict fake TensorRT (tests/fakes/fake_tensorrt.py).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from stages.lib.errors import PipelineError
from stages.lib.io import atomic_write_bytes, atomic_write_text, sha256_file

from stages.lib.trt_buffers import _CudaPythonBuffers, _import_cudart, _make_buffers, _PycudaBuffers  # noqa: F401
from stages.lib.trt_rules import (  # noqa: F401 - the pure rules, re-exported for callers of stages.lib.trt
    HW_LEVELS, INSTALL_HINT, SIDECAR_FORMAT, BuildSettings, build_settings, check_compatibility, check_profile,
    compatibility_notes, cuda_version_string, load_sidecar, make_sidecar, parse_cc, parse_version, platform_info,
    profile_shapes, rebuild_hint, same_tensorrt, sidecar_path_for, trtexec_command,
)


# ----------------------------------------------------------------------------- pure helpers
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


from stages.lib.onnx_fp16 import convert_onnx_to_fp16  # noqa: E402,F401 - used by build_engine, re-exported


# ----------------------------------------------------------------------------- environment
def tensorrt_version() -> Optional[str]:
    try:
        import tensorrt as trt
    except Exception:  # noqa: BLE001 - broken installs count as absent
        return None
    return str(trt.__version__)


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


def cuda_versions() -> dict:
    """{"cuda_driver": "12.4", "cuda_runtime": "12.6"} through cuda-python (None where unknown)."""
    out: dict = {"cuda_driver": None, "cuda_runtime": None}
    try:
        cudart = _import_cudart()
        for key, fn in (("cuda_driver", "cudaDriverGetVersion"), ("cuda_runtime", "cudaRuntimeGetVersion")):
            err, v = getattr(cudart, fn)()
            if err == cudart.cudaError_t.cudaSuccess:
                out[key] = cuda_version_string(v)
    except Exception:  # noqa: BLE001 - cuda-python absent or broken: versions stay unknown
        pass
    return out


def runtime_info() -> dict:
    """TensorRT version, GPU and platform of this machine, as ``check_compatibility`` compares them."""
    gpu = gpu_info() or {}
    return {"tensorrt_version": tensorrt_version(), "gpu_name": gpu.get("name"),
            "compute_capability": gpu.get("compute_capability"), "platform": platform_info(cuda_versions())}


def _cuda_init_failed(trt: Any, what: str, err: BaseException) -> PipelineError:
    return PipelineError(f"TensorRT {getattr(trt, '__version__', '?')} could not start CUDA ({what} failed: "
                         f"{type(err).__name__}: {str(err)[:160]}): usually an NVIDIA driver too old for this TensorRT's "
                         f"CUDA, a CUDA 12/13 package mix-up, or no usable GPU; {INSTALL_HINT}")


def _builder(trt: Any):
    """``trt.Builder`` with its constructor failure (pybind11 'factory function returned nullptr') explained."""
    try:
        builder = trt.Builder(_logger(trt))
    except TypeError as e:
        raise _cuda_init_failed(trt, "trt.Builder", e) from None
    return _need(builder, "trt.Builder")


def _need(obj: Any, what: str, hint: str = "see the TensorRT log above") -> Any:
    """TensorRT reports many failures by returning None: turn that into a PipelineError naming the call."""
    if obj is None:
        raise PipelineError(f"TensorRT returned nothing from {what} ({hint})")
    return obj


def trt_available() -> tuple[bool, str]:
    """(True, description) when engines can be built and run here, else (False, the reason).

    Importing tensorrt is not enough: it imports on machines where CUDA cannot start, so this creates a
    Builder and the device buffers, as a build and a run would.
    """
    try:
        import tensorrt as trt
    except Exception as e:  # noqa: BLE001
        return False, f"tensorrt is not importable ({type(e).__name__}: {str(e)[:120]}); {INSTALL_HINT}"
    gpu = gpu_info()
    if gpu is None:
        return False, f"no CUDA GPU visible (tensorrt {trt.__version__} is installed)"
    try:
        _builder(trt)  # created and dropped: the probe is whether CUDA starts
        bufs = _make_buffers()
    except PipelineError as e:
        return False, str(e)
    backend, note = bufs.name, getattr(bufs, "note", "")
    bufs.close()
    return True, (f"TensorRT {trt.__version__} on {gpu['name']} (compute capability {gpu['compute_capability']}, "
                  f"buffers via {backend}{'; ' + note if note else ''})")


# ----------------------------------------------------------------------------- build (GPU)
_LOGGER: list = []


def _logger(trt):
    """One logger per process: TensorRT warns when builders and runtimes get different ones."""
    if not _LOGGER or not isinstance(_LOGGER[0], trt.ILogger):
        _LOGGER[:] = [trt.Logger(trt.Logger.WARNING)]
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
        config.set_timing_cache(_need(config.create_timing_cache(b""), "create_timing_cache"), ignore_mismatch=False)


def fp16_mode_for(trt: Any) -> str:
    """'builder_flag' where ``BuilderFlag.FP16`` exists (10.x), else 'fp16_onnx' (11: strongly typed)."""
    return "builder_flag" if getattr(trt.BuilderFlag, "FP16", None) is not None else "fp16_onnx"


def network_flags(trt: Any) -> int:
    """Creation flags of a strongly typed network: the STRONGLY_TYPED bit where the enum has it (10.x, 11.x), else 0
    (a TensorRT whose networks are all strongly typed)."""
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def check_build_target(settings: BuildSettings, trt: Any, gpu: dict, plat: dict) -> None:
    """Refuse, before building, what TensorRT cannot build here (and would only report as a failed build)."""
    level = settings.hardware_compatibility
    if level == "none":
        return
    if plat.get("l4t"):
        raise PipelineError(f"engine.hardware_compatibility={level}: hardware compatibility is not supported on JetPack "
                            f"(L4T {plat['l4t']}); set engine.hardware_compatibility=none")
    if getattr(getattr(trt, "HardwareCompatibilityLevel", None), HW_LEVELS[level], None) is None:
        raise PipelineError(f"TensorRT {trt.__version__} has no hardware compatibility level {HW_LEVELS[level]} "
                            "(SAME_COMPUTE_CAPABILITY needs 10.9+); set engine.hardware_compatibility=none")
    need = {"ampere_plus": ((8, 0), "an Ampere or newer GPU (compute capability >= 8.0)"),
            "same_compute_capability": ((7, 5), "a Turing or newer GPU (compute capability >= 7.5)")}[level]
    if parse_cc(gpu["compute_capability"]) < need[0]:
        raise PipelineError(f"engine.hardware_compatibility={level} must be built on {need[1]}; {gpu['name']} is "
                            f"{gpu['compute_capability']}: set engine.hardware_compatibility=none")


def apply_settings(trt: Any, builder: Any, config: Any, settings: BuildSettings, fp16_mode: Optional[str]) -> None:
    """Put ``settings`` on a builder config: the same settings ``trtexec_command`` spells for trtexec."""
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_mb) << 20)
    config.builder_optimization_level = int(settings.optimization_level)
    if fp16_mode == "builder_flag":
        config.set_flag(trt.BuilderFlag.FP16)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None and not settings.tf32:
        config.clear_flag(tf32)
    if settings.hardware_compatibility != "none":
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, HW_LEVELS[settings.hardware_compatibility])
    profile = _need(builder.create_optimization_profile(), "create_optimization_profile")
    profile.set_shape(settings.input_name, settings.min_shape, settings.opt_shape, settings.max_shape)
    if config.add_optimization_profile(profile) < 0:
        raise PipelineError(f"TensorRT rejected the optimization profile {settings.shapes} for input {settings.input_name}")


def build_engine(onnx_path: Path | str, plan_path: Path | str, *, precision: str, min_batch: int, opt_batch: int,
                 max_batch: int, workspace_mb: int = 1024, optimization_level: int = 3, hardware_compatibility: str = "none",
                 timing_cache_path: Optional[Path | str] = None, sidecar_extra: Optional[dict] = None, log=print) -> dict:
    """Build ``plan_path`` (bytes exactly as TensorRT serialised them) and its sidecar JSON; returns the sidecar.

    ``precision`` int8 means explicit quantization: ``onnx_path`` is a Q/DQ ONNX and the network is strongly typed
    (``stages.lib.trt_int8``)."""
    import tensorrt as trt

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    inputs, outputs = onnx_io(onnx_path)
    if len(inputs) != 1:
        raise PipelineError(f"{onnx_path} has {len(inputs)} inputs; the engine stage expects exactly one image input")
    settings = build_settings(precision=precision, input_name=inputs[0]["name"], input_shape=inputs[0]["shape"],
                              min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, workspace_mb=workspace_mb,
                              optimization_level=optimization_level, hardware_compatibility=hardware_compatibility)
    gpu = gpu_info()
    if gpu is None:
        raise PipelineError("building a TensorRT engine needs a CUDA GPU, and none is visible")
    plat = platform_info(cuda_versions())
    check_build_target(settings, trt, gpu, plat)
    fp16_mode = fp16_mode_for(trt) if precision == "fp16" else None
    with tempfile.TemporaryDirectory(prefix="norm-trt-") as tmp:
        source = onnx_path
        if fp16_mode == "fp16_onnx":  # TensorRT 11: strongly typed, the ONNX carries the precision
            source = Path(tmp) / "model_fp16.onnx"
            convert_onnx_to_fp16(onnx_path, source)
        builder = _builder(trt)
        # explicit batch is the only mode since 10.0; int8 (Q/DQ) needs a strongly typed network
        network = _need(builder.create_network(network_flags(trt) if settings.strongly_typed else 0), "create_network")
        parser = _need(trt.OnnxParser(network, _logger(trt)), "OnnxParser")
        if not parser.parse_from_file(str(source)):
            errors = [_parser_error_text(parser.get_error(i)) for i in range(parser.num_errors)]
            raise PipelineError(format_parser_errors(onnx_path, errors))
        config = _need(builder.create_builder_config(), "create_builder_config")
        apply_settings(trt, builder, config, settings, fp16_mode)
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
    onnx_name = "model_fp16.onnx" if fp16_mode == "fp16_onnx" else onnx_path.name
    sidecar = make_sidecar(plan_path=plan_path, onnx_path=onnx_path, precision=precision, fp16_mode=fp16_mode,
                           tensorrt_version=str(trt.__version__), gpu=gpu, profile={"input": settings.input_name, **settings.shapes},
                           hardware_compatibility=hardware_compatibility, inputs=inputs, outputs=outputs, build_seconds=seconds,
                           optimization_level=optimization_level, workspace_mb=workspace_mb, platform=plat,
                           trtexec=trtexec_command(settings, onnx_name, f"device_{precision}.plan", fp16_mode=fp16_mode or "builder_flag"))
    sidecar.update(sidecar_extra or {})
    atomic_write_text(sidecar_path_for(plan_path), json.dumps(sidecar, indent=2))
    return sidecar


# ----------------------------------------------------------------------------- run (GPU)
def numpy_dtype(trt: Any, dtype: Any) -> np.dtype:
    """numpy dtype of a TensorRT DataType; one TensorRT cannot map (BF16, FP8, ...) is refused by name."""
    try:
        return np.dtype(trt.nptype(dtype))
    except (TypeError, KeyError, ValueError):
        raise PipelineError(f"engine tensor type {getattr(dtype, 'name', dtype)} has no numpy equivalent; "
                            "export the ONNX with float32 or float16 inputs and outputs") from None


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
        self.backend = self._bufs.name
        self.notes.append(f"device buffers via {self.backend}" + (f" ({self._bufs.note})" if self._bufs.note else ""))
        try:
            try:
                self._runtime = trt.Runtime(_logger(trt))
            except TypeError as e:
                raise _cuda_init_failed(trt, "trt.Runtime", e) from None
            self.engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
            if self.engine is None:
                raise PipelineError(f"TensorRT {trt.__version__} could not deserialize {self.plan_path} (see the log above); "
                                    f"{rebuild_hint(self.sidecar)}")
            self.context = _need(self.engine.create_execution_context(), "create_execution_context",
                                 "out of GPU memory?")
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            if len(ins) != 1:
                raise PipelineError(f"{self.plan_path} has {len(ins)} inputs; TrtRunner handles one")
            self.input_name, self.outputs = ins[0], [n for n in names if n not in ins]
            self.dtypes = {n: numpy_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
            pmin, _, pmax = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.min_shape, self.max_shape = tuple(pmin), tuple(pmax)
            self._set_shape(self.max_shape)
            for n in names:  # buffers sized for the largest batch, bound once
                shape = tuple(self.context.get_tensor_shape(n))
                if any(d < 0 for d in shape):
                    raise PipelineError(f"TensorRT left tensor {n} with unknown dimensions {shape} at the profile's "
                                        f"maximum input {self.max_shape}")
                nbytes = int(np.prod(shape)) * self.dtypes[n].itemsize
                self._ptrs[n] = self._bufs.alloc(max(nbytes, 1))
                if self.context.set_tensor_address(n, self._ptrs[n]) is False:
                    raise PipelineError(f"TensorRT rejected the device address of tensor {n}")
        except BaseException:
            self.close()
            raise

    @property
    def output_name(self) -> str:
        return "logits" if "logits" in self.outputs else self.outputs[0]

    def _set_shape(self, shape: tuple) -> None:
        if not self.context.set_input_shape(self.input_name, tuple(shape)):
            raise PipelineError(f"TensorRT rejected input shape {tuple(shape)} for {self.input_name} (the engine's profile "
                                f"is {self.min_shape} .. {self.max_shape})")

    def _load_input(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.dtypes[self.input_name])
        if x.ndim != len(self.max_shape) or any(not lo <= d <= hi for d, lo, hi in zip(x.shape, self.min_shape, self.max_shape)):
            raise PipelineError(f"input shape {tuple(x.shape)} is outside the engine's profile {self.min_shape} .. {self.max_shape}")
        self._set_shape(x.shape)
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
