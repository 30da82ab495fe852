"""The bundle stage's edge hand-off parts: golden self-test spec, precision rows and gates.

Kept apart from ``stages/bundle.py`` (files, manifest), which calls these; verifying a bundle (its self-test included)
is ``stages/lib/bundle_check.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

from stages.lib.context import StageContext
from stages.lib.errors import PipelineError


def engine_gate(ctx: StageContext, precision: str | None) -> str | None:
    """Why an engine is not shipped: its top-1 is more than quantize.max_drop points below onnxruntime fp32."""
    m = ctx.input_metrics("engine")
    top1, ref = m.get(f"{precision}_top1"), m.get("ort_top1")
    if precision == "fp32" or top1 is None or ref is None:
        return None
    drop = (ref - top1) * 100
    return (f"{precision} engine top-1 {top1:.2%} is {drop:.2f} points below fp32 (quantize.max_drop = "
            f"{ctx.cfg.quantize.max_drop}); not shipped") if drop > ctx.cfg.quantize.max_drop else None


def precisions_table(rows: list[dict]) -> str:
    """Markdown: every precision, its file (or why it is not shipped), accuracy, agreement, CPU speed-up."""
    out = ["| precision | file | top-1 | vs fp32 (points) | top-1 agreement with fp32 | CPU speed-up vs fp32 [95% CI] |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        sp = r.get("speedup_vs_fp32") or {}
        speed = (f"{sp['speedup']:.2f}x [{sp['speedup_ci95'][0]:.2f}, {sp['speedup_ci95'][1]:.2f}] ({sp['verdict']})"
                 if sp.get("speedup_ci95") else ("1.00x" if r["precision"] == "fp32" else "not measured"))
        top1 = f"{r['top1']:.2%}" if r.get("top1") is not None else "—"
        drop = f"{0.0 - r['drop_pts']:+.2f}" if r.get("drop_pts") is not None else "—"
        agree = f"{r['top1_agreement_vs_fp32']:.2%}" if r.get("top1_agreement_vs_fp32") is not None else "—"
        out.append(f"| {r['precision']} | {'`' + r['file'] + '`' if r.get('file') else 'not shipped: ' + r.get('reason', '')} "
                   f"| {top1} | {drop} | {agree} | {speed} |")
    return "\n".join(out)


def quantize_report(ctx: StageContext) -> dict | None:
    """quantize.json when the quantize stage ran (its gates decide what ships)."""
    if "quantize" not in ctx.inputs:
        return None
    path = ctx.artifact("quantize", "quantize")
    return json.loads(path.read_text()) if path.is_file() else None


def precision_rows(quant: dict | None, fp16: dict | None) -> list[dict]:
    """Every precision with its accuracy, agreement and CPU speed-up; ``file`` only where it ships."""
    if quant is None:
        rows = [{"precision": "fp32", "file": "model.onnx", "shipped": True, "note": "quantize stage not run"}]
        if fp16:
            rows.append({"precision": "fp16", "file": fp16["file"], "shipped": True, "samples": fp16["samples"],
                         "top1_agreement_vs_fp32": fp16["top1_agreement_vs_fp32"],
                         "note": "not gated on accuracy: the quantize stage did not run"})
        return rows
    rows = []
    for p in ("fp32", "fp16", "int8"):
        e = quant["precisions"][p]
        shipped = bool(e["shipped"]) and (p != "fp16" or fp16 is not None)
        row = {"precision": p, "file": e["file"] if shipped else None, "shipped": shipped, "top1": e["top1"],
               "top1_agreement_vs_fp32": e["top1_agreement_vs_fp32"], "drop_pts": e["drop_pts"], "samples": e["samples"],
               "speedup_vs_fp32": {"fp32": {"speedup": 1.0}, "int8": e.get("speedup_vs_fp32")}.get(p)}
        if p == "fp16":
            row["note"] = "speed-up not measured: fp16 is for GPUs (onnxruntime CPU emulates it)"
        if not shipped:
            row["reason"] = e.get("reason") or "bundle.fp16_onnx is false"
        rows.append(row)
    return rows


def golden_spec(ctx: StageContext, meta: dict, bundle: Path) -> dict:
    """golden.npz in the bundle and the self-test rules for the manifest."""
    from stages.lib.golden import make_golden, tolerances

    e = ctx.cfg.engine
    tols = tolerances(fp32_atol=e.fp32_atol, fp32_rtol=e.fp32_rtol, fp16_atol=e.fp16_atol, fp16_rtol=e.fp16_rtol)
    try:
        spec = make_golden(meta, bundle / "model.onnx", bundle / "golden.npz", ctx.cfg.bundle.golden_samples)
    except PipelineError as err:
        if meta["dataset"] != "imagefolder":
            raise
        return {"golden": None, "reason": str(err), "tolerances": tols}
    return {**spec, "tolerances": tols, "command": "python run_onnx.py --selftest [--precision fp16|int8]"}
