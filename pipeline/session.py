"""What the CLI commands do: run the graph or one stage, print status and the results table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline import graph
from pipeline.config import PipelineConfig
from pipeline.runner import Runner, StageResult, select
from stages.lib import eta
from stages.lib.errors import PipelineError

console = Console(stderr=False, highlight=False)


def _log(msg: str) -> None:
    console.print(msg, markup=False)


def _describe(r: StageResult) -> str:
    if r.status == "restored":
        return "restored (stage cache)"
    if r.status == "cached":
        return "skipped (cached)"
    if r.status == "skipped":
        return f"skipped: {r.reason}"
    return f"done in {r.seconds:.1f}s"


def run_pipeline(cfg: PipelineConfig, run_dir: Path, *, from_stage: Optional[str] = None, to_stage: Optional[str] = None,
                 force: bool = False, nproc: int = 1, config_path: Optional[str] = None,
                 overrides: tuple[str, ...] = (), seeds: tuple[int, ...] = ()) -> list[StageResult]:
    """Run the selected stages; with ``seeds`` (the first one is ``cfg``'s student seed), also baseline and
    distill for every other seed under ``<run_dir>/seeds/``, sharing this run's teacher."""
    stages = select(from_stage, to_stage)  # a bad --from/--to fails before the run directory is touched
    if len(seeds) > 1:
        from pipeline.seeds import stages_through

        stages_through(to_stage or graph.ORDER[-1])
    runner = Runner(cfg, run_dir, log=_log)
    runner.rd.lock()
    try:
        runner.save_config()
        results = []
        run_eta = eta.reset()
        for name in stages:
            spec = graph.get(name)
            if not run_eta.order:
                _plan_eta(runner, stages, run_eta)
            run_eta.begin(name)
            left = run_eta.total(None)
            console.rule(f"[bold]{name}[/]" + (f" (run ETA {eta.fmt_eta(left)})" if left else "") + f" — {spec.help}")
            if nproc > 1 and spec.distributed:
                result = _run_torchrun(runner, name, nproc, force, config_path, overrides, run_dir)
            else:
                result = runner.run_stage(name, force=force)
            run_eta.end(name, result.seconds, ran=result.status == "done")
            _log(f"{name}: {_describe(result)}")
            results.append(result)
        if len(seeds) > 1:
            from pipeline.seeds import run_seeds

            console.rule(f"[bold]seeds[/] — baseline and distill for seeds {', '.join(map(str, seeds[1:]))}")
            run_seeds(runner, seeds[1:], nproc=nproc, force=force, config_path=config_path, overrides=overrides, log=_log)
        print_results(runner, results)
        _write_report(runner)
        return results
    finally:
        runner.rd.unlock()


def _plan_eta(runner: Runner, stages: list[str], run_eta: "eta.RunEta") -> None:
    """The run's cost plan for the ETA, once the dataset is described (no plan, no run ETA: never an error)."""
    from stages.lib.dataset_meta import DatasetMeta

    rec = runner.rd.record("data")
    meta_file = graph.artifact_path(runner.rd.path, "data", "dataset")
    if not rec or rec.get("status") != "done" or not meta_file.is_file():
        return
    try:
        run_eta.plan(stages, eta.plan_flops(runner.cfg, DatasetMeta.load(meta_file).to_dict(), stages))
    except Exception as e:  # noqa: BLE001 - an estimate must never stop a run
        run_eta.plan(stages, {})  # planned as unknown: stage ETAs only, and no retry at every stage
        _log(f"(no run ETA: {type(e).__name__}: {str(e)[:120]})")


def _run_torchrun(runner: Runner, name: str, nproc: int, force: bool, config_path, overrides, run_dir) -> StageResult:
    """Launch ``torchrun --nproc-per-node N -m pipeline.cli stage NAME`` (cached stages are not launched)."""
    hit = runner.cached(name, force=force)  # the same decision (tamper check included) as a plain `run`
    if hit is not None:
        return hit
    runner.check_inputs(graph.get(name))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "pipeline.cli", "stage", name, "--run-dir", str(run_dir)]
    if config_path:
        cmd += ["-c", str(config_path)]
    for o in overrides:
        cmd += ["--set", o]
    if force:
        cmd.append("--force")
    env = dict(os.environ, **{"NORM_PIPELINE_LOCK_HELD": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise PipelineError(f"stage {name} failed under torchrun with {nproc} processes (exit {proc.returncode}); see the output above")
    runner.refresh(name)
    rec = runner.rd.record(name) or {}
    return StageResult(name, "done", rec.get("duration_s", 0.0), rec.get("metrics", {}))


def run_single(cfg: PipelineConfig, run_dir: Path, name: str, *, force: bool = False, take_lock: bool = True) -> StageResult:
    """Run one stage; under torchrun rank 0 owns the run directory and the other ranks follow it."""
    from stages.lib import dist

    spec = graph.get(name)
    if dist.launched_by_torchrun():
        from stages.lib.training import resolve_device

        dist.init(resolve_device(cfg.run.device))
        if dist.rank() != 0:
            try:
                return _follow(cfg, run_dir, spec)
            finally:
                dist.shutdown()
        dist.hold_followers()
    runner = Runner(cfg, run_dir, log=_log)
    result: Optional[StageResult] = None
    try:
        if take_lock:
            runner.rd.lock()
        runner.rd.ensure()
        runner.save_config()
        result = runner.run_stage(name, force=force, standalone=True)
        if take_lock:  # under `run --nproc`, the parent reports
            _log(f"{name}: {_describe(result)}")
            if result.metrics:
                print_results(runner, [result])
            _write_report(runner)  # report.html / summary.json follow every stage, as after `run`
        return result
    finally:
        # followers still waiting (cached stage, or an error before training began) go home without running
        dist.release_followers({"run": False, "status": result.status if result else "failed"})
        runner.rd.unlock()
        dist.shutdown()


def _follow(cfg: PipelineConfig, run_dir: Path, spec: graph.StageSpec) -> StageResult:
    """A rank > 0: wait for rank 0 to prepare the stage folder, then run the same stage with its context."""
    from stages.lib import dist
    from stages.lib.context import StageContext

    order = dist.hold_followers() or {"run": False, "status": "failed"}
    if not order.get("run"):
        return StageResult(spec.name, order.get("status", "cached"))
    ctx = StageContext(name=spec.name, out_dir=Path(order["out_dir"]), run_dir=Path(run_dir), cfg=cfg,
                       inputs={k: Path(v) for k, v in order["inputs"].items()}, input_records=order["input_records"],
                       force=order["force"], log=lambda m: None, rank=dist.rank(), world_size=dist.world_size())
    metrics = spec.load()(ctx) or {}
    return StageResult(spec.name, "done", metrics=metrics)


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.2e}"  # merge/parity differences: 2.19e-07, not 0.0000
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def print_results(runner: Runner, results: list[StageResult]) -> None:
    table = Table(title=f"run {runner.rd.path}", show_lines=False)
    for col in ("stage", "status", "time", "key metrics"):
        table.add_column(col)
    for r in results:
        spec = graph.get(r.name)
        keys = [k for k in spec.key_metrics if k in r.metrics]
        metrics = ", ".join(f"{k}={_fmt(r.metrics[k])}" for k in keys) or r.reason
        table.add_row(r.name, escape(_describe(r).split(" in ")[0]), f"{r.seconds:.1f}s" if r.status == "done" else "",
                      escape(metrics))
    console.print(table)
    acc = accuracy_summary(runner)
    if acc:
        console.print("[bold]accuracy (val top-1):[/] " + "  ".join(f"{k} {v * 100:.2f}%" for k, v in acc.items()))


def accuracy_summary(runner: Runner) -> dict[str, float]:
    """Teacher / baseline / NORM / merged top-1 from the records, when present, under the terminal's labels."""
    from stages.lib import accuracy

    def metrics(stage: str) -> dict:
        rec = runner.rd.record(stage)
        return (rec.get("metrics") or {}) if rec and rec.get("status") == "done" else {}

    acc = accuracy.accuracy_summary(metrics)
    return {label: float(value) for key, label in accuracy.LABELS.items() if (value := acc[key]) is not None}


def _write_report(runner: Runner) -> None:
    """report.html + summary.json into the run directory, and the verdicts as a small table here."""
    from pipeline import report

    path = report.write_report(runner.rd.path)
    summary = json.loads((runner.rd.path / report.SUMMARY).read_text())
    console.print(report.terminal_summary(summary))
    _log(f"report: {path}")


def print_status(cfg: PipelineConfig, run_dir: Path) -> list[str]:
    """Print the stage table; returns the stages whose files no longer match their records."""
    runner = Runner(cfg, run_dir, log=_log)
    tampered: list[str] = []
    table = Table(title=f"status of {run_dir}")
    for col in ("stage", "state", "finished", "key metrics"):
        table.add_column(col)
    colors = {"done": "green", "stale": "yellow", "skipped": "cyan", "missing": "dim", "interrupted": "red"}
    for spec in graph.STAGES:
        state = runner.plan.state(spec.name)  # the plan `run` uses: same answer, each artifact hashed once
        rec = runner.plan.record(spec.name) or {}
        m = rec.get("metrics", {})
        info = ", ".join(f"{k}={_fmt(m[k])}" for k in spec.key_metrics if k in m) or rec.get("reason", "")
        if state == "modified":
            tampered.append(spec.name)
            info = f"files changed since the record: {', '.join(runner.plan.modified(spec.name)[:3])}"
        color = colors.get(state, "red")
        table.add_row(spec.name, f"[{color}]{state}[/]", (rec.get("finished") or "")[:19].replace("T", " "), escape(info))
    console.print(table)
    return tampered


def print_stage_list() -> None:
    table = Table(title="stages (in order)")
    for col in ("stage", "reads", "writes", "config", "what it does"):
        table.add_column(col)
    for s in graph.STAGES:
        reads = ", ".join(list(s.inputs) + [f"{o} (optional)" for o in s.optional_inputs]) or "-"
        table.add_row(s.name, reads, s.describe_outputs(), ", ".join(s.config), s.help)
    console.print(table)
