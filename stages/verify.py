"""Stage `verify`: prove the merged student computes what the NORM student computes, at the vanilla cost.

Three comparisons against the unmerged NORM student (logits only):

- float32, the whole validation set: the stored merged model as it will be deployed (``verify.fp32_rel_tol``);
- float64, the merge algebra: the NORM student converted to float64 and merged again in float64; the
  difference is rounding only (``verify.fp64_rel_tol``);
- float64, the stored merged model: its weights were rounded to float32 when saved, so this difference is at
  float32 level and is held to ``verify.fp32_rel_tol``.

Relative differences are ``max |merged - unmerged| / max |unmerged logit|``. Then structure: parameters,
FLOPs and state_dict keys/shapes of the merged model must equal a freshly built vanilla student's.
``verify.json`` is written even when a check fails; the failure is then a ``PipelineError``.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn

from models.merge import merge_norm_student
from models.norm import LogitsOnly
from models.registry import create_model
from stages.lib.checkpoints import load_model, load_norm_student
from stages.lib.context import StageContext
from stages.lib.dataset_meta import DatasetMeta
from stages.lib.datasets import val_batches
from stages.lib.errors import PipelineError
from stages.lib.flops import count_flops, count_params
from stages.lib.progress import progress_bar
from stages.lib.verify_checks import failures, state_signature


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Disable TF32 on CUDA for the duration: TF32 convs/matmuls would dwarf the merge's own error."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def compare_logits(model: nn.Module, reference: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   *, label: str, total: Optional[int] = None, keep: int = 0) -> tuple[dict, list]:
    """Max abs/rel difference, top-1 agreement and both accuracies over ``batches``.

    Also returns the first ``keep`` (x, y) pairs on the CPU, for a second pass in another precision.
    """
    max_abs, max_ref, agree, hit_m, hit_r, n = 0.0, 0.0, 0, 0, 0, 0
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    with progress_bar() as progress:
        task = progress.add_task(label, total=total)
        for x, y in batches:
            a, b = model(x), reference(x)
            max_abs = max(max_abs, (a - b).abs().max().item())
            max_ref = max(max_ref, b.abs().max().item())
            pa, pb = a.argmax(1), b.argmax(1)
            agree += int((pa == pb).sum())
            hit_m += int((pa == y).sum())
            hit_r += int((pb == y).sum())
            n += len(y)
            have = sum(len(k[1]) for k in kept)
            if have < keep:
                kept.append((x[: keep - have].cpu(), y[: keep - have].cpu()))
            progress.advance(task)
    if n == 0:
        raise PipelineError("the validation set is empty: nothing to verify (check data.val_limit)")
    figures = {"samples": n, "max_abs_diff": max_abs, "max_abs_logit": max_ref,
               "max_rel_diff": max_abs / max(max_ref, torch.finfo(torch.float64).tiny),
               "top1_agreement": agree / n, "merged_top1": hit_m / n, "unmerged_top1": hit_r / n}
    return figures, kept


def _chunks(kept: list, dtype: torch.dtype, device: str, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = torch.cat([k[0] for k in kept]).to(device=device, dtype=dtype)
    y = torch.cat([k[1] for k in kept]).to(device)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def structure(merged: nn.Module, unmerged: nn.Module, fresh: nn.Module, input_shape: list[int]) -> dict:
    """Parameters, FLOPs (batch 1) and state_dict signatures of merged vs a fresh vanilla student."""
    shape = [1, *input_shape]
    out = {"params": count_params(merged), "vanilla_params": count_params(fresh),
           "unmerged_params": count_params(unmerged), "flops": count_flops(merged, shape),
           "vanilla_flops": count_flops(fresh, shape), "unmerged_flops": count_flops(unmerged, shape),
           "flops_input_shape": shape, "state_dict_equal": state_signature(merged) == state_signature(fresh)}
    out["params_equal"] = out["params"] == out["vanilla_params"]
    out["flops_equal"] = out["flops"] == out["vanilla_flops"]
    return out


def run(ctx: StageContext) -> dict:
    c = ctx.cfg.verify
    meta = DatasetMeta.load(ctx.artifact("data", "dataset")).to_dict()
    ns, ns_meta = load_norm_student(ctx.artifact("distill", "norm_student"))
    merged, m_meta = load_model(ctx.artifact("merge", "model"), "merged model")
    if (ns_meta["model"], ns_meta["num_classes"]) != (m_meta["model"], m_meta["num_classes"]):
        raise PipelineError(f"merge/model.pt holds {m_meta['model']} ({m_meta['num_classes']} classes) but "
                            f"distill/norm_student.pt holds {ns_meta['model']} ({ns_meta['num_classes']} classes); "
                            "re-run the merge stage")
    device = ctx.device
    ns, merged = ns.eval().to(device), merged.eval().to(device)
    unmerged = LogitsOnly(ns).eval()
    val = val_batches(meta, batch_size=ctx.cfg.data.eval_batch_size, device=device)
    report: dict = {"student": m_meta["model"], "device": device, "tolerances": c.model_dump()}
    with exact_float32():
        report["fp32"], kept = compare_logits(merged, unmerged, val, label="verify fp32", total=len(val),
                                              keep=c.fp64_samples)
        dev64 = "cpu" if device.startswith("mps") else device  # MPS has no float64
        batches = _chunks(kept, torch.float64, dev64, ctx.cfg.data.eval_batch_size)
        u64 = LogitsOnly(copy.deepcopy(ns).to(dev64).double()).eval()
        remerged64 = merge_norm_student(copy.deepcopy(ns).to(dev64).double().eval())
        report["fp64"], _ = compare_logits(remerged64, u64, batches, label="verify fp64 (merge algebra)",
                                           total=len(batches))
        stored64 = copy.deepcopy(merged).to(dev64).double().eval()
        report["fp64_stored"], _ = compare_logits(stored64, u64, batches, label="verify fp64 (stored model)",
                                                  total=len(batches))
    fresh = create_model(m_meta["model"], num_classes=m_meta["num_classes"], in_chans=m_meta["in_chans"]).eval()
    report["structure"] = structure(merged.cpu(), LogitsOnly(ns.cpu()), fresh, [meta["in_chans"], *meta["input_size"]])
    fails = failures(report, fp32_rel_tol=c.fp32_rel_tol, fp64_rel_tol=c.fp64_rel_tol,
                     min_top1_agreement=c.min_top1_agreement)
    report.update(passed=not fails, failures=fails)
    ctx.write_json("verify.json", report)
    if fails:
        raise PipelineError("verify failed: " + "; ".join(fails) + " (details in verify.json; re-run the merge "
                            "stage with --force, or loosen the verify.* tolerance if it is unreasonably strict)")
    f32, f64, s = report["fp32"], report["fp64"], report["structure"]
    ctx.log(f"merged == unmerged: fp32 max rel diff {f32['max_rel_diff']:.2e} over {f32['samples']} images, "
            f"fp64 {f64['max_rel_diff']:.2e}, top-1 agreement {f32['top1_agreement']:.4%}; "
            f"{s['params']:,} params, {s['flops']:,} FLOPs (= vanilla)")
    return {"fp32_max_abs_diff": f32["max_abs_diff"], "fp32_max_rel_diff": f32["max_rel_diff"],
            "fp64_max_rel_diff": f64["max_rel_diff"], "fp64_stored_max_rel_diff": report["fp64_stored"]["max_rel_diff"],
            "top1_agreement": f32["top1_agreement"], "merged_top1": f32["merged_top1"],
            "unmerged_top1": f32["unmerged_top1"], "params_equal": s["params_equal"], "flops_equal": s["flops_equal"],
            "params": s["params"], "flops": s["flops"]}
