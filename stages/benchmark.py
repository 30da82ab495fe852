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
"""
from __future__ import annotations

import copy
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from stages.lib import conditions, timing
from stages.lib.context import StageContext
from stages.lib.dataset_meta import DatasetMeta
from stages.lib.errors import PipelineError
from stages.lib.io import atomic_write_text

ONNX_FILES = {"vanilla": "vanilla.onnx", "vanilla_b": "vanilla.onnx", "merged": "model.onnx",
              "unmerged": "unmerged.onnx", "teacher": "teacher.onnx"}
# (metric prefix, candidate, reference): ratio = median(candidate) / median(reference)
COMPARISONS = (("merged_vs_vanilla", "merged", "vanilla"), ("aa", "vanilla_b", "vanilla"),
               ("unmerged_vs_vanilla", "unmerged", "vanilla"), ("teacher_vs_vanilla", "teacher", "vanilla"),
               ("fp16_vs_fp32", "merged_fp16", "merged_fp32"))
VERDICT_BACKEND = "onnxruntime_cpu"
VERDICT_KEYS = ("verdict", "verdict_reason", "verdict_power", "unmerged_verdict", "unmerged_reason", "verdict_backend",
                "verdict_batch", "verdict_clock", "verdict_rounds", "verdict_seconds", "verdict_stopped", "band",
                "aa_within_band", "conditions_changed")
RULE = ("per round, log(merged block / vanilla block) ({clock} clock); their median, 95% bootstrap CI over rounds. "
        "'yes': CI inside 1 ± {band}, and the A/A control's (vanilla_b/vanilla) too; 'no': CI entirely beyond one edge "
        "and beyond the A/A's deviation from 1; 'inconclusive': anything else, or fewer than {min_rounds} rounds. "
        "Rounds are added until the CI half-width is <= {half} and the A/A CI is inside 1 ± {half}, or {max_seconds:g} s "
        "are spent")


@dataclass
class Backend:
    """A named way of running the models: ``make(x)`` gives one self-timed block function per model."""

    name: str
    info: dict
    make: Callable[[np.ndarray], dict[str, timing.BlockFn]]
    close: Callable[[], None] = lambda: None


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


def tensorrt_backend(ctx: StageContext) -> Backend | str:
    """The engine stage's plans through ``stages.lib.trt.TrtRunner``, or the reason it cannot run."""
    if "engine" not in ctx.inputs:
        return "no engine input (the engine stage did not run here or was skipped)"
    try:
        from stages.lib import trt
    except ImportError as e:
        return f"stages.lib.trt cannot be imported: {e}"
    ok, reason = trt.trt_available()
    if not ok:
        return reason
    plans = {f"merged_{p}": ctx.inputs["engine"] / f"model_{p}.plan" for p in ("fp32", "fp16")}
    plans = {n: p for n, p in plans.items() if p.is_file()}
    if not plans:
        return f"no model_fp32.plan / model_fp16.plan in {ctx.inputs['engine']}"
    runners = {}
    try:
        for n, p in plans.items():
            runners[n] = trt.TrtRunner(p)
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
        trt = tensorrt_backend(ctx)
        if isinstance(trt, str):
            skipped["tensorrt"] = trt
        else:
            backends.append(trt)
    return backends, skipped


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
    """The verdict cell: rounds until merged/vanilla is resolved to +-band/2 with a quiet A/A, or time is up."""
    cell = timing.measure_adaptive(backend.make(x), batch_size=len(x), pairs=COMPARISONS, target="merged_vs_vanilla",
                                   control="aa", band=band, warmup=warmup, block_runs=block_runs, min_rounds=min_rounds,
                                   max_seconds=max_seconds, n_boot=n_boot, seed=seed, clock=clock, on_round=on_round)
    return {"backend": backend.name, **cell, "verdict_cell": True}


def verdict_target(backends: list[Backend], batches: list[int]) -> tuple[str, int] | None:
    """Single-threaded onnxruntime CPU at the largest batch, else the first backend timing merged and vanilla."""
    names = [be.name for be in backends if be.name != "tensorrt"]  # TensorRT times the merged engines only
    if not names or not batches:
        return None
    return (VERDICT_BACKEND if VERDICT_BACKEND in names else names[0]), max(batches)


def pick_verdict_cell(cells: list[dict]) -> dict | None:
    """The cell measured for the verdict; for older records: onnxruntime CPU at its largest batch, else the first
    backend with the comparison."""
    ok = [c for c in cells if "merged_vs_vanilla" in c.get("comparisons", {})]
    marked = [c for c in ok if c.get("verdict_cell")]
    if marked:
        return marked[0]
    for want in (VERDICT_BACKEND, None):
        chosen = [c for c in ok if want is None or c["backend"] == want]
        if chosen:
            first = chosen[0]["backend"]
            return max((c for c in chosen if c["backend"] == first), key=lambda c: c["batch"])
    return None


def _pct(band: float) -> str:
    return f"{band:.0%}" if round(band * 100, 6) == round(band * 100) else f"{band:.1%}"


