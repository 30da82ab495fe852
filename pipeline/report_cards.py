"""The report's verdict cards (did NORM help, is the merge exact, is the cost unchanged, the bundle) and the
per-seed table behind "did NORM help": what ``report.html`` opens with, formatted from summary.json."""
from __future__ import annotations

from typing import Optional

from pipeline.report import Run, fmt_ci, fmt_pct, fmt_sci
from pipeline.report_html import _bytes, _delta, _yes


def verdict_cards(run: Run, s: dict) -> list[dict]:
    v = s["verdicts"]
    cards = [helped_card(run, s)]
    ver = s.get("verify") or {}
    cards.append({"title": "Is the merge exact?", **_yes(v["merge_exact"]),
                  "headline": f"max rel diff {fmt_sci(ver.get('fp32_max_rel_diff'))} (fp32)" if ver else "not verified yet",
                  "detail": (f"fp64 {fmt_sci(ver.get('fp64_max_rel_diff'))} · top-1 agreement "
                             f"{fmt_pct(ver.get('top1_agreement'))} · params & FLOPs = vanilla: "
                             f"{'yes' if ver.get('params_equal') and ver.get('flops_equal') else 'no'}") if ver else "",
                  "note": run.note("verify")})
    cards.append(cost_card(run, s))
    b = s.get("bundle") or {}
    cards.append({"title": "Edge bundle", **({"state": "yes", "text": "ready"} if b else {"state": "na", "text": "n/a"}),
                  "headline": f"bundle.tar.gz, {_bytes(b.get('tar_bytes'))}" if b.get("tar_sha256") else
                  (f"{b.get('files')} files" if b else "not built yet"),
                  "detail": (f"{b.get('files')} files, {b.get('engines') or 0} TensorRT engine(s) · sha256 "
                             f"{b['tar_sha256'][:16]}…") if b.get("tar_sha256") else "", "note": run.note("bundle")})
    return cards


def cost_card(run: Run, s: dict) -> dict:
    """yes / no / inconclusive with its reason; structure is the proof, timing confirms it, the negative control
    shows the benchmark's power."""
    lat = s.get("latency") or {}
    answer = lat.get("verdict")
    state = {"yes": ("yes", "yes"), "no": ("no", "no"), "inconclusive": ("warn", "inconclusive")}.get(answer or "", ("na", "n/a"))
    card = {"title": "Inference cost unchanged?", "state": state[0], "text": state[1], "note": run.note("benchmark"),
            "headline": "not measured yet", "detail": ""}
    if lat.get("merged_vs_vanilla_ratio") is not None:
        rounds = f", {lat['verdict_rounds']} rounds" if lat.get("verdict_rounds") else ""
        secs = f" in {lat['verdict_seconds']:.0f} s" if lat.get("verdict_seconds") is not None else ""
        card.update(headline=f"merged / vanilla {fmt_ci(lat['merged_vs_vanilla_ratio'], lat['merged_vs_vanilla_lo'], lat['merged_vs_vanilla_hi'])}",
                    detail=(f"Structure (the proof): ONNX graph, params and FLOPs identical to vanilla: "
                            f"{'yes' if lat.get('structure_identical') else 'no'}. Timing (confirms it): "
                            f"{lat.get('verdict_reason') or ''} · A/A control {fmt_ci(lat['aa_ratio'], lat['aa_lo'], lat['aa_hi'])} "
                            f"· {lat['verdict_backend']}, batch {lat['verdict_batch']}, {lat['verdict_clock']} clock{rounds}{secs}"),
                    power=lat.get("verdict_power"))
        caveats = []
        if answer == "inconclusive":
            caveats.append("the timing did not decide; the structural identity above is the proof")
        if lat.get("conditions_changed"):
            caveats.append(f"the machine changed during the timing ({lat['conditions_changed']}); the paired "
                           "per-round estimate tolerates that")
        if caveats:
            card["caveat"] = "; ".join(caveats)
    elif answer == "n/a":
        card.update(headline="no backend timed merged and vanilla")
    return card


def helped_card(run: Run, s: dict) -> dict:
    """"Did NORM help?": yes / no / inconclusive from the paired difference over seeds (one seed: inconclusive)."""
    from pipeline.stats import fmt_mean_ci

    v, acc, sd = s["verdicts"], s["accuracy"], s.get("seeds") or {}
    d, n = v["norm_vs_baseline_ce_pts"], sd.get("n") or 0
    state = {"yes": {"state": "yes", "text": "yes"}, "no": {"state": "no", "text": "no"},
             "inconclusive": {"state": "warn", "text": "inconclusive"}}.get(v["norm_helped"], {"state": "na", "text": "n/a"})
    card = {"title": "Did NORM help?", **state, "note": run.note("baseline", "distill")}
    if d is None:
        return {**card, "headline": "not measured yet", "detail": "needs the baseline and distill stages"}
    if n >= 2:
        return {**card, "headline": f"{fmt_mean_ci(sd['diff_pts'], signed=True)} pts top-1, {n} seeds",
                "detail": (f"mean [95% CI] of the difference paired by seed; NORM student {fmt_mean_ci(sd['norm_top1'], 100, '%')} "
                           f"vs the same student trained alone {fmt_mean_ci(sd['baseline_ce_top1'], 100, '%')} (mean ± 95% CI) · seeds "
                           f"{', '.join(map(str, sd['seeds']))} · this run's seed: {d:+.2f} pts"),
                "caveat": sd["why"] if v["norm_helped"] == "inconclusive" else ""}
    return {**card, "headline": f"{d:+.2f} pts top-1, one seed",
            "detail": (f"NORM student {fmt_pct(acc['norm_top1'])} vs the same student trained alone "
                       f"{fmt_pct(acc['baseline_ce_top1'])} (teacher {fmt_pct(acc['teacher_top1'])})"),
            "caveat": sd.get("why", "")}


def seeds_section(s: dict) -> Optional[dict]:
    """Per-seed figures behind the verdict (only when there is more than one seed, or a seed folder was left out)."""
    from pipeline.stats import fmt_mean_ci

    sd = s.get("seeds") or {}
    if (sd.get("n") or 0) < 2 and not sd.get("excluded"):
        return None
    rows = [{"seed": r["seed"], "dir": r["dir"], "norm": fmt_pct(r["norm_top1"]), "base": fmt_pct(r["baseline_ce_top1"]),
             "diff": _delta(r["diff_pts"]), "up": r["diff_pts"] > 0, "down": r["diff_pts"] < 0} for r in sd.get("rows", [])]
    return {"rows": rows, "norm": fmt_mean_ci(sd.get("norm_top1"), 100, "%"), "base": fmt_mean_ci(sd.get("baseline_ce_top1"), 100, "%"),
            "diff": fmt_mean_ci(sd.get("diff_pts"), signed=True), "why": sd.get("why") or "", "excluded": sd.get("excluded", [])}
