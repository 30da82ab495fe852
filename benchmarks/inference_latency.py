"""Does folding NORM's FT into the FC layer leave inference cost unchanged? A standalone measurement.

Builds a NORM student (random weights, non-trivial BatchNorm), merges it, exports vanilla / merged /
unmerged to ONNX in a temporary folder and times them with onnxruntime on the CPU in interleaved ABBA
blocks (stages.lib.timing), together with an A/A control: a second session of the vanilla model, whose
interval is this machine's noise floor. Example:

    python benchmarks/inference_latency.py --student resnet8x4 --teacher resnet32x4 --batch-sizes 1 64
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from models.merge import merge_norm_student
from models.norm import LogitsOnly, NormStudent
from models.registry import create_model
from stages.lib import timing
from stages.lib.flops import count_flops, count_params
from stages.lib.latency import measure_cell, ort_backend, torch_backend


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", default="resnet8x4", help="registered student model")
    p.add_argument("--teacher", default="resnet32x4", help="teacher model: only its channel count C_t is used")
    p.add_argument("--n", type=int, default=8, help="NORM's N (FT expands to N x C_t channels)")
    p.add_argument("--plain-ft", action="store_true", help="FT without the residual")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--input", type=int, nargs=3, default=[3, 32, 32], metavar=("C", "H", "W"))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--block-runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (1 = least noisy)")
    p.add_argument("--band", type=float, default=0.02, help="verdict band: yes / no / inconclusive (docs/latency.md)")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="verdict clock: thread CPU time (single-threaded only) or wall clock")
    p.add_argument("--torch", action="store_true", help="also time eager PyTorch on the CPU")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def randomize_bn(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so the merge really changes the FC weights."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0.0, 0.5, generator=gen)
                m.running_var.uniform_(0.25, 1.75, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.2, generator=gen)


def build(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    torch.manual_seed(args.seed)
    c_in = args.input[0]
    c_t = create_model(args.teacher, num_classes=args.num_classes, in_chans=c_in).num_features
    ns = NormStudent(create_model(args.student, num_classes=args.num_classes, in_chans=c_in), c_t, n=args.n,
                     residual=not args.plain_ft)
    randomize_bn(ns, torch.Generator().manual_seed(args.seed + 1))
    ns.eval()
    merged = merge_norm_student(ns)
    twins = []
    for _ in range(2):  # vanilla and vanilla_b: independent instances holding the merged weights
        twins.append(create_model(args.student, num_classes=args.num_classes, in_chans=c_in))
        twins[-1].load_state_dict(merged.state_dict())
    x = torch.randn(4, *args.input)
    with torch.no_grad():
        gap = (merged(x) - ns.logits(x)).abs().max().item() / ns.logits(x).abs().max().item()
    print(f"{args.student} + FT(N={args.n}, C_t={c_t} from {args.teacher}), merged: max rel. logit diff {gap:.2e}")
    return {"vanilla": twins[0].eval(), "vanilla_b": twins[1].eval(), "merged": merged,
            "unmerged": LogitsOnly(ns).eval()}


def export(models: dict[str, torch.nn.Module], folder: Path, shape: list[int]) -> dict[str, Path]:
    """Dynamic-batch ONNX like the export stage (input "input", output "logits"); vanilla_b reuses vanilla's file."""
    paths = {}
    t0 = time.perf_counter()
    for name, m in models.items():
        if name == "vanilla_b":
            continue
        paths[name] = folder / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, (torch.zeros(2, *shape),), str(paths[name]), input_names=["input"],
                              output_names=["logits"], opset_version=18, dynamo=True, verbose=False,
                              dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}})
    print(f"exported {len(paths)} ONNX files in {time.perf_counter() - t0:.1f}s")
    return {"vanilla": paths["vanilla"], "vanilla_b": paths["vanilla"], "merged": paths["merged"],
            "unmerged": paths["unmerged"]}


def _ci(v: dict) -> str:
    return f"{v['ratio']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"


def print_cell(cell: dict, band: float, clock: str) -> None:
    """Side-by-side table (wall clock and, single-threaded, thread CPU time), then the verdict line."""
    from rich.console import Console
    from rich.table import Table

    wall = {v["candidate"]: _ci(v) for v in cell["comparisons"].values()}
    cpu = {v["candidate"]: _ci(v) for v in cell.get("cpu_comparisons", {}).values()}
    t = Table(title=f"{cell['backend']}, batch {cell['batch']}")
    for col in ("model", "median ms", "p90 ms", "p99 ms", "items/s", "/ vanilla [95% CI]", "CPU ms", "CPU / vanilla"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for name, s in cell["models"].items():
        t.add_row(name, f"{s['median_ms']:.3f}", f"{s['p90_ms']:.3f}", f"{s['p99_ms']:.3f}",
                  f"{s['throughput_per_s']:.0f}", wall.get(name, "reference"),
                  f"{s['cpu']['median_ms']:.3f}" if "cpu" in s else "-", cpu.get(name, "reference" if cpu else "-"))
    Console(width=None if sys.stdout.isatty() else 150).print(t)
    used = "cpu" if clock == "cpu" and cell.get("cpu_comparisons") else "wall"
    comps = cell["cpu_comparisons" if used == "cpu" else "comparisons"]
    mv, aa = comps["merged_vs_vanilla"], comps["aa"]
    answer, reason = timing.decide(mv, band, control=aa, name="merged/vanilla")
    print(f"[{used} clock] A/A (vanilla_b/vanilla, noise floor) {_ci(aa)}   "
          f"inference cost unchanged (+-{band:.0%}): {answer}: {reason}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    default_threads = torch.get_num_threads()
    models = build(args)
    shown = {n: m for n, m in models.items() if n != "vanilla_b"}
    print("params  " + "  ".join(f"{n}={count_params(m):,}" for n, m in shown.items()))
    print("FLOPs   " + "  ".join(f"{n}={count_flops(m, (1, *args.input)):,}" for n, m in shown.items()))
    with tempfile.TemporaryDirectory() as tmp:
        paths = export(models, Path(tmp), args.input)
        backends = [ort_backend("onnxruntime_cpu", paths, ["CPUExecutionProvider"], args.threads)]
        if args.torch:
            torch.set_num_threads(args.threads)
            backends.append(torch_backend(models, "cpu", args.threads))
        rng = np.random.default_rng(args.seed)
        t0 = time.perf_counter()
        for be in backends:
            for b in args.batch_sizes:
                x = rng.standard_normal((b, *args.input)).astype(np.float32)
                cell = measure_cell(be, x, warmup=args.warmup, blocks=args.blocks, block_runs=args.block_runs,
                                    n_boot=args.bootstrap, seed=args.seed)
                print_cell(cell, args.band, args.clock)
        torch.set_num_threads(default_threads)
    print(f"timing took {time.perf_counter() - t0:.1f}s ({args.blocks} ABBA blocks x {args.block_runs} runs, "
          f"{args.threads} thread(s))")


if __name__ == "__main__":
    main()
