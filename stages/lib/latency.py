"""Latency backends and timed cells: how the benchmark stage (and benchmarks/inference_latency.py) runs models.

A backend (eager PyTorch, onnxruntime, TensorRT plans) gives one self-timed block function per model; a cell
times every model of one backend at one batch size in interleaved rounds (stages.lib.timing) and compares
them pairwise (COMPARISONS). The verdict cell, single-threaded onnxruntime at the largest batch, adds rounds
until its interval is narrow enough (docs/latency.md). The verdict itself is in stages.lib.latency_verdict.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from stages.lib import conditions, timing
from stages.lib.errors import PipelineError
from stages.lib.latency_verdict import VERDICT_BACKEND
from stages.lib.progress import progress_bar

MODELS = ("vanilla", "vanilla_b", "merged", "unmerged", "teacher")  # the stage's models, in display order
VERDICT_MODELS = ("vanilla", "vanilla_b", "merged", "unmerged")  # what the verdict and its power statement need
# (metric prefix, candidate, reference): ratio = median(candidate) / median(reference)
COMPARISONS = (("merged_vs_vanilla", "merged", "vanilla"), ("aa", "vanilla_b", "vanilla"),
               ("unmerged_vs_vanilla", "unmerged", "vanilla"), ("teacher_vs_vanilla", "teacher", "vanilla"),
               ("fp16_vs_fp32", "merged_fp16", "merged_fp32"))
GPU_BACKENDS = ("torch_cuda", "onnxruntime_cuda", "onnxruntime_trt", "tensorrt")


@dataclass
class Backend:
    """A named way of running the models: ``make(x)`` gives one self-timed block function per model."""

    name: str
    info: dict
    make: Callable[[np.ndarray], dict[str, timing.BlockFn]]
    close: Callable[[], None] = lambda: None

# ----------------------------------------------------------------------------- backends
def torch_backend(models: dict[str, torch.nn.Module], device: str, threads: int) -> Backend:
    """Eager PyTorch; CPU wall clock with ``threads`` intra-op threads, or CUDA events on a GPU."""
    cuda = device.startswith("cuda")
    mods = {n: (m.to(device) if cuda else m) for n, m in models.items()}
    cpu_timer = _thread_clock(threads)

    def make(x: np.ndarray) -> dict[str, timing.BlockFn]:
        xt = torch.from_numpy(x).to(device)
        if not cuda:
            return {n: timing.timed_block(_no_grad_call(m, xt), cpu_timer=cpu_timer) for n, m in mods.items()}
        return {n: _cuda_block(m, xt) for n, m in mods.items()}

    info = {"timing": "CUDA events around each forward" if cuda else f"perf_counter{_CPU_NOTE * bool(cpu_timer)} around each forward",
            "device": device, "threads": None if cuda else threads, "informational": cuda}
    return Backend("torch_cuda" if cuda else "torch_cpu", info, make)


_CPU_NOTE = " and thread CPU time"


def _thread_clock(threads: int | None) -> Callable[[], float] | None:
    """CPU time of the calling thread: the whole inference cost when it runs single-threaded on that thread."""
    return time.thread_time if threads == 1 else None


def _no_grad_call(m: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        with torch.inference_mode():
            m(x)
    return call


def _cuda_block(m: torch.nn.Module, x: torch.Tensor) -> timing.BlockFn:
    def block(n: int) -> list[float]:
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        with torch.inference_mode():
            for start, end in ev:
                start.record()
                m(x)
                end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in ev]
    return block


def ort_backend(name: str, paths: dict[str, Path], providers: list[str], threads: int | None) -> Backend:
    """onnxruntime sessions (one per model, vanilla_b its own session); wall clock around ``run``."""
    import onnxruntime as ort

    cpu_timer = _thread_clock(threads) if providers == ["CPUExecutionProvider"] else None
    sessions = {}
    for model, path in paths.items():
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        if threads is not None:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        sessions[model] = ort.InferenceSession(str(path), sess_options=so, providers=providers)

    def make(x: np.ndarray) -> dict[str, timing.BlockFn]:
        fns = {}
        for model, s in sessions.items():
            feed = {s.get_inputs()[0].name: x}
            fns[model] = timing.timed_block(lambda s=s, feed=feed: s.run(None, feed), cpu_timer=cpu_timer)
        return fns

    info = {"timing": f"perf_counter{_CPU_NOTE * bool(cpu_timer)} around session.run (host arrays in and out)",
            "providers": providers,
            "intra_op_threads": threads, "inter_op_threads": 1, "execution_mode": "sequential",
            "onnxruntime": ort.__version__, "informational": name != VERDICT_BACKEND,
            "active_providers": next(iter(sessions.values())).get_providers()}
    return Backend(name, info, make)


def tensorrt_backend(engine_dir: Path | None) -> Backend | str:
    """The engine stage's plans through ``stages.lib.trt_runtime.TrtRunner``, or the reason it cannot run."""
    if engine_dir is None:
        return "no engine input (the engine stage did not run here or was skipped)"
    try:
        from stages.lib import trt_env, trt_runtime
    except ImportError as e:
        return f"stages.lib.trt_runtime cannot be imported: {e}"
    ok, reason = trt_env.trt_available()
    if not ok:
        return reason
    plans = {f"merged_{p}": engine_dir / f"model_{p}.plan" for p in ("fp32", "fp16")}
    plans = {n: p for n, p in plans.items() if p.is_file()}
    if not plans:
        return f"no model_fp32.plan / model_fp16.plan in {engine_dir}"
    runners = {}
    try:
        for n, p in plans.items():
            runners[n] = trt_runtime.TrtRunner(p)
    except PipelineError as e:  # engine built for another TensorRT version or GPU
        for r in runners.values():
            r.close()
        return str(e)

    def make(x: np.ndarray) -> dict[str, timing.BlockFn]:  # our ABBA warm-up replaces the runner's own
        return {n: (lambda k, r=r: r.time(x, k, warmup=0)) for n, r in runners.items()}

    def close() -> None:
        for r in runners.values():
            r.close()

    info = {"timing": "TrtRunner.time (CUDA events around execute_async_v3)", "informational": True,
            "plans": {n: p.name for n, p in plans.items()}}
    return Backend("tensorrt", info, make, close)