def judge(comps: dict, band: float, adaptive: dict | None, unmerged_flops: float | None = None) -> dict:
    """The three-valued verdict with its reason, the negative control's answer, and the power sentence."""
    mv, aa, um = comps["merged_vs_vanilla"], comps["aa"], comps.get("unmerged_vs_vanilla")
    answer, reason = timing.decide(mv, band, control=aa, name="merged/vanilla")
    out: dict[str, Any] = {"aa_within_band": timing.verdict(aa["lo"], aa["hi"], band)}
    if um is not None:
        u_answer, u_reason = timing.decide(um, band, control=aa, name="unmerged/vanilla")
        out.update(unmerged_verdict=u_answer, unmerged_reason=u_reason)
        if answer == "yes" and u_answer == "yes" and unmerged_flops is not None and unmerged_flops > 1 + 2 * band:
            answer, reason = "inconclusive", (f"the negative control came out equal to vanilla ({timing.fmt_ci(um)}) although "
                                              f"it has {unmerged_flops - 1:+.0%} FLOPs: this timing does not see model cost")
        if u_answer == "no":
            detect = f"this benchmark detects the unmerged student's {um['ratio'] - 1:+.0%}"
            found = {"yes": f"it finds merged = vanilla within ±{_pct(band)}",
                     "no": f"it finds merged measurably {'slower' if mv['ratio'] > 1 else 'faster'} than vanilla "
                           f"({mv['ratio'] - 1:+.1%})",
                     "inconclusive": f"it could not resolve merged vs vanilla to ±{_pct(band)}"}[answer]
            out["verdict_power"] = f"{detect}; {found}"
        else:
            out["verdict_power"] = f"the negative control (unmerged student, FT kept) was not resolved: {u_reason}"
    if answer == "inconclusive" and adaptive and adaptive.get("stopped") == "time limit":
        reason += (f" (after {adaptive['rounds']} rounds in {adaptive['seconds']:.0f} s: raise benchmark.max_seconds "
                   "or rerun on a quieter machine)")
    out.update(verdict=answer, verdict_reason=reason)
    return out


def flat_metrics(cells: list[dict], vcell: dict | None, band: float, clock: str, struct: dict | None = None) -> dict:
    """Ratios and verdict from the verdict cell by ``clock`` ("cpu" falls back to wall where absent)."""
    m: dict[str, Any] = {}
    if vcell is not None:
        used = "cpu" if clock == "cpu" and vcell.get("cpu_comparisons") else "wall"
        comps = vcell["cpu_comparisons" if used == "cpu" else "comparisons"]
        for label in ("merged_vs_vanilla", "aa", "unmerged_vs_vanilla", "teacher_vs_vanilla"):
            if label in comps:
                m.update({f"{label}_{k}": comps[label][k] for k in ("ratio", "lo", "hi")})
        if used == "cpu":  # the wall-clock view of the same cell, next to it
            for label in ("merged_vs_vanilla", "aa"):
                m.update({f"wall_{label}_{k}": vcell["comparisons"][label][k] for k in ("ratio", "lo", "hi")})
        flops = (struct or {}).get("flops", {})
        ratio = flops["unmerged"] / flops["vanilla"] if flops.get("unmerged") and flops.get("vanilla") else None
        adaptive = vcell.get("adaptive")
        m.update(judge(comps, band, adaptive, ratio))
        m["verdict_backend"], m["verdict_batch"], m["verdict_clock"] = vcell["backend"], vcell["batch"], used
        m["verdict_rounds"] = comps["merged_vs_vanilla"].get("rounds")
        if adaptive:
            m["verdict_seconds"], m["verdict_stopped"] = adaptive["seconds"], adaptive["stopped"]
    else:
        m.update(verdict="n/a", verdict_backend=None, verdict_reason="no backend timed merged and vanilla")
    m["band"] = band
    flags = [f"{c['backend']} batch {c['batch']}: {line}" for c in cells for line in c.get("conditions", {}).get("changed", [])]
    m["conditions_changed"] = "; ".join(flags)
    for c in cells:
        for name, s in c.get("models", {}).items():
            m[f"{c['backend']}_b{c['batch']}_{name}_median_ms"] = s["median_ms"]
    return m


