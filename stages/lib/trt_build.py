"""Build TensorRT engines from ONNX: parse, apply ``BuildSettings``, serialise the plan and its sidecar JSON.

Written against the API of TensorRT 10.3+ and 11.x (the rules and NVIDIA's references: docs/tensorrt.md):
no EXPLICIT_BATCH, no hard-coded enum integers, optional features looked up with ``getattr``. FP16 on
TensorRT 11 (strongly typed networks, no ``BuilderFlag.FP16``) goes through an FP16 copy of the ONNX
(``convert_onnx_to_fp16``). The pure rules (build settings, trtexec command, sidecars) are in
``stages.lib.trt_rules``; the machine (GPU, versions, CUDA start) in ``stages.lib.trt_env``. Every TensorRT
call that can fail by returning None or by raising TypeError (CUDA could not start) is checked.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from stages.lib import trt_env, trt_rules
from stages.lib.errors import PipelineError
from stages.lib.io import atomic_write_bytes, atomic_write_text
from stages.lib.onnx_fp16 import convert_onnx_to_fp16
from stages.lib.trt_env import logger, need
from stages.lib.trt_rules import (
    HW_LEVELS,
    BuildSettings,
    build_settings,
    make_sidecar,
    parse_cc,
    sidecar_path_for,
    trtexec_command,
)


def format_parser_errors(onnx_path: Path | str, errors: list[str]) -> str:
    shown = "; ".join(errors[:5]) + (f"; ... ({len(errors) - 5} more)" if len(errors) > 5 else "")
    return (f"TensorRT could not parse {onnx_path}: {shown or 'no error details'}; check the export stage's opset "
            "(>= 18) and that every operator is supported by this TensorRT version")


def parser_error_text(err: Any) -> str:
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
        config.set_timing_cache(need(config.create_timing_cache(b""), "create_timing_cache"), ignore_mismatch=False)


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
    profile = need(builder.create_optimization_profile(), "create_optimization_profile")
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
    gpu = trt_env.gpu_info()
    if gpu is None:
        raise PipelineError("building a TensorRT engine needs a CUDA GPU, and none is visible")
    plat = trt_rules.platform_info(trt_env.cuda_versions())
    check_build_target(settings, trt, gpu, plat)
    fp16_mode = fp16_mode_for(trt) if precision == "fp16" else None
    with tempfile.TemporaryDirectory(prefix="norm-trt-") as tmp:
        source = onnx_path
        if fp16_mode == "fp16_onnx":  # TensorRT 11: strongly typed, the ONNX carries the precision
            source = Path(tmp) / "model_fp16.onnx"
            convert_onnx_to_fp16(onnx_path, source)
        builder = trt_env.make_builder(trt)
        # explicit batch is the only mode since 10.0; int8 (Q/DQ) needs a strongly typed network
        network = need(builder.create_network(network_flags(trt) if settings.strongly_typed else 0), "create_network")
        parser = need(trt.OnnxParser(network, logger(trt)), "OnnxParser")
        if not parser.parse_from_file(str(source)):
            errors = [parser_error_text(parser.get_error(i)) for i in range(parser.num_errors)]
            raise PipelineError(format_parser_errors(onnx_path, errors))
        config = need(builder.create_builder_config(), "create_builder_config")
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
