"""Does bf16 autocast change what NORM adds? The default run in fp32 and in bf16, paired by seed.

For every seed, the pipeline runs up to ``distill`` twice, in separate run directories under ``--root``:
``seed<S>-none`` (``amp: none``, fp32) and ``seed<S>-bf16`` (bf16 autocast for baseline and distill). With
``--teacher-amp none`` (the default) both arms use the same fp32 teacher, trained once per seed: its stage
folders are copied into the bf16 run directory, whose runner then finds the teacher cached (same
fingerprint). ``--teacher-amp arm`` trains the teacher in each arm's precision too (the whole default-run
change; no sharing possible).

Prints per seed NORM top-1, baseline top-1 and NORM - baseline for each arm, the paired difference
(bf16 - fp32) of NORM - baseline with its 95% t interval, the seed-to-seed spread, a verdict on whether
the difference stays within seed noise, and each arm's stage times. Example (the default config, 3 seeds):

    python benchmarks/amp_seeds.py -c pipeline.yaml --seeds 0 1 2 --root runs/amp_seeds

Re-running resumes: finished runs are cached by the pipeline. ``--json FILE`` writes every figure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("none", "bf16")
STAGES = ("teacher", "baseline", "distill")
# two-sided 95% Student t quantiles by degrees of freedom (1..30); beyond that the normal 1.96
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-c", "--config", default=str(ROOT / "pipeline.yaml"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--root", type=Path, default=Path("runs/amp_seeds"), help="one run directory per seed and arm here")
    p.add_argument("--teacher-amp", choices=("none", "bf16", "arm"), default="none",
                   help="teacher precision: one shared teacher per seed (none/bf16), or each arm's own (arm)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra config override for every run (repeatable)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- statistics
def mean_ci(values: list[float]) -> tuple[float, Optional[float], Optional[float], Optional[float]]:
    """(mean, sd, lo, hi): the 95% Student t interval of the mean; sd/lo/hi None with fewer than 2 values."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, None, None, None
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = (T95[n - 2] if n - 1 <= len(T95) else 1.96) * sd / math.sqrt(n)
    return m, sd, m - half, m + half


def verdict(diffs: list[float], gains_fp32: list[float]) -> tuple[str, str]:
    """Is the paired difference of (NORM - baseline) within seed noise? yes / no / inconclusive, and why.

    yes: the 95% interval of the mean difference contains 0 and lies inside +- the seed-to-seed standard
    deviation of NORM - baseline in fp32; no: the interval excludes 0; otherwise inconclusive.
    """
    m, _, lo, hi = mean_ci(diffs)
    _, noise, _, _ = mean_ci(gains_fp32)
    if lo is None or noise is None:
        return "inconclusive", "needs at least 2 seeds for an interval"
    if lo > 0 or hi < 0:
        return "no", f"the paired difference {m:+.2f} pts [{lo:+.2f}, {hi:+.2f}] excludes 0"
    if -noise <= lo and hi <= noise:
        return "yes", f"[{lo:+.2f}, {hi:+.2f}] pts contains 0 and lies within the seed spread +-{noise:.2f} pts"
    return "inconclusive", (f"[{lo:+.2f}, {hi:+.2f}] pts contains 0 but is wider than the seed spread +-{noise:.2f} pts: "
                            "more seeds needed")


# ----------------------------------------------------------------------------- runs
def run_dir(root: Path, seed: int, arm: str) -> Path:
    return root / f"seed{seed}-{arm}"


def overrides_for(seed: int, arm: str, teacher_amp: str, extra: list[str]) -> list[str]:
    t = arm if teacher_amp == "arm" else teacher_amp
    return [f"run.seed={seed}", f"teacher.amp={t}", f"baseline.amp={arm}", f"distill.amp={arm}", *extra]


def run_pipeline(config: str, rd: Path, overrides: list[str]) -> None:
    """``norm-pipeline run --to distill`` in a child process (the CLI exactly as a user runs it)."""
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "-c", config, "--run-dir", str(rd), "--to", "distill"]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"error: the run in {rd} failed (exit {proc.returncode}); see its output above")


def share_teacher(src: Path, dst: Path) -> None:
    """Copy the finished data and teacher stages (folders with their records) into a fresh run directory."""
    for stage in ("data", "teacher"):
        if (src / stage / "record.json").is_file() and not (dst / stage).exists():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src / stage, dst / stage)


def read_run(rd: Path) -> dict:
    """Accuracies, precision and stage seconds from the records of one run directory."""
    rec = {s: json.loads((rd / s / "record.json").read_text()) for s in STAGES}
    m = {s: rec[s].get("metrics", {}) for s in STAGES}
    return {"teacher_top1": m["teacher"].get("top1"), "baseline_top1": m["baseline"].get("ce_top1"),
            "norm_top1": m["distill"].get("top1"),
            "amp": {s: m[s].get("amp") for s in STAGES},
            "seconds": {s: rec[s].get("duration_s") for s in STAGES},
            "teacher_started": rec["teacher"].get("started")}