def environment(default_threads: int) -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
             if ln.startswith("model name")]
    return {"cpu": names[0] if names else platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_default_threads": default_threads, "python": platform.python_version(),
            "platform": platform.platform(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# ----------------------------------------------------------------------------- report
def _ci(comp: dict) -> str:
    return f"{comp['ratio']:.3f} [{comp['lo']:.3f}, {comp['hi']:.3f}]"


def latency_table(cells: list[dict], skipped: dict, metrics: dict, struct: dict) -> str:
    """Markdown: one row per (backend, batch, model), then skipped backends, structure and the verdict."""
    rows = ["| backend | batch | model | median ms | p90 ms | p99 ms | items/s | / vanilla [95% CI] | CPU ms | "
            "CPU / vanilla [95% CI] |", "|---|---:|---|---:|---:|---:|---:|---|---:|---|"]
    for c in cells:
        if "skipped" in c:
            rows.append(f"| {c['backend']} | {c['batch']} | skipped: {c['skipped']} | | | | | | | |")
            continue
        vs = {v["candidate"]: _ci(v) for v in c["comparisons"].values()}
        cpu_vs = {v["candidate"]: _ci(v) for v in c.get("cpu_comparisons", {}).values()}
        for n, s in c["models"].items():
            cpu = f"{s['cpu']['median_ms']:.3f}" if "cpu" in s else ""
            rows.append(f"| {c['backend']} | {c['batch']} | {n} | {s['median_ms']:.3f} | {s['p90_ms']:.3f} | "
                        f"{s['p99_ms']:.3f} | {s['throughput_per_s']:.0f} | {vs.get(n, '')} | {cpu} | {cpu_vs.get(n, '')} |")
    lines = ["# Inference latency", "", *rows, ""]
    lines += [f"- {b}: skipped: {why}" for b, why in skipped.items()]
    lines += [f"- params: {struct['params']}", f"- FLOPs per image: {struct['flops']}",
              f"- merged vs vanilla identical (the proof): {struct['identical']}"]
    if metrics.get("verdict_backend"):
        rounds = f", {metrics['verdict_rounds']} rounds" if metrics.get("verdict_rounds") else ""
        secs = f" in {metrics['verdict_seconds']:.0f} s" if metrics.get("verdict_seconds") is not None else ""
        lines.append(f"- **inference cost unchanged: {metrics['verdict']}** ({metrics['verdict_backend']}, batch "
                     f"{metrics['verdict_batch']}, {metrics['verdict_clock']} clock{rounds}{secs}, band ±{_pct(metrics['band'])}): "
                     f"{metrics['verdict_reason']}" + ("" if "A/A" in metrics["verdict_reason"] else
                     f"; A/A control {metrics['aa_ratio']:.3f} [{metrics['aa_lo']:.3f}, {metrics['aa_hi']:.3f}]"))
        if metrics.get("verdict_power"):
            lines.append(f"- negative control: {metrics['verdict_power']}")
    else:
        lines.append("- inference cost unchanged: n/a (no backend timed merged and vanilla)")
    if metrics.get("conditions_changed"):
        lines.append(f"- conditions changed during the timing: {metrics['conditions_changed']}")
    return "\n".join(lines) + "\n"


def plot_latency(cells: list[dict], path: Path) -> None:
    """One panel per batch size: per backend, grouped bars of median latency with p90 whiskers + ratio CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [c for c in cells if "models" in c]
    batches = sorted({c["batch"] for c in done}) or [0]
    order = [*ONNX_FILES, "merged_fp32", "merged_fp16"]
    names = sorted({n for c in done for n in c["models"]}, key=lambda n: (order.index(n) if n in order else len(order), n))
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    per_panel = max([6.0] + [2.6 * sum(c["batch"] == b for c in done) for b in batches])
    fig, axes = plt.subplots(1, len(batches), figsize=(per_panel * len(batches), 5.2), squeeze=False)
    for ax, b in zip(axes[0], batches):
        group = [c for c in done if c["batch"] == b]
        width, labelled = 0.8 / max(len(names), 1), set()
        for gi, c in enumerate(group):
            for mi, n in enumerate(names):
                if n in c["models"]:
                    s = c["models"][n]
                    ax.bar(gi + (mi - (len(names) - 1) / 2) * width, s["median_ms"], width, color=colors[n],
                           yerr=[[0], [s["p90_ms"] - s["median_ms"]]], capsize=2,
                           label=None if n in labelled else n)
                    labelled.add(n)
        ticks = []  # backend name, then the ratio CIs under it
        for c in group:
            notes = [f"{label} {clock} {_ci(c[key][k])}" for key, clock in (("comparisons", "wall"), ("cpu_comparisons", "cpu"))
                     for k, label in (("merged_vs_vanilla", "merged/v"), ("aa", "A/A")) if k in c.get(key, {})]
            ticks.append("\n".join([c["backend"], *notes]))
        ax.set_xticks(range(len(group)), ticks, fontsize=7)
        ax.set_title(f"batch {b}")
        ax.set_ylabel("median latency, ms (whisker: p90)")
    legend = {lb: h for ax in axes[0] for h, lb in zip(*ax.get_legend_handles_labels())}
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="upper center", ncol=len(legend), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


GPU_BACKENDS = ("torch_cuda", "onnxruntime_cuda", "onnxruntime_trt", "tensorrt")


def time_cells(backends: list[Backend], inputs: dict[int, np.ndarray], c: Any, seed: int, default_threads: int,
               device: str = "cpu") -> list[dict]:
    """Every (backend, batch) cell under one progress bar; a failing informational cell is recorded, not fatal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    target = verdict_target(backends, list(inputs))
    cells: list[dict] = []
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as progress:
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
        verdict["rule"] = RULE.format(clock=metrics["verdict_clock"], band=_pct(c.band), half=_pct(c.band / 2),
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
