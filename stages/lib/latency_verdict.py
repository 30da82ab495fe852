"""Verdicts from timing intervals: is the merged student's inference cost that of the vanilla student (the
benchmark stage), is int8 faster than fp32 (the quantize stage's ``speed_verdict``)?

From the verdict cell's paired comparisons (stages.lib.latency): yes / no / inconclusive with a reason
(stages.lib.timing.decide), the unmerged student as negative control and the power sentence, flattened
into the stage's metrics. The method is in docs/latency.md.
"""
from __future__ import annotations

from typing import Any

from stages.lib import timing

VERDICT_BACKEND = "onnxruntime_cpu"  # the verdict cell's backend: single-threaded onnxruntime on the CPU
VERDICT_KEYS = ("verdict", "verdict_reason", "verdict_power", "unmerged_verdict", "unmerged_reason", "verdict_backend",
                "verdict_batch", "verdict_clock", "verdict_rounds", "verdict_seconds", "verdict_stopped", "band",
                "aa_within_band", "conditions_changed")
RULE = ("per round, log(merged block / vanilla block) ({clock} clock); their median, 95% bootstrap CI over rounds. "
        "'yes': CI inside 1 ± {band}, and the A/A control's (vanilla_b/vanilla) too; 'no': CI entirely beyond one edge "
        "and beyond the A/A's deviation from 1; 'inconclusive': anything else, or fewer than {min_rounds} rounds. "
        "Rounds are added until the CI half-width is <= {half} and the A/A CI is inside 1 ± {half}, or {max_seconds:g} s "
        "are spent")

def pick_verdict_cell(cells: list[dict]) -> dict | None:
    """The cell measured for the verdict; for older records: onnxruntime CPU at its largest batch, else the first
    backend with the comparison."""
    ok = [c for c in cells if "merged_vs_vanilla" in c.get("comparisons", {})]
    marked = [c for c in ok if c.get("verdict_cell")]
    if marked:
        return marked[0]
    for want in (VERDICT_BACKEND, None):
        chosen = [c for c in ok if want is None or c["backend"] == want]
        if chosen:
            first = chosen[0]["backend"]
            return max((c for c in chosen if c["backend"] == first), key=lambda c: c["batch"])
    return None


def pct(band: float) -> str:
    return f"{band:.0%}" if round(band * 100, 6) == round(band * 100) else f"{band:.1%}"


def judge(comps: dict, band: float, adaptive: dict | None, unmerged_flops: float | None = None) -> dict:
    """The three-valued verdict with its reason, the negative control's answer, and the power sentence."""
    mv, aa, um = comps["merged_vs_vanilla"], comps["aa"], comps.get("unmerged_vs_vanilla")
    answer, reason = timing.decide(mv, band, control=aa, name="merged/vanilla")
    out: dict[str, Any] = {"aa_within_band": timing.verdict(aa["lo"], aa["hi"], band)}
    if um is not None:
        u_answer, u_reason = timing.decide(um, band, control=aa, name="unmerged/vanilla")
        out.update(unmerged_verdict=u_answer, unmerged_reason=u_reason)
        if answer == "yes" and u_answer == "yes" and unmerged_flops is not None and unmerged_flops > 1 + 2 * band:
            answer, reason = "inconclusive", (f"the negative control came out equal to vanilla ({timing.fmt_ci(um)}) although "
                                              f"it has {unmerged_flops - 1:+.0%} FLOPs: this timing does not see model cost")
        if u_answer == "no":
            detect = f"this benchmark detects the unmerged student's {um['ratio'] - 1:+.0%}"
            found = {"yes": f"it finds merged = vanilla within ±{pct(band)}",
                     "no": f"it finds merged measurably {'slower' if mv['ratio'] > 1 else 'faster'} than vanilla "
                           f"({mv['ratio'] - 1:+.1%})",
                     "inconclusive": f"it could not resolve merged vs vanilla to ±{pct(band)}"}[answer]
            out["verdict_power"] = f"{detect}; {found}"
        else:
            out["verdict_power"] = f"the negative control (unmerged student, FT kept) was not resolved: {u_reason}"
    if answer == "inconclusive" and adaptive and adaptive.get("stopped") == "time limit":
        reason += (f" (after {adaptive['rounds']} rounds in {adaptive['seconds']:.0f} s: raise benchmark.max_seconds "
                   "or rerun on a quieter machine)")
    out.update(verdict=answer, verdict_reason=reason)
    return out


def flat_metrics(cells: list[dict], vcell: dict | None, band: float, clock: str, struct: dict | None = None) -> dict:
    """Ratios and verdict from the verdict cell by ``clock`` ("cpu" falls back to wall where absent)."""
    m: dict[str, Any] = {}
    if vcell is not None:
        used = "cpu" if clock == "cpu" and vcell.get("cpu_comparisons") else "wall"
        comps = vcell["cpu_comparisons" if used == "cpu" else "comparisons"]
        for label in ("merged_vs_vanilla", "aa", "unmerged_vs_vanilla", "teacher_vs_vanilla"):
            if label in comps:
                m.update({f"{label}_{k}": comps[label][k] for k in ("ratio", "lo", "hi")})
        if used == "cpu":  # the wall-clock view of the same cell, next to it
            for label in ("merged_vs_vanilla", "aa"):
                m.update({f"wall_{label}_{k}": vcell["comparisons"][label][k] for k in ("ratio", "lo", "hi")})
        flops = (struct or {}).get("flops", {})
        ratio = flops["unmerged"] / flops["vanilla"] if flops.get("unmerged") and flops.get("vanilla") else None
        adaptive = vcell.get("adaptive")
        m.update(judge(comps, band, adaptive, ratio))
        m["verdict_backend"], m["verdict_batch"], m["verdict_clock"] = vcell["backend"], vcell["batch"], used
        m["verdict_rounds"] = comps["merged_vs_vanilla"].get("rounds")
        if adaptive:
            m["verdict_seconds"], m["verdict_stopped"] = adaptive["seconds"], adaptive["stopped"]
    else:
        m.update(verdict="n/a", verdict_backend=None, verdict_reason="no backend timed merged and vanilla")
    m["band"] = band
    flags = [f"{c['backend']} batch {c['batch']}: {line}" for c in cells for line in c.get("conditions", {}).get("changed", [])]
    m["conditions_changed"] = "; ".join(flags)
    for c in cells:
        for name, s in c.get("models", {}).items():
            m[f"{c['backend']}_b{c['batch']}_{name}_median_ms"] = s["median_ms"]
    return m


def speed_verdict(cmp: dict, aa: dict) -> tuple[str, str]:
    """faster / slower / inconclusive from the int8/fp32 time-ratio CI and the A/A control."""
    if not aa["lo"] <= 1.0 <= aa["hi"]:
        return "inconclusive", (f"the A/A control's CI [{aa['lo']:.3f}, {aa['hi']:.3f}] excludes 1: the machine was too "
                                "noisy or drifting; rerun when it is idle or raise quantize.blocks")
    if cmp["hi"] < 1.0:
        return "faster", "the whole 95% CI of int8/fp32 time is below 1"
    if cmp["lo"] > 1.0:
        return "slower", "the whole 95% CI of int8/fp32 time is above 1"
    return "inconclusive", f"the 95% CI of int8/fp32 time [{cmp['lo']:.3f}, {cmp['hi']:.3f}] contains 1"
