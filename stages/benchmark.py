"""Stage `benchmark`: is the merged NORM student's inference cost that of the vanilla student?

Times vanilla, a second vanilla instance (the A/A control: its interval is the machine's noise floor),
merged, unmerged (FT still in: the negative control, which must come out slower) and teacher, interleaved
in counterbalanced rounds, on every available backend and batch size. Ratios are per-round paired
estimates with bootstrap CIs (stages.lib.timing; the method is in docs/latency.md). The verdict comes from
single-threaded onnxruntime at the largest batch, by thread CPU time unless benchmark.verdict_clock=wall;
that cell adds rounds until its interval is narrow enough or benchmark.max_seconds are spent, and answers
yes / no / inconclusive with a reason. Other cells are informational. Params, FLOPs and ONNX graph identity
are recorded alongside: they are the proof, the timing confirms it. Every cell records the machine's
conditions (stages.lib.conditions) and flags a change during the timing.

This module is the orchestration only: the backends and timed cells are in stages.lib.latency, the verdict
in stages.lib.latency_verdict, latency.md and latency.png in stages.lib.latency_report.
"""
from __future__ import annotations

import copy
import os
import platform
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.lib import timing
from stages.lib.context import StageContext
from stages.lib.dataset_meta import DatasetMeta
from stages.lib.errors import PipelineError
from stages.lib.io import atomic_write_text
from stages.lib.latency import ort_backend, tensorrt_backend, time_cells, torch_backend
from stages.lib.latency_report import latency_table, plot_latency
from stages.lib.latency_verdict import RULE, VERDICT_BACKEND, VERDICT_KEYS, flat_metrics, pct, pick_verdict_cell

ONNX_FILES = {"vanilla": "vanilla.onnx", "vanilla_b": "vanilla.onnx", "merged": "model.onnx",
              "unmerged": "unmerged.onnx", "teacher": "teacher.onnx"}  # keys: stages.lib.latency.MODELS

# ----------------------------------------------------------------------------- models
def load_torch_models(ctx: StageContext, include_teacher: bool) -> dict[str, torch.nn.Module]:
    """vanilla / vanilla_b: fresh vanilla students holding the merged weights; merged; unmerged; teacher."""
    from models.norm import LogitsOnly
    from models.registry import create_model
    from stages.lib.checkpoints import load_model, load_norm_student

    merged, meta = load_model(ctx.artifact("merge", "model"), "merged student")
    models: dict[str, torch.nn.Module] = {}
    for name in ("vanilla", "vanilla_b"):
        fresh = create_model(meta["model"], num_classes=meta["num_classes"], in_chans=meta["in_chans"])
        fresh.load_state_dict(merged.state_dict(), strict=True)
        models[name] = fresh.eval()
    models["merged"] = merged
    ns, _ = load_norm_student(ctx.artifact("distill", "norm_student"))
    models["unmerged"] = LogitsOnly(ns).eval()
    if include_teacher:
        models["teacher"] = load_model(ctx.artifact("teacher", "model"), "teacher")[0]
    return models


def onnx_paths(export_dir: Path, names: list[str]) -> dict[str, Path]:
    paths = {n: export_dir / ONNX_FILES[n] for n in names}
    missing = sorted({p.name for p in paths.values() if not p.is_file()})
    if missing:
        raise PipelineError(f"export folder {export_dir} lacks {', '.join(missing)}; re-run `norm-pipeline stage export --force`")
    return paths


def structure(models: dict[str, torch.nn.Module], paths: dict[str, Path], shape: tuple[int, ...]) -> dict:
    """Params, FLOPs per image (stages.lib.flops: 2 x multiply-adds) and ONNX operator counts per model."""
    import onnx

    from stages.lib.flops import count_flops, count_params

    out: dict[str, Any] = {"params": {}, "flops": {}, "onnx_ops": {}}
    for name, m in models.items():
        if name != "vanilla_b":
            out["params"][name] = count_params(m)
            out["flops"][name] = count_flops(m, (1, *shape))
    for name, p in paths.items():
        if name != "vanilla_b":
            graph = onnx.load(str(p), load_external_data=False).graph
            out["onnx_ops"][name] = dict(sorted(Counter(n.op_type for n in graph.node).items()))
    ops = out["onnx_ops"]
    out["identical"] = {"params": out["params"]["merged"] == out["params"]["vanilla"],
                        "flops": out["flops"]["merged"] == out["flops"]["vanilla"],
                        "onnx_ops": ops.get("merged") == ops.get("vanilla")}
    return out


