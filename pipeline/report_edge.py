"""Report sections for the edge hand-off: reduced precisions (quantize stage) and "measured on device" rows."""
from __future__ import annotations

from typing import Optional

from pipeline.devices import load_reports
from pipeline.report import Run, fmt_pct


def quantize_section(run: Run) -> Optional[dict]:
    """fp32 / fp16 / INT8 on the validation set, the gate's decision and the INT8 CPU speed-up per batch."""
    q = run.artifact("quantize", "quantize")
    if not q:
        return None
    rows = []
    precs = dict(q.get("precisions", {}))
    if (precs.get("int8") or {}).get("qdq_reference"):  # the Q/DQ arithmetic itself (what TensorRT implements)
        ref = precs["int8"]["qdq_reference"]
        precs["int8 (Q/DQ reference, no fused CPU kernels)"] = {**ref, "speedup_vs_fp32": None,
                                                             "label": "gate passed" if ref["shipped"] else "gate failed"}
    for p, e in precs.items():
        sp = e.get("speedup_vs_fp32") or {}
        rows.append({"prec": p, "top1": fmt_pct(e.get("top1")), "drop": f"{0.0 - e.get('drop_pts', 0):+.2f}",
                     "agree": fmt_pct(e.get("top1_agreement_vs_fp32")), "state": "yes" if e.get("shipped") else "no",
                     "text": e.get("label") or ("shipped" if e.get("shipped") else "not shipped"), "reason": e.get("reason", ""),
                     "speed": (f"{sp['speedup']:.2f}× [{sp['speedup_ci95'][0]:.2f}, {sp['speedup_ci95'][1]:.2f}]"
                               if sp.get("speedup_ci95") else ("1.00×" if p == "fp32" else "—"))})
    speed = [{"batch": c["batch"], "clock": c["clock"], "speedup": f"{c['speedup']:.2f}×",
              "ci": f"[{c['speedup_ci95'][0]:.2f}, {c['speedup_ci95'][1]:.2f}]",
              "aa": f"{c['aa']['ratio']:.3f} [{c['aa']['lo']:.3f}, {c['aa']['hi']:.3f}]",
              "fp32": f"{(c.get('cpu_median_ms') or c['median_ms'])['fp32']:.3f}",
              "int8": f"{(c.get('cpu_median_ms') or c['median_ms'])['int8']:.3f}",
              "verdict": c["verdict"], "why": c["why"],
              "state": {"faster": "yes", "slower": "no"}.get(c["verdict"], "warn")} for c in q.get("speed", {}).get("cells", [])]
    cal = q.get("calibration", {})
    return {"rows": rows, "speed": speed, "max_drop": q.get("max_drop_pts"), "threads": q.get("speed", {}).get("threads"),
            "calibration": f"{cal.get('samples')} training images (seed {cal.get('seed')}), sha256 {str(cal.get('sha256'))[:16]}…",
            "int8": q.get("precisions", {}).get("int8", {})}


def device_section(run: Run) -> list[dict]:
    """One row per ingested device report."""
    rows = []
    for rep in load_reports(run.path):
        dev, art, st = rep.get("device") or {}, rep.get("artifact") or {}, rep.get("selftest") or {}
        jet = dev.get("jetson") or {}
        name = dev.get("gpu_name") or jet.get("board") or dev.get("cpu") or dev.get("machine") or "?"
        facts = [f"{dev.get('machine')}", f"CC {dev['compute_capability']}" if dev.get("compute_capability") else "",
                 f"driver {dev['driver_version']}" if dev.get("driver_version") else "",
                 f"CUDA {dev['cuda_driver_version']}" if dev.get("cuda_driver_version") else "",
                 f"TensorRT {dev['tensorrt_version']}" if dev.get("tensorrt_version") else "",
                 f"L4T {jet['l4t']}" if jet.get("l4t") else "", f"JetPack {jet['jetpack']}" if jet.get("jetpack") else "",
                 f"nvpmodel {jet['nvpmodel']}" if jet.get("nvpmodel") else ""]
        backend = rep.get("backend") or {}
        lat = [f"b{r['batch']}: p50 {r['p50_ms']:.3f} ms [{r['median_ci95_ms'][0]:.3f}, {r['median_ci95_ms'][1]:.3f}], "
               f"p90 {r['p90_ms']:.3f}, p99 {r['p99_ms']:.3f}, {r['throughput_per_s']:.0f}/s" for r in rep.get("latency") or []]
        ok = st.get("ok")
        rows.append({"device": name, "facts": " · ".join(f for f in facts if f and f != "None"),
                     "runtime": f"{backend.get('name', '?')} {backend.get('version', '')} {','.join(backend.get('providers') or [])}".strip(),
                     "file": art.get("file"), "precision": art.get("precision"),
                     "selftest": {True: "passed", False: "failed", None: "not run"}.get(ok, "not run"),
                     "state": "na" if ok is None else ("yes" if ok else "no"),
                     "selftest_detail": (f"{st.get('agreeing')}/{st.get('samples')} agree, max abs diff {st.get('max_abs_diff', 0):.2g}"
                                         if ok is not None else st.get("reason", "")),
                     "latency": lat, "created": (rep.get("created") or "")[:19].replace("T", " "),
                     "stale": rep.get("_stale"), "stored": rep.get("_file")})
    return rows
