"""Stage `engine`: TensorRT engines (fp32, fp16 from export/model.onnx; int8 from the quantize stage's Q/DQ ONNX),
checked on the validation set.

Each precision gives ``model_<prec>.plan`` (TensorRT's bytes, loadable by trtexec) and ``model_<prec>.json``
(the sidecar: TensorRT version, GPU, profile, hashes). Every engine is compared with onnxruntime on the CPU
over the whole validation set (Polygraphy's rule, per-precision tolerances), and its top-1 accuracy and
top-1 agreement with onnxruntime are reported in ``engine.json``. Without TensorRT or a GPU the stage is
skipped with the reason.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from stages.lib.context import StageContext
from stages.lib.dataset_meta import DatasetMeta
from stages.lib.errors import PipelineError
from stages.lib.progress import progress_bar

RULE = "element fails if |a-b| > atol and |a-b| > rtol*|b| (Polygraphy)"
# int8 logits are not compared element-wise: its top-1 is gated against fp32 (quantize.max_drop, bundle stage)
INT8_TOL = (1e30, 1e30)


def int8_source(ctx: StageContext) -> Path | str:
    """quantize/model_int8.onnx when the quantize stage shipped it, else why there is no int8 engine."""
    if "quantize" not in ctx.inputs:
        return "the quantize stage did not run (it makes the Q/DQ ONNX TensorRT builds INT8 from)"
    q = json.loads(ctx.artifact("quantize", "quantize").read_text())
    int8 = q["precisions"]["int8"]
    ref = int8.get("qdq_reference") or int8  # TensorRT implements the Q/DQ arithmetic, not onnxruntime's CPU kernels
    if not ref["shipped"]:
        return ref.get("reason", "the INT8 model failed its accuracy gate")
    return Path(ctx.inputs["quantize"]) / int8["file"]


def run_padded(runner: Any, x: np.ndarray, min_batch: int) -> np.ndarray:
    """``runner.infer`` on a batch smaller than the profile's minimum: pad with zeros, drop the padding."""
    n = len(x)
    if n >= min_batch:
        return runner.infer(x)
    pad = np.zeros((min_batch - n, *x.shape[1:]), dtype=x.dtype)
    return runner.infer(np.concatenate([x, pad]))[:n]


class _Tally:
    """Streaming parity and accuracy of one engine against the onnxruntime reference."""

    def __init__(self, atol: float, rtol: float) -> None:
        self.atol, self.rtol = atol, rtol
        self.max_abs = self.max_rel = 0.0
        self.failed = self.elements = self.correct = self.agree = self.samples = 0
        self.nonfinite = False

    def add(self, out: np.ndarray, ref: np.ndarray, y: np.ndarray) -> None:
        from stages.lib.onnx_utils import compare_outputs

        c = compare_outputs(out, ref, atol=self.atol, rtol=self.rtol)
        self.max_abs, self.max_rel = max(self.max_abs, c["max_abs_diff"]), max(self.max_rel, c["max_rel_diff"])
        self.failed += c["failed_elements"]
        self.elements += c["elements"]
        if out.shape == ref.shape:
            self.correct += int((out.argmax(1) == y).sum())
            self.agree += int((out.argmax(1) == ref.argmax(1)).sum())
        self.nonfinite |= not bool(np.isfinite(out).all())
        self.samples += len(y)

    def report(self) -> dict:
        n = max(self.samples, 1)
        return {"parity": {"ok": self.failed == 0 and self.elements > 0, "atol": self.atol, "rtol": self.rtol,
                           "max_abs_diff": self.max_abs, "max_rel_diff": self.max_rel, "failed_elements": self.failed,
                           "elements": self.elements, "nonfinite_outputs": self.nonfinite},
                "top1": self.correct / n, "top1_agreement": self.agree / n, "samples": self.samples}