# ----------------------------------------------------------------------------- measuring
def measure_cell(backend: Backend, x: np.ndarray, *, warmup: int, blocks: int, block_runs: int,
                 n_boot: int, seed: int, on_round: Callable[[int], None] | None = None) -> dict:
    """One informational (backend, batch) cell: ``blocks`` rounds, a summary per model, COMPARISONS with CIs."""
    return {"backend": backend.name, **timing.measure(backend.make(x), batch_size=len(x), pairs=COMPARISONS,
                                                      warmup=warmup, blocks=blocks, block_runs=block_runs,
                                                      n_boot=n_boot, seed=seed, on_round=on_round)}


def measure_verdict_cell(backend: Backend, x: np.ndarray, *, warmup: int, min_rounds: int, block_runs: int,
                         max_seconds: float, band: float, clock: str, n_boot: int, seed: int,
                         on_round: Callable[[int], None] | None = None) -> dict:
    """The verdict cell: rounds of VERDICT_MODELS until merged/vanilla is resolved to +-band/2 with a quiet A/A,
    or time is up. Other models (the teacher) are timed afterwards against vanilla in ``min_rounds`` rounds of
    their own and added to the cell (``side_rounds`` says so): in the adaptive rounds the teacher, 3x a
    student, would take 40% of the verdict's time budget and tell the verdict nothing."""
    fns = backend.make(x)
    cell = timing.measure_adaptive({n: f for n, f in fns.items() if n in VERDICT_MODELS}, batch_size=len(x),
                                   pairs=COMPARISONS, target="merged_vs_vanilla", control="aa", band=band, warmup=warmup,
                                   block_runs=block_runs, min_rounds=min_rounds, max_seconds=max_seconds, n_boot=n_boot,
                                   seed=seed, clock=clock, on_round=on_round)
    others = [n for n in fns if n not in VERDICT_MODELS]
    if others:
        side = timing.measure({"vanilla": fns["vanilla"], **{n: fns[n] for n in others}}, batch_size=len(x),
                              pairs=[p for p in COMPARISONS if p[1] in others and p[2] == "vanilla"], warmup=warmup,
                              blocks=min_rounds, block_runs=block_runs, n_boot=n_boot, seed=seed)
        for n in others:
            cell["models"][n] = side["models"][n]
        for key in ("comparisons", "cpu_comparisons"):
            if key in cell and key in side:
                cell[key].update(side[key])
        cell["side_rounds"] = {"models": others, "rounds": min_rounds, "reference": "vanilla",
                               "why": "timed after the verdict rounds, against vanilla in rounds of their own"}
    return {"backend": backend.name, **cell, "verdict_cell": True}


