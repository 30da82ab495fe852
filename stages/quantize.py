"""Stage `quantize`: INT8 by explicit quantization (Q/DQ ONNX), fp16 and INT8 accuracy gates, INT8 CPU speed-up.

``model_int8.onnx`` is model.onnx with QuantizeLinear/DequantizeLinear nodes from onnxruntime's static
quantizer: symmetric int8 activations and weights, per-channel weight scales, calibrated on a fixed slice of
the training split whose indices and sha256 are recorded. Q/DQ ONNX is also what TensorRT 10.x and 11.x
build INT8 engines from (explicit quantization; TensorRT 11 has no calibrators), so the engine stage
builds its INT8 engine from this file. ``model_fp16.onnx`` is the fp16 copy the bundle ships.

Gate: top-1 of each reduced precision on the whole validation set against fp32; a model that loses more
than ``quantize.max_drop`` points is not shipped, and ``quantize.json`` says why. INT8 is measured twice: as
onnxruntime runs it on this CPU (fused int8 kernels) and as the Q/DQ graph defines it (optimisations off,
the arithmetic TensorRT implements); it ships only when both pass, and the engine stage builds a TensorRT
INT8 engine when the Q/DQ reference passes (that engine is then gated on its own measured top-1). INT8 and fp32 are then
timed on onnxruntime CPU with the benchmark's paired ABBA method and an A/A control; the speed-up verdict
is ``faster``, ``slower`` or ``inconclusive``.
"""
from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from stages.lib import timing
from stages.lib.context import StageContext
from stages.lib.dataset_meta import DatasetMeta
from stages.lib.errors import PipelineError
from stages.lib.io import atomic_write_bytes
from stages.lib.latency_verdict import speed_verdict
from stages.lib.progress import progress_bar

# (label, candidate, reference): ratio = median(candidate) / median(reference)
PAIRS = (("int8_vs_fp32", "int8", "fp32"), ("aa", "fp32_b", "fp32"))
EVAL_BATCH = 128  # accuracy batches: any size gives the same figures; no config section needed
METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


# ----------------------------------------------------------------------------- quantization
def quantize_int8(src: Path, dst: Path, calib: np.ndarray, *, method: str, batch: int = 32) -> dict:
    """Static Q/DQ quantization of ``src`` into ``dst`` (atomic): int8 symmetric, per-channel weights."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from stages.lib.onnx_utils import INPUT_NAME

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT_NAME: np.ascontiguousarray(calib[i : i + batch], dtype=np.float32)}
                                 for i in range(0, len(calib), batch)])

        def get_next(self):
            return next(self.batches, None)

    notes = []
    with tempfile.TemporaryDirectory(prefix="norm-quant-") as tmp:
        source = Path(tmp) / "prep.onnx"
        try:  # shape inference + graph cleanup, as onnxruntime recommends before quantizing
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(src), str(source))
        except Exception as e:  # noqa: BLE001 - pre-processing is an optimisation; quantize the original instead
            source = src
            notes.append(f"quant_pre_process failed ({type(e).__name__}: {str(e)[:120]}); quantized model.onnx as it is")
        out = Path(tmp) / "int8.onnx"
        try:
            quantize_static(str(source), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, METHODS[method]),
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        except Exception as e:  # noqa: BLE001 - any quantizer failure is one line for the user
            raise PipelineError(f"onnxruntime could not quantize {src.name}: {type(e).__name__}: {str(e)[:200]}; "
                                "set quantize.enabled=false to skip INT8") from None
        atomic_write_bytes(dst, out.read_bytes())
    ops = Counter(n.op_type for n in onnx.load(str(dst), load_external_data=False).graph.node)
    return {"file": dst.name, "format": "QDQ", "activation_type": "int8 (symmetric)", "weight_type": "int8 (symmetric)",
            "per_channel": True, "calibration_method": method, "quantize_linear": ops.get("QuantizeLinear", 0),
            "dequantize_linear": ops.get("DequantizeLinear", 0), "notes": notes}


# ----------------------------------------------------------------------------- accuracy
def evaluate(sessions: dict[str, Any], batches, total: int | None = None) -> dict:
    """Top-1 of every session over ``batches`` of (x, y); agreement and max abs diff against ``fp32``."""

    from stages.lib.onnx_utils import run_ort

    correct, agree, maxdiff, seen = Counter(), Counter(), {n: 0.0 for n in sessions}, 0
    with progress_bar() as progress:
        task = progress.add_task("quantize: accuracy", total=total)
        for xb, yb in batches:
            outs = {n: run_ort(s, xb) for n, s in sessions.items()}
            ref = outs["fp32"]
            for n, o in outs.items():
                correct[n] += int((o.argmax(1) == yb).sum())
                agree[n] += int((o.argmax(1) == ref.argmax(1)).sum())
                maxdiff[n] = max(maxdiff[n], float(np.abs(o.astype(np.float64) - ref).max(initial=0.0)))
            seen += len(yb)
            progress.advance(task)
    if seen == 0:
        raise PipelineError("the validation set is empty: nothing to gate INT8/fp16 on (check data.val_limit)")
    return {n: {"top1": correct[n] / seen, "top1_agreement_vs_fp32": agree[n] / seen,
                "max_abs_diff_vs_fp32": maxdiff[n], "samples": seen} for n in sessions}


def reference_session(path: Path) -> Any:
    """onnxruntime with graph optimisations off: Q/DQ nodes run as written (quantize, dequantize, float op).

    That is the model's own arithmetic, which TensorRT's explicit quantization implements; the optimised
    session fuses them into int8 kernels whose accuracy depends on the CPU (without VNNI, x86 int8 products
    can saturate), so both are measured.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def gate(precision: str, acc: dict, fp32_top1: float, max_drop: float) -> dict:
    """Ship ``precision`` only when it loses at most ``max_drop`` top-1 points against fp32."""
    drop = (fp32_top1 - acc["top1"]) * 100
    out = {**acc, "drop_pts": drop, "max_drop_pts": max_drop, "shipped": drop <= max_drop}
    if not out["shipped"]:
        out["reason"] = (f"{precision} top-1 {acc['top1']:.2%} is {drop:.2f} points below fp32 {fp32_top1:.2%} "
                         f"(quantize.max_drop = {max_drop}); not shipped")
    return out