def evaluate(session: Any, runners: dict[str, Any], batches: Iterable, *, min_batch: int,
             tolerances: dict[str, tuple[float, float]], total: int | None = None) -> dict:
    """Run onnxruntime and every engine over ``batches`` of (x, y); per-precision parity and accuracy."""

    from stages.lib.onnx_utils import run_ort

    tallies = {p: _Tally(*tolerances[p]) for p in runners}
    ort_correct = seen = 0
    with progress_bar() as progress:
        task = progress.add_task("engine parity", total=total)
        for xb, yb in batches:
            x, y = np.ascontiguousarray(np.asarray(xb, dtype=np.float32)), np.asarray(yb)
            ref = run_ort(session, x)
            ort_correct += int((ref.argmax(1) == y).sum())
            seen += len(y)
            for p, runner in runners.items():
                tallies[p].add(run_padded(runner, x, min_batch), ref, y)
            progress.advance(task)
    if seen == 0:
        raise PipelineError("the validation set is empty: nothing to check the engines on (check data.val_limit)")
    return {"samples": seen, "ort_top1": ort_correct / seen, "engines": {p: t.report() for p, t in tallies.items()}}


def latency(runner: Any, x: np.ndarray, batch: int, iters: int = 50) -> dict:
    """A short look at GPU latency at the profile's opt batch (the benchmark stage measures properly)."""
    xb = np.resize(x, (batch, *x.shape[1:])).astype(np.float32)
    ms = np.asarray(runner.time(xb, iters), dtype=np.float64)
    return {"batch": batch, "iters": iters, "median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "timing": "CUDA events around execute_async_v3, no host/device copies"}


def _torch_batches(meta: dict, batch: int):
    from stages.lib.datasets import val_batches

    for x, y in val_batches(meta, batch_size=batch, device="cpu"):
        yield x.numpy(), y.numpy()


def run(ctx: StageContext) -> dict:
    from stages.lib import onnx_utils, trt_build, trt_env, trt_runtime

    ok, reason = trt_env.trt_available()
    if not ok:
        ctx.skip(reason)
    c = ctx.cfg.engine
    onnx_path = ctx.artifact("export", "model")
    if not onnx_path.is_file():
        raise PipelineError(f"{onnx_path} not found; re-run `norm-pipeline stage export`")
    meta = DatasetMeta.load(ctx.artifact("data", "dataset")).to_dict()
    cache = Path(c.timing_cache) if c.timing_cache else Path(ctx.cfg.run.root) / ".trt_timing_cache"
    sidecars, not_built = {}, {}
    for prec in dict.fromkeys(c.precisions):
        if prec == "int8":  # explicit quantization: built from the quantize stage's Q/DQ ONNX, isolated
            qdq = int8_source(ctx)
            if isinstance(qdq, str):
                not_built["int8"] = qdq
                ctx.log(f"int8 engine not built: {qdq}")
                continue
            from stages.lib.trt_int8 import build_int8_engine

            ctx.log(f"building the int8 TensorRT engine from {qdq.name} (Q/DQ, strongly typed)")
            sidecars[prec] = build_int8_engine(qdq, ctx.out_dir / "model_int8.plan", min_batch=c.min_batch,
                                               opt_batch=c.opt_batch, max_batch=c.max_batch, workspace_mb=c.workspace_mb,
                                               optimization_level=c.optimization_level,
                                               hardware_compatibility=c.hardware_compatibility, timing_cache_path=cache,
                                               log=ctx.log)
            continue
        ctx.log(f"building the {prec} TensorRT engine (profile {c.min_batch}/{c.opt_batch}/{c.max_batch})")
        sidecars[prec] = trt_build.build_engine(onnx_path, ctx.out_dir / f"model_{prec}.plan", precision=prec,
                                                min_batch=c.min_batch, opt_batch=c.opt_batch, max_batch=c.max_batch,
                                                workspace_mb=c.workspace_mb, optimization_level=c.optimization_level,
                                                hardware_compatibility=c.hardware_compatibility, timing_cache_path=cache,
                                                log=ctx.log)
    batch = max(c.min_batch, min(c.max_batch, ctx.cfg.data.eval_batch_size))
    tolerances = {p: INT8_TOL if p == "int8" else (getattr(c, f"{p}_atol"), getattr(c, f"{p}_rtol")) for p in sidecars}
    runners = {p: trt_runtime.TrtRunner(ctx.out_dir / f"model_{p}.plan") for p in sidecars}
    try:
        for p, r in runners.items():
            for note in getattr(r, "notes", []):
                ctx.log(f"{p}: {note}")
        total = -(-int(meta.get("val_size") or 0) // batch) or None
        first: list[np.ndarray] = []

        def batches():
            for x, y in _torch_batches(meta, batch):
                first[:] = first or [x]
                yield x, y

        result = evaluate(onnx_utils.ort_session(onnx_path), runners, batches(), min_batch=c.min_batch,
                          tolerances=tolerances, total=total)
        for p, r in runners.items():
            result["engines"][p]["latency"] = latency(r, first[0], c.opt_batch)
    finally:
        for r in runners.values():
            r.close()
    result["not_built"] = not_built
    return _report(ctx, sidecars, result, onnx_path)


def _report(ctx: StageContext, sidecars: dict, result: dict, onnx_path: Path) -> dict:
    """engine.json, flat metrics, and a PipelineError (after writing) when an engine misses its tolerance."""
    any_side = next(iter(sidecars.values()))
    engines = {}
    for p, side in sidecars.items():
        keep = ("plan", "plan_sha256", "plan_bytes", "fp16_mode", "build_seconds", "hardware_compatibility", "profile")
        engines[p] = {"sidecar": f"model_{p}.json", **{k: side.get(k) for k in keep}, **result["engines"][p]}
    failed = [p for p, e in engines.items() if not e["parity"]["ok"]]
    report = {"tensorrt_version": any_side["tensorrt_version"], "gpu": any_side["gpu_name"],
              "compute_capability": any_side["compute_capability"], "onnx": onnx_path.name,
              "onnx_sha256": any_side["onnx_sha256"], "reference": "onnxruntime CPUExecutionProvider", "rule": RULE,
              "samples": result["samples"], "ort_top1": result["ort_top1"], "engines": engines, "ok": not failed,
              "not_built": result.get("not_built", {})}
    ctx.write_json("engine.json", report)
    metrics: dict[str, Any] = {"tensorrt_version": report["tensorrt_version"], "gpu": report["gpu"],
                               "compute_capability": report["compute_capability"], "samples": result["samples"],
                               "ort_top1": result["ort_top1"], "parity_ok": not failed}
    for p, e in engines.items():
        metrics.update({f"{p}_top1": e["top1"], f"{p}_top1_agreement": e["top1_agreement"],
                        f"{p}_max_abs_diff": e["parity"]["max_abs_diff"], f"{p}_max_rel_diff": e["parity"]["max_rel_diff"],
                        f"{p}_failed_elements": e["parity"]["failed_elements"], f"{p}_parity_ok": e["parity"]["ok"],
                        f"{p}_build_seconds": e["build_seconds"], f"{p}_plan_bytes": e["plan_bytes"]})
        if "latency" in e:
            metrics[f"{p}_latency_ms"] = e["latency"]["median_ms"]
    if failed:
        worst = ", ".join(f"{p}: {engines[p]['parity']['failed_elements']} elements off, max abs diff "
                          f"{engines[p]['parity']['max_abs_diff']:.3g} (atol {engines[p]['parity']['atol']}, "
                          f"rtol {engines[p]['parity']['rtol']})" for p in failed)
        raise PipelineError(f"TensorRT output differs from onnxruntime beyond tolerance: {worst}; see engine.json, "
                            "loosen engine.<prec>_atol/_rtol if the accuracy figures are acceptable")
    ctx.log("engines: " + ", ".join(f"{p} top-1 {e['top1']:.4f} (agreement {e['top1_agreement']:.4f}, max abs diff "
                                    f"{e['parity']['max_abs_diff']:.2e})" for p, e in engines.items()))
    return metrics