def verdict_target(backends: list[Backend], batches: list[int]) -> tuple[str, int] | None:
    """Single-threaded onnxruntime CPU at the largest batch, else the first backend timing merged and vanilla."""
    names = [be.name for be in backends if be.name != "tensorrt"]  # TensorRT times the merged engines only
    if not names or not batches:
        return None
    return (VERDICT_BACKEND if VERDICT_BACKEND in names else names[0]), max(batches)


# ----------------------------------------------------------------------------- the stage
def time_cell(be: Backend, x: np.ndarray, c: Any, seed: int, *, verdict: bool, probe: conditions.Probe,
              on_round: Callable[[int], None] | None = None) -> dict:
    """One cell (adaptive when it is the verdict cell) with the conditions it ran under."""
    mon = conditions.Monitor(probe=probe)
    mon.start()

    def tick(i: int) -> None:
        mon.tick()
        if on_round is not None:
            on_round(i)

    if verdict:
        cell = measure_verdict_cell(be, x, warmup=c.warmup, min_rounds=c.blocks, block_runs=c.block_runs,
                                    max_seconds=c.max_seconds, band=c.band, clock=c.verdict_clock,
                                    n_boot=c.bootstrap, seed=seed, on_round=tick)
    else:
        cell = measure_cell(be, x, warmup=c.warmup, blocks=c.blocks, block_runs=c.block_runs, n_boot=c.bootstrap,
                            seed=seed, on_round=tick)
    cell["conditions"] = mon.finish()
    return cell

def time_cells(backends: list[Backend], inputs: dict[int, np.ndarray], c: Any, seed: int, default_threads: int,
               device: str = "cpu") -> list[dict]:
    """Every (backend, batch) cell under one progress bar; a failing informational cell is recorded, not fatal."""

    target = verdict_target(backends, list(inputs))
    cells: list[dict] = []
    with progress_bar() as progress:
        task = progress.add_task("benchmark", total=len(backends) * len(inputs))
        for be in backends:
            torch.set_num_threads(c.threads if be.name == "torch_cpu" else default_threads)
            probe = conditions.Probe(device=device if be.name in GPU_BACKENDS else "cpu")
            for b, x in inputs.items():
                label = f"{be.name} batch {b}" + (" (verdict)" if (be.name, b) == target else "")
                progress.update(task, description=label)
                try:
                    cells.append(time_cell(be, x, c, seed, verdict=(be.name, b) == target, probe=probe,
                                           on_round=lambda i, label=label: progress.update(
                                               task, description=f"{label}, round {i + 1}")))
                except Exception as e:  # noqa: BLE001 - e.g. a batch outside a TensorRT profile
                    if be.name in ("torch_cpu", VERDICT_BACKEND) or (be.name, b) == target:
                        raise
                    cells.append({"backend": be.name, "batch": b, "skipped": f"{type(e).__name__}: {e}"[:300]})
                progress.advance(task)
    return cells
