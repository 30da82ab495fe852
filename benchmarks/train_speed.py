"""How fast does a NORM training step run, plain fp32 eager vs optimised? A standalone measurement.

For each teacher:student pair, one full NORM step (teacher forward_features under no_grad, NormStudent
forward, CE + NORM loss via models.losses.distill_losses, backward, SGD step) on one fixed random batch,
in several variants timed side by side in interleaved rounds (stages.lib.timing), in one process:
  fp32     plain fp32, eager, NCHW (the reference)
  cl       channels_last only
  bf16     autocast bf16 only (skipped where the device has no bf16 support)
  opt      the optimised setting: autocast as train.amp=auto picks it (bf16 on CPUs with native bf16) +
           channels_last (+ torch.compile of forward and loss with --compile)
  opt_tbf16  opt, with the frozen teacher's weights stored in bf16 (autocast re-casts weights that need
           no gradient on every call; a bf16 teacher skips that; its BatchNorm statistics get rounded to bf16 too)
  compile, bf16_compile  fp32 / bf16 autocast (NCHW) with torch.compile (default inductor backend)
Prints img/s per variant and each one's speed-up over fp32 with a paired bootstrap 95% CI. Example:

    python benchmarks/train_speed.py --pairs resnet32x4:resnet8x4 wrn_40_2:wrn_16_2 --batch 64
"""
from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from _clock import add_clock_args, configure_clock
import torch.nn as nn

from models.losses import distill_losses
from models.norm import NormStudent
from models.registry import create_model
from stages.lib import timing
from stages.lib.training import autocast, autocast_dtype

ALL_VARIANTS = ("fp32", "cl", "bf16", "opt", "opt_tbf16", "compile", "bf16_compile")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", nargs="+", default=["resnet32x4:resnet8x4"], metavar="TEACHER:STUDENT")
    p.add_argument("--variants", nargs="+", default=["fp32", "opt"], choices=ALL_VARIANTS)
    p.add_argument("--compile", action="store_true", help="opt variants: torch.compile the forward + loss")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--block-runs", type=int, default=2)
    add_clock_args(p)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


@dataclass(frozen=True)
class Variant:
    name: str
    amp: Optional[torch.dtype]
    channels_last: bool
    compile: bool = False
    teacher_bf16: bool = False


def make_variants(names: list[str], device: str, compile_: bool) -> list[Variant]:
    """The requested variants this device supports (bf16 ones need bf16 autocast support)."""
    from stages.lib.precision import bf16_supported

    amp = autocast_dtype("auto", device)  # what train.amp=auto picks here (fp32 where bf16 is no faster)
    bf16 = torch.bfloat16 if bf16_supported(device) else None
    table = {
        "fp32": Variant("fp32", None, False),
        "cl": Variant("cl", None, True),
        "bf16": Variant("bf16", bf16, False) if bf16 else None,
        "opt": Variant("opt", amp, True, compile_),
        "opt_tbf16": Variant("opt_tbf16", bf16, True, compile_, True) if bf16 else None,
        "compile": Variant("compile", None, False, True),
        "bf16_compile": Variant("bf16_compile", bf16, False, True) if bf16 else None,
    }
    out = [table[n] for n in dict.fromkeys(["fp32", *names]) if table[n] is not None]
    for n in names:
        if table[n] is None:
            print(f"note: variant {n} skipped: no bf16 autocast on {device}")
    return out


def make_step(v: Variant, teacher: nn.Module, student: NormStudent, x: torch.Tensor, y: torch.Tensor,
              n: int, device: str) -> Callable[[], None]:
    """One training step with its own copies of teacher and student, as stages/distill.py runs it."""
    teacher, student = copy.deepcopy(teacher), copy.deepcopy(student)
    if v.teacher_bf16:
        teacher.to(torch.bfloat16)
    if v.channels_last:
        teacher.to(memory_format=torch.channels_last)
        student.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def forward_loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_feats = teacher.forward_features(xb.to(torch.bfloat16) if v.teacher_bf16 else xb)
        logits, expanded = student(xb)
        return distill_losses(logits, yb, expanded=expanded, teacher_features=t_feats, n=n, alpha=1.0)[0]

    fwd = torch.compile(forward_loss) if v.compile else forward_loss
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step() -> None:
        xb = x.contiguous(memory_format=torch.channels_last) if v.channels_last else x
        with autocast(device, v.amp):
            loss = fwd(xb, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    return step


def bench_pair(pair: str, variants: list[Variant], args: argparse.Namespace, device: str,
               timer: Callable[[], float]) -> dict:
    t_name, s_name = pair.split(":")
    torch.manual_seed(args.seed)
    make = lambda name: create_model(name, num_classes=args.num_classes, in_chans=args.in_chans)  # noqa: E731
    teacher = make(t_name).to(device).eval().requires_grad_(False)
    student = NormStudent(make(s_name), teacher.num_features, n=args.n).to(device).train()
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, args.in_chans, args.size, args.size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g).to(device)
    steps = {v.name: timing.timed_block(make_step(v, teacher, student, x, y, args.n, device), timer) for v in variants}
    res = timing.run_interleaved_blocks(steps, warmup=args.warmup, blocks=args.blocks, block_runs=args.block_runs)
    out: dict = {}
    for v in variants:
        med = float(np.median(res.samples[v.name]))
        r, lo, hi = timing.ratio_ci(res.block_means[v.name], res.block_means["fp32"], n_boot=args.bootstrap,
                                    seed=args.seed)  # time(fp32) / time(variant) = speed-up
        out[v.name] = {"img_per_s": args.batch * 1e3 / med, "median_step_ms": med, "speedup": r,
                       "speedup_ci95": [lo, hi], "amp": str(v.amp), "channels_last": v.channels_last,
                       "compile": v.compile, "teacher_bf16": v.teacher_bf16}
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    timer = configure_clock(args.clock, args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.clock == "cpu" and device != "cpu":
        raise SystemExit("--clock cpu is for CPU runs; GPU steps are timed by the wall clock")
    variants = make_variants(args.variants, device, args.compile)
    where = (torch.cuda.get_device_name() if device.startswith("cuda")
             else f"cpu, {torch.get_num_threads()} threads, {args.clock} clock")
    print(f"NORM training step, batch {args.batch}, {args.in_chans}x{args.size}x{args.size}, N={args.n}, on {where}")
    results = {}
    for pair in args.pairs:
        results[pair] = r = bench_pair(pair, variants, args, device, timer)
        print(f"\n{pair}")
        print(f"{'variant':<11}{'ms/step':>9}{'img/s':>9}{'speed-up':>10}   95% CI")
        for name, row in r.items():
            lo, hi = row["speedup_ci95"]
            print(f"{name:<11}{row['median_step_ms']:>9.1f}{row['img_per_s']:>9.1f}{row['speedup']:>9.2f}x"
                  f"   [{lo:.2f}, {hi:.2f}]")
    if args.json:
        args.json.write_text(json.dumps({"device": where, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