def make_backends(ctx: StageContext, torch_models: dict, paths: dict, default_threads: int) -> tuple[list, dict]:
    """Backends to run and {backend: reason} for the ones that cannot run here."""
    c = ctx.cfg.benchmark
    backends, skipped = [], {}
    if "torch" in c.backends:
        backends.append(torch_backend(torch_models, "cpu", c.threads))
        if ctx.device.startswith("cuda"):
            if torch.cuda.is_available():
                cuda_models = {n: copy.deepcopy(m) for n, m in torch_models.items()}
                backends.append(torch_backend(cuda_models, ctx.device, c.threads))
            else:
                skipped["torch_cuda"] = "torch.cuda.is_available() is False"
    if "onnxruntime" in c.backends:
        import onnxruntime as ort

        available = ort.get_available_providers()
        backends.append(ort_backend(VERDICT_BACKEND, paths, ["CPUExecutionProvider"], c.threads))
        if c.multithreaded and default_threads != c.threads:
            backends.append(ort_backend("onnxruntime_cpu_mt", paths, ["CPUExecutionProvider"], default_threads))
        for ep, name in (("CUDAExecutionProvider", "onnxruntime_cuda"), ("TensorrtExecutionProvider", "onnxruntime_trt")):
            if ep not in available:
                skipped[name] = f"{ep} not in onnxruntime's providers {available}"
                continue
            try:  # onnxruntime-gpu lists its providers even when CUDA/TensorRT libraries fail to load
                be = ort_backend(name, paths, [ep, "CPUExecutionProvider"], None)
            except Exception as e:  # noqa: BLE001 - informational backend: record why and go on
                skipped[name] = f"{ep} failed: {e}"[:300]
                continue
            if ep in be.info["active_providers"]:
                backends.append(be)
            else:
                skipped[name] = f"{ep} fell back to {be.info['active_providers']} (CUDA/TensorRT libraries missing?)"
    if "tensorrt" in c.backends:
        trt = tensorrt_backend(ctx.inputs.get("engine"))
        if isinstance(trt, str):
            skipped["tensorrt"] = trt
        else:
            backends.append(trt)
    return backends, skipped


def environment(default_threads: int) -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
             if ln.startswith("model name")]
    return {"cpu": names[0] if names else platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_default_threads": default_threads, "python": platform.python_version(),
            "platform": platform.platform(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run(ctx: StageContext) -> dict:
    c = ctx.cfg.benchmark
    meta = DatasetMeta.load(ctx.artifact("data", "dataset")).to_dict()
    shape = (int(meta["in_chans"]), *map(int, meta["input_size"]))
    names = ["vanilla", "vanilla_b", "merged", "unmerged"] + (["teacher"] if c.include_teacher else [])
    paths = onnx_paths(ctx.input("export"), names)
    torch_models = load_torch_models(ctx, c.include_teacher)
    default_threads = torch.get_num_threads()
    struct = structure(torch_models, paths, shape)
    graph_identical = ctx.input_metrics("export").get("graph_identical")  # the export stage's full graph comparison
    if graph_identical is not None:
        struct["identical"]["onnx_graph"] = bool(graph_identical)
    backends, skipped = make_backends(ctx, torch_models, paths, default_threads)
    rng = np.random.default_rng(ctx.cfg.run.seed)
    inputs = {b: rng.standard_normal((b, *shape)).astype(np.float32) for b in sorted(set(c.batch_sizes))}
    try:
        cells = time_cells(backends, inputs, c, ctx.cfg.run.seed, default_threads, ctx.device)
    finally:
        torch.set_num_threads(default_threads)
        for be in backends:
            be.close()
    vcell = pick_verdict_cell(cells)
    metrics = flat_metrics(cells, vcell, c.band, c.verdict_clock, struct)
    verdict = {k: metrics.get(k) for k in VERDICT_KEYS}
    if vcell is not None:
        verdict["rule"] = RULE.format(clock=metrics["verdict_clock"], band=pct(c.band), half=pct(c.band / 2),
                                      max_seconds=c.max_seconds, min_rounds=timing.MIN_DECIDE_ROUNDS)
    ctx.write_json("benchmark.json", {
        "config": c.model_dump(mode="json"), "input_shape": list(shape), "environment": environment(default_threads),
        "backends": {be.name: be.info for be in backends}, "skipped_backends": skipped, "structure": struct,
        "cells": cells, "verdict": verdict})
    table = latency_table(cells, skipped, metrics, struct)
    atomic_write_text(ctx.out_dir / "latency.md", table)
    plot_latency(cells, ctx.out_dir / "latency.png")
    for line in table.splitlines():
        ctx.log(line)
    metrics.update({f"{k}_{n}": v for k, d in (("params", struct["params"]), ("flops", struct["flops"])) for n, v in d.items()})
    metrics["structure_identical"] = all(v for v in struct["identical"].values() if v is not None)
    return metrics
