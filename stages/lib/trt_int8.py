"""INT8 TensorRT engines from a Q/DQ ONNX (explicit quantization), on TensorRT 10.x and 11.x.

TensorRT's documentation: "Use explicit quantization with Strong Typing. Precision-control build flags are
not required and should not be specified." So the network is created strongly typed (the
``STRONGLY_TYPED`` creation flag on 10.x; on 11.x every network is) and the Q/DQ nodes decide where int8
runs; no calibrator (removed in 11) and no ``BuilderFlag.INT8`` (removed in 11). Kept apart from
``stages.lib.trt.build_engine`` so the fp32/fp16 path is untouched; it reuses that module's helpers.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from stages.lib import trt as T
from stages.lib.errors import PipelineError
from stages.lib.io import atomic_write_bytes, atomic_write_text


def network_flags(trt) -> int:
    """Creation flags for a strongly typed network: the STRONGLY_TYPED bit on 10.x, 0 on 11.x (always typed)."""
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_int8_engine(qdq_onnx: Path | str, plan_path: Path | str, *, min_batch: int, opt_batch: int, max_batch: int,
                      workspace_mb: int = 1024, optimization_level: int = 3, hardware_compatibility: str = "none",
                      timing_cache_path: Optional[Path | str] = None, log=print) -> dict:
    """Build ``plan_path`` from the Q/DQ ONNX and write its sidecar (precision ``int8``); returns the sidecar."""
    import tensorrt as trt

    qdq_onnx, plan_path = Path(qdq_onnx), Path(plan_path)
    inputs, outputs = T.onnx_io(qdq_onnx)
    if len(inputs) != 1:
        raise PipelineError(f"{qdq_onnx} has {len(inputs)} inputs; the engine stage expects exactly one image input")
    shapes = T.profile_shapes(inputs[0]["shape"], min_batch, opt_batch, max_batch)
    gpu = T.gpu_info()
    if gpu is None:
        raise PipelineError("building a TensorRT engine needs a CUDA GPU, and none is visible")
    logger = T._logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(qdq_onnx)):
        errors = [T._parser_error_text(parser.get_error(i)) for i in range(parser.num_errors)]
        raise PipelineError(T.format_parser_errors(qdq_onnx, errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    config.builder_optimization_level = int(optimization_level)
    if hardware_compatibility != "none":
        level = getattr(getattr(trt, "HardwareCompatibilityLevel", None), T.HW_LEVELS[hardware_compatibility], None)
        if level is None:
            raise PipelineError(f"TensorRT {trt.__version__} has no hardware compatibility level "
                                f"{T.HW_LEVELS[hardware_compatibility]}; set engine.hardware_compatibility=none")
        config.hardware_compatibility_level = level
    profile = builder.create_optimization_profile()
    profile.set_shape(inputs[0]["name"], shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    T._set_timing_cache(config, Path(timing_cache_path) if timing_cache_path else None, log)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        raise PipelineError(f"TensorRT could not build the int8 engine from {qdq_onnx} (see the TensorRT log above); "
                            "remove int8 from engine.precisions to go on without it")
    atomic_write_bytes(plan_path, memoryview(plan).tobytes())
    if timing_cache_path:
        atomic_write_bytes(timing_cache_path, memoryview(config.get_timing_cache().serialize()).tobytes())
    sidecar = T.make_sidecar(plan_path=plan_path, onnx_path=qdq_onnx, precision="int8", fp16_mode=None,
                             tensorrt_version=str(trt.__version__), gpu=gpu, profile={"input": inputs[0]["name"], **shapes},
                             hardware_compatibility=hardware_compatibility, inputs=inputs, outputs=outputs,
                             build_seconds=seconds, optimization_level=optimization_level, workspace_mb=workspace_mb)
    sidecar["quantization"] = "explicit (Q/DQ ONNX, strongly typed network)"
    atomic_write_text(T.sidecar_path_for(plan_path), json.dumps(sidecar, indent=2))
    return sidecar
