"""What does comparing NORM's groups in the map's own memory order save? The NORM step, both ways, interleaved.

The default run trains in NHWC (channels_last). models.losses.norm_loss compares the expanded map's N groups
with the teacher map in the map's memory order ([b, h, w, N, C_t], dense); the formulation before it viewed
the same memory as [b, N, C_t, h, w], a 5-D strided view. Same values up to float rounding. This times one
full NORM training step (the pipeline's ``NORM.forward_train``, backward, SGD) with each, in interleaved
rounds (stages.lib.timing), and prints the step-time ratio with a paired bootstrap 95% CI. Defaults: the
default run's shapes (resnet20 -> resnet8, N = 8, batch 128, 1x28x28). Example:

    python benchmarks/norm_loss_layout.py
    python benchmarks/norm_loss_layout.py --teacher resnet32x4 --student resnet8x4 --in-chans 3 --size 32 --batch 64
"""
from __future__ import annotations

import argparse
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as functional
from _clock import add_clock_args, configure_clock

import models.losses as losses
from models.distillers import NORM
from models.registry import create_model
from stages.lib import timing


def strided_norm_loss(expanded: torch.Tensor, teacher_features: torch.Tensor, n: int) -> torch.Tensor:
    """The earlier formulation: the groups as a [b, N, C_t, h, w] view, whatever the memory order."""
    b, c, h, w = expanded.shape
    teacher = losses.align_teacher_features(teacher_features, (h, w)).detach().to(expanded.dtype)
    ct = teacher.shape[1]
    return n * functional.mse_loss(expanded.view(b, n, ct, h, w), teacher.unsqueeze(1).expand(b, n, ct, h, w))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--blocks", type=int, default=10, help="interleaved rounds")
    p.add_argument("--block-runs", type=int, default=4, help="timed steps per variant in one round")
    p.add_argument("--warmup", type=int, default=3)
    add_clock_args(p)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def step(args: argparse.Namespace, loss_fn: Callable) -> Callable[[], None]:
    """One NORM training step in NHWC with ``loss_fn`` as the NORM loss."""
    torch.manual_seed(args.seed)
    make = lambda name: create_model(name, num_classes=10, in_chans=args.in_chans)  # noqa: E731
    d = NORM(make(args.student), make(args.teacher), epochs=1, n=args.n).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(d.learnable_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, args.in_chans, args.size, args.size, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    def run() -> None:
        saved = losses.norm_loss
        losses.norm_loss = loss_fn  # distill_losses looks norm_loss up in models.losses at call time
        try:
            _, terms = d.forward_train(x, y, 0)
        finally:
            losses.norm_loss = saved
        loss = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return run


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    timer = configure_clock(args.clock, args.threads)
    steps = {"memory order": step(args, losses.norm_loss), "strided view": step(args, strided_norm_loss)}
    res = timing.run_interleaved_blocks({k: timing.timed_block(f, timer) for k, f in steps.items()},
                                        warmup=args.warmup, blocks=args.blocks, block_runs=args.block_runs)
    med = {k: float(np.median(res.samples[k])) for k in steps}
    r, lo, hi = timing.ratio_ci(res.block_means["memory order"], res.block_means["strided view"], seed=args.seed)
    print(f"NORM step {args.teacher} -> {args.student}, N={args.n}, batch {args.batch}, "
          f"{args.in_chans}x{args.size}x{args.size}, NHWC, threads {torch.get_num_threads()}, {args.clock} clock")
    for k, v in med.items():
        print(f"  {k:<13} {v:8.1f} ms/step")
    print(f"strided view / memory order: {r:.3f}  95% CI [{lo:.3f}, {hi:.3f}]")
    return {"median_ms": med, "ratio": r, "ci95": [lo, hi]}


if __name__ == "__main__":
    main()
