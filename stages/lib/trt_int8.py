"""INT8 TensorRT engines from a Q/DQ ONNX (explicit quantization), on TensorRT 10.x and 11.x.

TensorRT's documentation: "Use explicit quantization with Strong Typing. Precision-control build flags are
not required and should not be specified." So int8 is a precision of ``BuildSettings`` like fp32 and fp16:
``stages.lib.trt_build.build_engine`` creates the network strongly typed (the ``STRONGLY_TYPED`` creation flag),
sets no precision flag (no calibrator, removed in 11; no ``BuilderFlag.INT8``, removed in 11) and lets the
Q/DQ nodes decide where int8 runs; the bundle's trtexec line (``--stronglyTyped``) comes from the same
settings. This module is the engine stage's entry point for it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from stages.lib import trt_build
from stages.lib.trt_build import network_flags  # noqa: F401 - re-exported (the strongly typed creation flag)

QUANTIZATION = "explicit (Q/DQ ONNX, strongly typed network)"


def build_int8_engine(qdq_onnx: Path | str, plan_path: Path | str, *, min_batch: int, opt_batch: int, max_batch: int,
                      workspace_mb: int = 1024, optimization_level: int = 3, hardware_compatibility: str = "none",
                      timing_cache_path: Optional[Path | str] = None, log=print) -> dict:
    """Build ``plan_path`` from the Q/DQ ONNX and write its sidecar (precision ``int8``); returns the sidecar."""
    return trt_build.build_engine(qdq_onnx, plan_path, precision="int8", min_batch=min_batch, opt_batch=opt_batch,
                                  max_batch=max_batch, workspace_mb=workspace_mb, optimization_level=optimization_level,
                                  hardware_compatibility=hardware_compatibility, timing_cache_path=timing_cache_path,
                                  sidecar_extra={"quantization": QUANTIZATION}, log=log)