# ----------------------------------------------------------------------------- speed
def paired_ratio(block_fns: dict[str, timing.BlockFn], *, batch: int, c: Any, seed: int) -> dict:
    """The benchmark's paired estimator (stages.lib.timing), the only call into it from this stage."""
    return timing.measure(block_fns, batch_size=batch, pairs=PAIRS, warmup=c.warmup, blocks=c.blocks,
                          block_runs=c.block_runs, n_boot=c.bootstrap, seed=seed)


def _sessions(paths: dict[str, Path], threads: int) -> dict[str, Any]:
    import onnxruntime as ort

    out = {}
    for name, path in paths.items():
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
        out[name] = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    return out


def benchmark(fp32: Path, int8: Path, x: np.ndarray, c: Any, seed: int, log: Callable[[str], None]) -> dict:
    """INT8 vs fp32 (and an A/A fp32 control) on onnxruntime CPU, per batch size; speed-up = 1 / time ratio."""
    sessions = _sessions({"fp32": fp32, "fp32_b": fp32, "int8": int8}, c.threads)
    cpu_timer = time.thread_time if c.threads == 1 else None  # a single ORT thread runs on the calling thread
    cells = []
    for b in sorted(set(c.batch_sizes)):
        xb = np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])), dtype=np.float32)
        feeds = {n: {s.get_inputs()[0].name: xb} for n, s in sessions.items()}
        fns = {n: timing.timed_block(lambda s=s, f=feeds[n]: s.run(None, f), cpu_timer=cpu_timer)
               for n, s in sessions.items()}
        cell = paired_ratio(fns, batch=b, c=c, seed=seed)
        clock = "cpu" if cell.get("cpu_comparisons") else "wall"
        comps = cell["cpu_comparisons" if clock == "cpu" else "comparisons"]
        r, aa = comps["int8_vs_fp32"], comps["aa"]
        verdict, why = speed_verdict(r, aa)
        cells.append({"batch": b, "clock": clock, "int8_over_fp32": r, "aa": aa, "speedup": 1 / r["ratio"],
                      "speedup_ci95": [1 / r["hi"], 1 / r["lo"]], "verdict": verdict, "why": why,
                      "median_ms": {n: m["median_ms"] for n, m in cell["models"].items()},
                      "cpu_median_ms": {n: m["cpu"]["median_ms"] for n, m in cell["models"].items() if "cpu" in m}})
        log(f"int8 vs fp32, batch {b}: speed-up {cells[-1]['speedup']:.2f}x [{cells[-1]['speedup_ci95'][0]:.2f}, "
            f"{cells[-1]['speedup_ci95'][1]:.2f}] ({clock} clock): {verdict}")
    return {"runtime": "onnxruntime CPUExecutionProvider", "threads": c.threads,
            "method": "ABBA-interleaved blocks, paired bootstrap 95% CI of the ratio of medians, A/A fp32 control",
            "cells": cells}


