"""How reliable is the "inference cost unchanged" verdict? Re-runs the benchmark stage K times on one run.

Reads an existing run directory (its config.yaml and the finished data, teacher, distill, merge, export stages;
engine when done), runs the benchmark stage K times, each into a temporary folder (the run directory is not
touched), and prints for merged (the verdict) and for unmerged (the negative control) the counts of
yes / no / inconclusive, with the median rounds and seconds of the verdict cell and of the whole stage.

    python benchmarks/verdict_reliability.py                      # K=10 on runs/default
    python benchmarks/verdict_reliability.py --run-dir runs/x -k 20 --set benchmark.max_seconds=30
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ANSWERS = ("yes", "no", "inconclusive")
INPUTS = ("data", "teacher", "distill", "merge", "export")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", default="runs/default", help="a run directory where the export stage is done")
    p.add_argument("-k", type=int, default=10, help="how many times to run the benchmark stage")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="benchmark.KEY=VALUE",
                   help="override the run's config for these runs (repeatable)")
    p.add_argument("--run-benchmark-config", action="store_true",
                   help="use the benchmark section of the run's config.yaml (default: today's defaults, as a new run would)")
    p.add_argument("--max-stage-seconds", type=float, default=90.0, help="the stage's time budget to check against")
    p.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    return p.parse_args(argv)


def load(run_dir: Path, overrides: list[str], run_benchmark_config: bool = False):
    """The run's resolved config (its benchmark section reset to the defaults unless asked, then the overrides),
    its finished input folders and their records."""
    import yaml

    from pipeline.config import load_config
    from pipeline.rundir import RunDir
    from stages.lib.errors import PipelineError

    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise PipelineError(f"{cfg_file} not found: pass --run-dir of a run made by `norm-pipeline run`")
    data = yaml.safe_load(cfg_file.read_text()) or {}
    if not run_benchmark_config:
        data.pop("benchmark", None)
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "config.yaml"
        resolved.write_text(yaml.safe_dump(data))
        cfg = load_config(str(resolved), tuple(overrides))
    rd = RunDir(run_dir)
    records = {n: rd.record(n) for n in (*INPUTS, "engine")}
    missing = [n for n in INPUTS if not records[n] or records[n].get("status") != "done"]
    if missing:
        raise PipelineError(f"{run_dir} lacks finished stage(s) {', '.join(missing)}; run "
                            f"`norm-pipeline run --to export --run-dir {run_dir}` first")
    done = {n: r for n, r in records.items() if r and r.get("status") == "done"}
    return cfg, {n: rd.stage_dir(n) for n in done}, done


def run_once(cfg, inputs: dict, records: dict, run_dir: Path, work: Path) -> dict:
    """One benchmark stage run into ``work``; the figures this script reports."""
    from pipeline.graph import stage_module

    benchmark = stage_module("benchmark")
    from stages.lib.context import StageContext
    from stages.lib.training import resolve_device

    work.mkdir(parents=True)
    ctx = StageContext(name="benchmark", out_dir=work, run_dir=run_dir, cfg=cfg, inputs=inputs, input_records=records,
                       device=resolve_device(cfg.run.device), log=lambda m: None)
    t0 = time.perf_counter()
    m = benchmark.run(ctx)
    return {"stage_seconds": time.perf_counter() - t0, **{k: m.get(k) for k in (
        "verdict", "verdict_reason", "unmerged_verdict", "unmerged_reason", "verdict_rounds", "verdict_seconds",
        "verdict_stopped", "merged_vs_vanilla_ratio", "merged_vs_vanilla_lo", "merged_vs_vanilla_hi", "aa_ratio", "aa_lo",
        "aa_hi", "unmerged_vs_vanilla_ratio", "conditions_changed")}}


def report(runs: list[dict], k: int, budget: float) -> bool:
    """The counts table and the acceptance lines; True when merged yes >= 90%, no never, unmerged no always."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    t = Table(title=f"benchmark stage x {k}")
    for col in ("model", *ANSWERS, "median rounds", "median verdict s", "median stage s", "max stage s"):
        t.add_column(col, justify="left" if col == "model" else "right")
    med = lambda key: statistics.median(r[key] for r in runs if r.get(key) is not None)  # noqa: E731
    stage = [r["stage_seconds"] for r in runs]
    for label, key in (("merged", "verdict"), ("unmerged", "unmerged_verdict")):
        n = Counter(r[key] for r in runs)
        t.add_row(label, *(f"{n[a]}/{k}" for a in ANSWERS), f"{med('verdict_rounds'):.0f}", f"{med('verdict_seconds'):.1f}",
                  f"{statistics.median(stage):.1f}", f"{max(stage):.1f}")
    console.print(t)
    merged, unmerged = Counter(r["verdict"] for r in runs), Counter(r["unmerged_verdict"] for r in runs)
    checks = {f"merged yes in >= 90% ({merged['yes']}/{k})": merged["yes"] >= 0.9 * k,
              f"merged no never ({merged['no']}/{k})": merged["no"] == 0,
              f"unmerged no always ({unmerged['no']}/{k})": unmerged["no"] == k,
              f"stage <= {budget:g} s every run (max {max(stage):.1f} s)": max(stage) <= budget}
    for line, ok in checks.items():
        console.print(f"{'[green]ok[/]' if ok else '[red]FAILED[/]'}  {line}")
    return all(checks.values())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from stages.lib.errors import PipelineError

    run_dir = Path(args.run_dir)
    try:
        cfg, inputs, records = load(run_dir, args.overrides, args.run_benchmark_config)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{run_dir}: band ±{cfg.benchmark.band:.0%}, verdict cell up to {cfg.benchmark.max_seconds:g} s, "
          f"min {cfg.benchmark.blocks} rounds of {cfg.benchmark.block_runs} runs, batches {cfg.benchmark.batch_sizes}")
    runs = []
    with tempfile.TemporaryDirectory(prefix="verdict-reliability-") as tmp:
        for i in range(args.k):
            r = run_once(cfg, inputs, records, run_dir, Path(tmp) / f"run{i}")
            runs.append(r)
            print(f"run {i + 1}/{args.k}: {r['verdict']:<12} unmerged {r['unmerged_verdict']:<12} "
                  f"merged/vanilla {r['merged_vs_vanilla_ratio']:.4f} [{r['merged_vs_vanilla_lo']:.4f}, "
                  f"{r['merged_vs_vanilla_hi']:.4f}], A/A [{r['aa_lo']:.4f}, {r['aa_hi']:.4f}], "
                  f"{r['verdict_rounds']} rounds, {r['verdict_seconds']:.1f} s ({r['verdict_stopped']}), "
                  f"stage {r['stage_seconds']:.1f} s" + (f"; changed: {r['conditions_changed']}" if r["conditions_changed"] else ""),
                  flush=True)
            if r["verdict"] != "yes":
                print(f"    reason: {r['verdict_reason']}", flush=True)
    ok = report(runs, args.k, args.max_stage_seconds)
    if args.json:
        args.json.write_text(json.dumps({"run_dir": str(run_dir), "k": args.k, "overrides": args.overrides,
                                         "runs": runs, "criteria_met": ok}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
