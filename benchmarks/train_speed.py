"""How fast does the pipeline's NORM training step run, next to a plain reference step? A standalone measurement.

For each teacher:student pair, on one fixed random batch, in one process, timed side by side in
counterbalanced interleaved rounds (stages.lib.timing):
  ref      the plain reference step, written out here as the authors' training loop does it: teacher
           forward_features under no_grad, student + FT forward, CE + NORM (+ KD with --beta) computed inline,
           backward, SGD step; fp32, eager, NCHW. Every ratio is against this step.
  fp32     the pipeline's step: models.distillers.NORM.forward_train (what fit() runs), fp32, NCHW
  cl       the same with channels_last (teacher, student and batch in NHWC)
  bf16     the same under bf16 autocast, NCHW (skipped where the device has no bf16 support)
  bf16_cl  bf16 autocast + channels_last
  opt      train.amp=auto's precision + channels_last (+ torch.compile of forward_train with --compile)
  opt_tbf16  opt, with the frozen teacher's weights stored in bf16 (its BatchNorm statistics rounded too)
  compile, bf16_compile  fp32 / bf16 autocast (NCHW) with torch.compile of forward_train
Every variant starts from the same weights. Prints img/s per variant and each one's speed-up over the
reference (time(ref) / time(variant)) with a paired bootstrap 95% CI; fp32 at ~1.00x means the
pipeline's step costs what the plain loop costs. Example:

    python benchmarks/train_speed.py --pairs resnet32x4:resnet8x4 --variants fp32 cl bf16 --batch 64
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
import torch.nn.functional as functional
from _clock import add_clock_args, configure_clock

from models.distillers import NORM
from models.registry import create_model
from stages.lib import timing
from stages.lib.training import autocast, autocast_dtype

ALL_VARIANTS = ("fp32", "cl", "bf16", "bf16_cl", "opt", "opt_tbf16", "compile", "bf16_compile")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", nargs="+", default=["resnet32x4:resnet8x4"], metavar="TEACHER:STUDENT")
    p.add_argument("--variants", nargs="+", default=["fp32", "cl", "bf16"], choices=ALL_VARIANTS,
                   help="besides the reference step (always run)")
    p.add_argument("--compile", action="store_true", help="opt variants: torch.compile the forward + loss")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.0, help="weight of KD next to CE + NORM (NORM+KD when > 0)")
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
    """The requested variants this device supports (bf16 ones need bf16 autocast support); fp32 always."""
    from stages.lib.precision import bf16_supported

    amp = autocast_dtype("auto", device)  # what train.amp=auto picks here (fp32 where bf16 is no faster)
    bf16 = torch.bfloat16 if bf16_supported(device) else None
    table = {
        "fp32": Variant("fp32", None, False),
        "cl": Variant("cl", None, True),
        "bf16": Variant("bf16", bf16, False) if bf16 else None,
        "bf16_cl": Variant("bf16_cl", bf16, True) if bf16 else None,
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


def make_step(v: Variant, distiller: NORM, x: torch.Tensor, y: torch.Tensor, device: str) -> Callable[[], None]:
    """One training step of the pipeline's own NORM distiller (its own copy), as fit() runs it."""
    d = copy.deepcopy(distiller).train()  # the frozen teacher is copied with it
    if v.teacher_bf16:
        d.teacher.to(torch.bfloat16)
    if v.channels_last:
        d.to(memory_format=torch.channels_last)  # the teacher follows the student's layout, as in fit()
    opt = torch.optim.SGD(d.learnable_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    forward_train = torch.compile(d.forward_train) if v.compile else d.forward_train
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step() -> None:
        xb = x.contiguous(memory_format=torch.channels_last) if v.channels_last else x
        with autocast(device, v.amp):
            _, terms = forward_train(xb, y, 0)
        loss = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    return step


def reference_loss(teacher, ns, x: torch.Tensor, y: torch.Tensor, *, n: int, beta: float,
                   temperature: float = 4.0) -> torch.Tensor:
    """The plain step's forward and loss, inline (no models.losses, no distiller): CE + NORM (+ beta * KD)."""
    with torch.no_grad():
        feat_t = teacher.forward_features(x)
        logit_t = teacher.forward_head(feat_t) if beta > 0 else None
    logits, expanded = ns(x)
    if feat_t.shape[-2:] != expanded.shape[-2:]:
        feat_t = functional.adaptive_max_pool2d(feat_t, expanded.shape[-2:])
    loss = functional.cross_entropy(logits, y) + n * functional.mse_loss(expanded, feat_t.repeat(1, n, 1, 1))
    if beta > 0:
        kd = functional.kl_div(functional.log_softmax(logits / temperature, dim=1), functional.softmax(logit_t / temperature, dim=1),
                      reduction="batchmean") * temperature**2
        loss = loss + beta * kd
    return loss


def make_reference_step(distiller: NORM, x: torch.Tensor, y: torch.Tensor, n: int, beta: float,
                        device: str) -> Callable[[], None]:
    """The reference: the same models and weights, fp32 eager NCHW, the losses written out inline."""
    teacher = copy.deepcopy(distiller.teacher).eval()
    ns = copy.deepcopy(distiller.trainable).train()
    opt = torch.optim.SGD(ns.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step() -> None:
        loss = reference_loss(teacher, ns, x, y, n=n, beta=beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    return step


def check_same_loss(distiller: NORM, x: torch.Tensor, y: torch.Tensor, n: int, beta: float) -> float:
    """Relative difference of the reference's loss and forward_train's on the first batch (copies: no step)."""
    d = copy.deepcopy(distiller).train()
    ns = copy.deepcopy(distiller.trainable).train()
    with torch.no_grad():
        ours = sum(d.forward_train(x, y, 0)[1].values()).item()
        ref = reference_loss(distiller.teacher, ns, x, y, n=n, beta=beta).item()
    return abs(ours - ref) / max(abs(ref), 1e-12)


def bench_pair(pair: str, variants: list[Variant], args: argparse.Namespace, device: str,
               timer: Callable[[], float]) -> dict:
    t_name, s_name = pair.split(":")
    torch.manual_seed(args.seed)
    make = lambda name: create_model(name, num_classes=args.num_classes, in_chans=args.in_chans)  # noqa: E731
    teacher = make(t_name)
    distiller = NORM(make(s_name), teacher, epochs=1, n=args.n, beta=args.beta).to(device)
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, args.in_chans, args.size, args.size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g).to(device)
    rel = check_same_loss(distiller, x, y, args.n, args.beta)
    if rel > 1e-5:
        raise SystemExit(f"{pair}: the reference loss differs from forward_train's by {rel:.2e} (relative): "
                         "they no longer compute the same step")
    steps = {"ref": timing.timed_block(make_reference_step(distiller, x, y, args.n, args.beta, device), timer)}
    steps.update({v.name: timing.timed_block(make_step(v, distiller, x, y, device), timer) for v in variants})
    res = timing.run_interleaved_blocks(steps, warmup=args.warmup, blocks=args.blocks, block_runs=args.block_runs)
    out: dict = {}
    for name in steps:
        v = next((v for v in variants if v.name == name), Variant("ref", None, False))
        med = float(np.median(res.samples[name]))
        r, lo, hi = timing.ratio_ci(res.block_means[name], res.block_means["ref"], n_boot=args.bootstrap,
                                    seed=args.seed)  # time(ref) / time(variant) = speed-up over the reference
        out[name] = {"img_per_s": args.batch * 1e3 / med, "median_step_ms": med, "speedup_vs_ref": r,
                     "speedup_ci95": [lo, hi], "amp": str(v.amp), "channels_last": v.channels_last,
                     "compile": v.compile, "teacher_bf16": v.teacher_bf16}
    out["ref"]["loss_rel_diff"] = rel
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
    print(f"NORM training step, batch {args.batch}, {args.in_chans}x{args.size}x{args.size}, N={args.n}, "
          f"beta={args.beta}, on {where}; speed-up = time(ref) / time(variant)")
    results = {}
    for pair in args.pairs:
        results[pair] = r = bench_pair(pair, variants, args, device, timer)
        print(f"\n{pair}")
        print(f"{'variant':<11}{'ms/step':>9}{'img/s':>9}{'vs ref':>10}   95% CI")
        for name, row in r.items():
            lo, hi = row["speedup_ci95"]
            print(f"{name:<11}{row['median_step_ms']:>9.1f}{row['img_per_s']:>9.1f}{row['speedup_vs_ref']:>9.2f}x"
                  f"   [{lo:.2f}, {hi:.2f}]")
    if args.json:
        args.json.write_text(json.dumps({"device": where, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
