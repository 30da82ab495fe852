"""Where does the default run's time go? The pipeline in one process under cProfile, costs by category.

Runs ``norm-pipeline run`` in-process (a reduced config by default: the default run's recipe on a tenth of
its images, same epochs, same train/validation ratio) and prints, per stage, its seconds and the share of
the run spent in each cost: the training step (forward, backward, optimiser), per-epoch evaluation,
augmentation, batch assembly, dataset reading, checkpoints, the progress display, ONNX export, onnxruntime
parity, timing loops. Shares are meaningful on a busy machine; absolute seconds are not. Example:

    python benchmarks/profile_run.py                     # reduced default config, prints the table
    python benchmarks/profile_run.py --full --top 40     # the real default run (minutes), 40 hottest functions
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
REDUCED = ["data.train_limit=2000", "data.val_limit=1000"]
# category -> (file suffix, function name) whose cumulative time is that cost; nested categories are reported as is
CATEGORIES = {
    "training stages (fit)": ("stages/lib/training.py", "fit"),
    "  train step: forward + loss": ("models/distillers.py", "forward_train"),
    "  train step: backward": ("torch/_tensor.py", "backward"),
    "  train step: optimiser": ("torch/optim/optimizer.py", "wrapper"),
    "  evaluation after each epoch": ("stages/lib/training.py", "evaluate"),
    "  batches: augmentation": ("stages/lib/datasets.py", "random_crop_flip"),
    "  batches: normalisation": ("stages/lib/datasets.py", "normalize"),
    "  checkpoints": ("stages/lib/fit_io.py", "save"),
    "  progress display": ("rich/progress.py", "update"),
    "dataset reading (IDX files)": ("stages/lib/datasets.py", "load_raw"),
    "verify: logit comparisons": ("stages/verify.py", "compare_logits"),
    "export: torch.onnx.export + checker": ("stages/lib/onnx_utils.py", "export_onnx"),
    "export: onnxruntime parity": ("stages/export.py", "parity"),
    "benchmark: timing cells": ("stages/benchmark.py", "time_cells"),
    "bundle": ("stages/bundle.py", "run"),
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-c", "--config", default=str(ROOT / "pipeline.yaml"))
    p.add_argument("--full", action="store_true", help="the config as is (default: a tenth of the images)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--run-dir", type=Path, default=None, help="default: a temporary folder (always a fresh run)")
    p.add_argument("--to", default=None, help="last stage")
    p.add_argument("--top", type=int, default=0, help="also print the N functions with the most cumulative time")
    p.add_argument("--save", type=Path, default=None, help="write the raw cProfile stats here (snakeviz, pstats)")
    return p.parse_args(argv)


def cumulative(stats: pstats.Stats) -> dict[tuple[str, str], float]:
    """(file, function) -> cumulative seconds (summed over same-named functions of one file)."""
    out: dict[tuple[str, str], float] = {}
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        key = (file.replace("\\", "/"), func)
        out[key] = out.get(key, 0.0) + ct
    return out


def categorize(cum: dict[tuple[str, str], float]) -> dict[str, float]:
    """Seconds per category of CATEGORIES (the train step = the distillers' ``forward_train``)."""
    return {label: sum(t for (f, fn), t in cum.items() if f.endswith(suffix) and fn == func)
            for label, (suffix, func) in CATEGORIES.items()}


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    from pipeline.config import load_config
    from pipeline.session import run_pipeline

    overrides = ([] if args.full else REDUCED) + args.overrides
    cfg = load_config(args.config, overrides)
    tmp = tempfile.TemporaryDirectory(prefix="norm-profile-") if args.run_dir is None else None
    rd = Path(tmp.name) if tmp else args.run_dir
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    try:
        prof.enable()
        results = run_pipeline(cfg, rd, to_stage=args.to, force=True, overrides=tuple(overrides))
        prof.disable()
    finally:
        if tmp:
            tmp.cleanup()
    wall = time.perf_counter() - t0
    if args.save:
        prof.dump_stats(str(args.save))
    stats = pstats.Stats(prof)
    cats = categorize(cumulative(stats))
    stage_s = {r.name: r.seconds for r in results}
    print(f"\nprofile of {'the default run' if args.full else 'the reduced default run (' + ', '.join(REDUCED) + ')'}: "
          f"{wall:.1f} s wall under cProfile")
    print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in stage_s.items()))
    print(f"\n{'cost':<40} {'seconds':>8} {'share':>7}")
    for label, sec in cats.items():
        print(f"{label:<40} {sec:8.1f} {sec / wall:7.1%}")
    if args.top:
        print()
        stats.sort_stats("cumulative").print_stats(args.top)
    return {"wall_s": wall, "stages": stage_s, "categories": cats}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