# ----------------------------------------------------------------------------- the stage
def _val(meta: dict, batch: int):
    from stages.lib.datasets import val_batches

    for x, y in val_batches(meta, batch_size=batch, device="cpu"):
        yield np.ascontiguousarray(x.numpy()), y.numpy()


def run(ctx: StageContext) -> dict:
    from stages.lib.golden import calibration_slice
    from stages.lib.onnx_fp16 import convert_onnx_to_fp16
    from stages.lib.onnx_utils import ort_session

    c = ctx.cfg.quantize
    if not c.enabled:
        ctx.skip("quantize.enabled is false")
    src = ctx.artifact("export", "model")
    if not src.is_file():
        raise PipelineError(f"{src} not found; re-run `norm-pipeline stage export`")
    meta = DatasetMeta.load(ctx.artifact("data", "dataset")).to_dict()
    calib, calib_info = calibration_slice(meta, c.calibration_samples, ctx.cfg.run.seed)
    ctx.log(f"quantizing to INT8 (Q/DQ, per-channel, {c.calibration_method} calibration on {len(calib)} training images)")
    int8 = quantize_int8(src, ctx.out_dir / "model_int8.onnx", calib, method=c.calibration_method)
    fp16 = convert_onnx_to_fp16(src, ctx.out_dir / "model_fp16.onnx")
    paths = {"fp32": src, "fp16": ctx.out_dir / "model_fp16.onnx", "int8": ctx.out_dir / "model_int8.onnx"}
    batch = EVAL_BATCH
    total = -(-int(meta.get("val_size") or 0) // batch) or None
    sessions = {n: ort_session(p) for n, p in paths.items()}
    sessions["int8_qdq"] = reference_session(paths["int8"])
    acc = evaluate(sessions, _val(meta, batch), total)
    ref = acc["fp32"]["top1"]
    qdq = gate("int8 (Q/DQ reference)", acc["int8_qdq"], ref, c.max_drop)
    precisions = {"fp32": {**acc["fp32"], "file": "model.onnx", "drop_pts": 0.0, "shipped": True},
                  "fp16": {**gate("fp16", acc["fp16"], ref, c.max_drop), "file": "model_fp16.onnx",
                           "converted_initializers": fp16["initializers"], "clipped_values": fp16["clipped_values"]},
                  "int8": {**gate("int8 in onnxruntime CPU", acc["int8"], ref, c.max_drop), "file": "model_int8.onnx", **int8,
                           "qdq_reference": qdq}}
    if precisions["int8"]["shipped"] and not qdq["shipped"]:
        precisions["int8"].update(shipped=False, reason=qdq["reason"])
    speed = benchmark(src, paths["int8"], calib[:64], c, ctx.cfg.run.seed, ctx.log)
    main_cell = max(speed["cells"], key=lambda cell: cell["batch"])
    precisions["int8"]["speedup_vs_fp32"] = {k: main_cell[k] for k in ("batch", "clock", "speedup", "speedup_ci95", "verdict", "why")}
    report = {"source": {"file": src.name, "sha256": ctx.input_records.get("export", {}).get("metrics", {}).get("model_onnx_sha256")},
              "calibration": calib_info, "max_drop_pts": c.max_drop, "precisions": precisions, "speed": speed,
              "rule": "a precision ships when its top-1 on the whole validation set is at most quantize.max_drop "
                      "points below fp32 (onnxruntime CPU)"}
    ctx.write_json("quantize.json", report)
    for p in ("fp16", "int8"):
        e = precisions[p]
        ctx.log(f"{p}: top-1 {e['top1']:.2%} ({-e['drop_pts']:+.2f} pts vs fp32), agreement {e['top1_agreement_vs_fp32']:.2%}: "
                + ("shipped" if e["shipped"] else e["reason"]))
    return {"fp32_top1": ref, "samples": acc["fp32"]["samples"], "calibration_sha256": calib_info["sha256"],
            **{f"{p}_{k}": precisions[p][k] for p in ("fp16", "int8")
               for k in ("top1", "drop_pts", "top1_agreement_vs_fp32", "shipped")},
            "int8_qdq_top1": qdq["top1"], "int8_qdq_drop_pts": qdq["drop_pts"], "int8_qdq_passes": qdq["shipped"],
            "int8_speedup": main_cell["speedup"], "int8_speedup_lo": main_cell["speedup_ci95"][0],
            "int8_speedup_hi": main_cell["speedup_ci95"][1], "int8_speed_verdict": main_cell["verdict"],
            "int8_speed_batch": main_cell["batch"], "int8_qdq_nodes": int8["quantize_linear"] + int8["dequantize_linear"]}
