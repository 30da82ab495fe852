"""What does NORM cost per training step, next to plain CE and vanilla KD? A standalone measurement.

One full step = forward, loss, backward, SGD step, on one fixed random batch (data loading excluded); the
forward and loss are the pipeline's own ``forward_train`` of models.distillers (what fit() runs):
  ce   : CE    student forward + cross-entropy
  kd   : KD    teacher forward (no_grad) + student forward + 0.1*CE + 0.9*KD
  norm : NORM  teacher forward_features (no_grad) + student + FT forward + CE + NORM
The three methods are warmed up, then timed in interleaved rounds of short blocks (stages.lib.timing's
counterbalanced schedule) so that the machine's drifts hit all of them alike. Reports the median img/s
of each and the NORM/KD step-time ratio with a paired bootstrap 95% CI. Example:

    python benchmarks/train_step.py --teacher resnet32x4 --student resnet8x4 --batch 64
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from _clock import add_clock_args, configure_clock

from models.distillers import CE, KD, NORM, Distiller
from models.registry import create_model
from stages.lib import timing

METHODS = ("ce", "kd", "norm")
GOAL = 1.15  # NORM step / KD step: the FT adds 1.125x the FLOPs (resnet32x4 -> resnet8x4), plus its memory traffic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32, help="input height = width")
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--n", type=int, default=8, help="NORM's N")
    p.add_argument("--plain-ft", action="store_true", help="FT without the residual")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method before the rounds")
    p.add_argument("--blocks", type=int, default=12, help="interleaved rounds")
    p.add_argument("--block-runs", type=int, default=2, help="timed steps per method in one round")
    add_clock_args(p)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


@dataclass
class Bench:
    """Everything the step functions close over: one distiller (in training mode) and optimiser per method."""

    distillers: dict[str, Distiller]
    optims: dict[str, torch.optim.Optimizer]
    x: torch.Tensor
    y: torch.Tensor


def build(args: argparse.Namespace) -> Bench:
    torch.manual_seed(args.seed)
    make = lambda name: create_model(name, num_classes=args.num_classes, in_chans=args.in_chans)  # noqa: E731
    teacher = make(args.teacher)
    distillers: dict[str, Distiller] = {
        "ce": CE(make(args.student)), "kd": KD(make(args.student), teacher, kd_weight=0.9),
        "norm": NORM(make(args.student), teacher, epochs=1, n=args.n, residual=not args.plain_ft)}
    optims = {k: torch.optim.SGD(d.learnable_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
              for k, d in distillers.items()}
    for d in distillers.values():
        d.train()
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, args.in_chans, args.size, args.size, generator=g)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g)
    return Bench(distillers, optims, x, y)


def make_steps(b: Bench) -> dict[str, Callable[[], None]]:
    """One full training step per method: the distiller's forward_train, then what fit() does with the terms."""

    def step_of(method: str) -> Callable[[], None]:
        distiller, opt = b.distillers[method], b.optims[method]

        def step() -> None:
            _, terms = distiller.forward_train(b.x, b.y, 0)
            loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    return {m: step_of(m) for m in METHODS}


def summarize(res: timing.Interleaved, batch: int, n_boot: int, seed: int) -> dict:
    out: dict = {}
    for m in METHODS:
        med_ms = float(np.median(res.samples[m]))
        out[m] = {"median_step_ms": med_ms, "img_per_s": batch * 1e3 / med_ms, "steps": len(res.samples[m])}
    for cand, ref in (("norm", "kd"), ("norm", "ce"), ("kd", "ce")):
        r, lo, hi = timing.ratio_ci(res.block_means[ref], res.block_means[cand], n_boot=n_boot, seed=seed)
        out[f"{cand}/{ref}"] = {"ratio": r, "ci95": [lo, hi]}
    return out


def report(out: dict, args: argparse.Namespace) -> None:
    print(f"teacher {args.teacher} -> student {args.student}, batch {args.batch}, "
          f"{args.in_chans}x{args.size}x{args.size}, {args.num_classes} classes, N={args.n}, "
          f"threads {torch.get_num_threads()}, {args.clock} clock")
    print(f"{'method':<8}{'ms/step':>10}{'img/s':>10}{'steps':>7}")
    for m in METHODS:
        r = out[m]
        print(f"{m:<8}{r['median_step_ms']:>10.1f}{r['img_per_s']:>10.1f}{r['steps']:>7}")
    for key in ("norm/kd", "norm/ce", "kd/ce"):
        r = out[key]
        print(f"step time {key:<8} {r['ratio']:.3f}  95% CI [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]")
    lo, hi = out["norm/kd"]["ci95"]
    verdict = "met" if hi <= GOAL else ("not met" if lo > GOAL else f"undecided (CI straddles {GOAL})")
    print(f"goal NORM step <= {GOAL} x KD step: {verdict}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    timer = configure_clock(args.clock, args.threads)
    b = build(args)
    steps = make_steps(b)
    res = timing.run_interleaved_blocks({m: timing.timed_block(steps[m], timer) for m in METHODS}, warmup=args.warmup,
                                        blocks=args.blocks, block_runs=args.block_runs)
    out = summarize(res, args.batch, args.bootstrap, args.seed)
    report(out, args)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **out}, indent=2))
    return out


if __name__ == "__main__":
    main()