def collect(args: argparse.Namespace) -> dict:
    rows = []
    for seed in args.seeds:
        row = {"seed": seed}
        for arm in ARMS:
            rd = run_dir(args.root, seed, arm)
            if arm != ARMS[0] and args.teacher_amp != "arm":
                share_teacher(run_dir(args.root, seed, ARMS[0]), rd)
            run_pipeline(args.config, rd, overrides_for(seed, arm, args.teacher_amp, args.overrides))
            row[arm] = read_run(rd)
        row["teacher_shared"] = (args.teacher_amp != "arm"
                                 and row["none"]["teacher_started"] == row["bf16"]["teacher_started"])
        rows.append(row)
    return summarize(rows, args.teacher_amp)


def summarize(rows: list[dict], teacher_amp: str) -> dict:
    """Per-seed gains, the paired difference with its interval, the verdict and mean stage times."""
    for r in rows:
        for arm in ARMS:
            r[arm]["gain_pts"] = (r[arm]["norm_top1"] - r[arm]["baseline_top1"]) * 100
        r["diff_pts"] = r["bf16"]["gain_pts"] - r["none"]["gain_pts"]
    out: dict = {"seeds": [r["seed"] for r in rows], "teacher_amp": teacher_amp, "rows": rows}
    for arm in ARMS:
        gains = [r[arm]["gain_pts"] for r in rows]
        out[f"gain_{arm}"] = dict(zip(("mean", "sd", "lo", "hi"), mean_ci(gains), strict=True))
        for key in ("norm_top1", "baseline_top1", "teacher_top1"):
            out[f"{key}_{arm}"] = dict(zip(("mean", "sd", "lo", "hi"), mean_ci([r[arm][key] * 100 for r in rows]), strict=True))
        out[f"seconds_{arm}"] = {s: sum(r[arm]["seconds"][s] or 0.0 for r in rows) / len(rows) for s in STAGES}
    diffs = [r["diff_pts"] for r in rows]
    out["diff"] = dict(zip(("mean", "sd", "lo", "hi"), mean_ci(diffs), strict=True))
    out["within_seed_noise"], out["why"] = verdict(diffs, [r["none"]["gain_pts"] for r in rows])
    return out


def _ci(d: dict, unit: str = "") -> str:
    if d["lo"] is None:
        return f"{d['mean']:+.2f}{unit} (one seed: no interval)"
    return f"{d['mean']:+.2f}{unit} [{d['lo']:+.2f}, {d['hi']:+.2f}]"


def print_summary(s: dict) -> None:
    print(f"\nNORM - baseline (top-1 points) per seed; teacher: {s['teacher_amp']}")
    print(f"{'seed':>4} | {'NORM fp32':>9} {'base fp32':>9} {'gain fp32':>9} | {'NORM bf16':>9} {'base bf16':>9} "
          f"{'gain bf16':>9} | {'bf16-fp32':>9} | teacher shared")
    for r in s["rows"]:
        a, b = r["none"], r["bf16"]
        print(f"{r['seed']:>4} | {a['norm_top1'] * 100:9.2f} {a['baseline_top1'] * 100:9.2f} {a['gain_pts']:+9.2f} | "
              f"{b['norm_top1'] * 100:9.2f} {b['baseline_top1'] * 100:9.2f} {b['gain_pts']:+9.2f} | {r['diff_pts']:+9.2f} | "
              f"{'yes' if r['teacher_shared'] else 'no'}")
    print(f"\nNORM - baseline, fp32: {_ci(s['gain_none'], ' pts')} (seed sd {s['gain_none']['sd'] or 0:.2f})")
    print(f"NORM - baseline, bf16: {_ci(s['gain_bf16'], ' pts')} (seed sd {s['gain_bf16']['sd'] or 0:.2f})")
    print(f"paired difference bf16 - fp32: {_ci(s['diff'], ' pts')} (95% t interval, {len(s['rows'])} seeds)")
    for key, label in (("norm_top1", "NORM"), ("baseline_top1", "baseline"), ("teacher_top1", "teacher")):
        print(f"  {label:<8} top-1  fp32 {_acc(s[f'{key}_none'])}   bf16 {_acc(s[f'{key}_bf16'])}")
    print(f"within seed noise: {s['within_seed_noise']} ({s['why']})")
    print("\nmean stage seconds " + "  ".join(
        f"{st}: fp32 {s['seconds_none'][st]:.1f} / bf16 {s['seconds_bf16'][st]:.1f}"
        + (f" ({s['seconds_none'][st] / s['seconds_bf16'][st]:.2f}x)" if s['seconds_bf16'][st] else "")
        for st in STAGES))


def _acc(d: dict) -> str:
    return f"{d['mean']:.2f}%" + (f" ± {(d['hi'] - d['lo']) / 2:.2f}" if d["lo"] is not None else "")


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    from stages.lib.precision import cpu_native_bf16

    native, what = cpu_native_bf16()
    if not native:
        print(f"note: this CPU has no native bf16 ({what}): the bf16 arm is emulated and slow here, and amp: auto "
              "would pick fp32; its accuracies still tell whether bf16 changes what NORM adds", flush=True)
    summary = collect(args)
    print_summary(summary)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
