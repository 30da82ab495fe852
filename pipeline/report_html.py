"""``report.html``: the section contents (formatted from the records), the plots, and the Jinja2 page.

Plots are drawn with matplotlib's Agg backend and embedded as base64 PNG, the CSS is inline: the page is one
file with no external reference, so it can be mailed or attached as it is.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Optional

from pipeline import __version__, graph
from pipeline.report import Run, fmt_ci, fmt_pct, fmt_sci, precision_summary, precision_text

COLORS = {"teacher": "#64748b", "baseline CE": "#2563eb", "baseline KD": "#d97706", "NORM student": "#059669"}


# ----------------------------------------------------------------------------- small formatters
def _bytes(n: Optional[float]) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _int(n: Optional[int]) -> str:
    return "—" if n is None else f"{int(n):,}"


def _yes(ok: Optional[bool]) -> dict:
    return {"state": "na", "text": "n/a"} if ok is None else {"state": "yes" if ok else "no", "text": "yes" if ok else "no"}


def _delta(pts: Optional[float]) -> str:
    return "" if pts is None else f"{pts:+.2f}"


def _png(fig) -> str:
    """The figure as a data: URI (and closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _file_png(path: Path) -> Optional[str]:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii") if path.is_file() else None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
                         "grid.color": "#e5e7eb", "grid.linewidth": 0.8, "axes.edgecolor": "#9ca3af",
                         "axes.titleweight": "bold", "axes.titlesize": 10, "legend.frameon": False})
    return plt


# ----------------------------------------------------------------------------- plots
def curves_png(hist: dict[str, list[dict]]) -> Optional[str]:
    """Validation top-1, total training loss per run, and the NORM student's loss terms, per epoch."""
    if not hist:
        return None
    plt = _plt()
    norm = hist.get("NORM student")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))  # always three panels: the same scale on every page
    for label, rows in hist.items():
        ep = [r["epoch"] for r in rows]
        kw = dict(color=COLORS.get(label), marker="o", markersize=3.5, linewidth=1.8, label=label)
        axes[0].plot(ep, [None if r.get("val_top1") is None else r["val_top1"] * 100 for r in rows], **kw)
        axes[1].plot(ep, [r.get("train_loss") for r in rows], **kw)
    axes[0].set(title="validation top-1 (%)", xlabel="epoch")
    axes[1].set(title="training loss (all terms, weighted)", xlabel="epoch")
    axes[0].legend(fontsize=8)
    if norm:
        ax, ep = axes[2], [r["epoch"] for r in norm]
        for key, color in (("train_ce", "#2563eb"), ("train_kd", "#d97706"), ("train_norm", "#059669")):
            if any(r.get(key) is not None for r in norm):
                ax.plot(ep, [r.get(key) for r in norm], color=color, marker="o", markersize=3.5, linewidth=1.8,
                        label=key.removeprefix("train_"))
        if any(r.get("norm_weight") is not None for r in norm):
            tw = ax.twinx()
            tw.plot(ep, [r.get("norm_weight") for r in norm], color="#9ca3af", linestyle="--", linewidth=1.2)
            tw.set_ylabel("NORM weight (dashed)", color="#6b7280")
            tw.grid(False)
            tw.spines["right"].set_visible(True)
        ax.set(title="NORM student: loss terms", xlabel="epoch")
        ax.legend(fontsize=8)
    else:
        axes[2].set(title="NORM student: loss terms", xticks=[], yticks=[])
        axes[2].text(0.5, 0.5, "distill not run yet", ha="center", va="center", color="#6b7280",
                     transform=axes[2].transAxes)
    last = max(r["epoch"] for rows in hist.values() for r in rows)
    for ax in axes[1:]:  # NORM's term can be 10x the others: log scale keeps every curve readable
        ys = [y for line in ax.get_lines() for y in line.get_ydata() if y is not None and y == y]
        if ys and min(ys) > 0 and max(ys) / min(ys) > 10:
            from matplotlib.ticker import FuncFormatter, LogLocator

            ax.set_yscale("log")
            ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
            for axis_fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis_fmt(FuncFormatter(lambda v, _: f"{v:g}"))
    for ax in axes if norm else axes[:2]:
        ax.set_xlim(0.5, last + 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return _png(fig)


def _cell_comparisons(cell: dict, clock: str) -> dict:
    return (cell.get("cpu_comparisons") if clock == "cpu" else None) or cell.get("comparisons") or {}


def ratios_png(bench: dict, clock: str, band: float, verdict: tuple = ()) -> Optional[str]:
    """Forest plot: merged / unmerged / A/A ratios to vanilla with their 95% CIs, per backend and batch."""
    cells = [c for c in bench.get("cells", []) if "models" in c]
    series = (("merged_vs_vanilla", "merged", "#059669"), ("aa", "A/A control", "#64748b"),
              ("unmerged_vs_vanilla", "unmerged (FT kept)", "#dc2626"))
    groups = [(f"{c['backend']}\nbatch {c['batch']}" + ("" if clock == "wall" or c.get("cpu_comparisons") else " (wall)")
               + ("\n(verdict)" if (c["backend"], c["batch"]) == verdict else ""), c, _cell_comparisons(c, clock))
              for c in cells]
    groups = [g for g in groups if any(k in g[2] for k, _, _ in series)]
    if not groups:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9.5, 0.75 * len(groups) + 1.3))
    lo_lim, hi_lim = 0.5, 2.0
    ax.axvspan(1 - band, 1 + band, color="#d1fae5", zorder=0)
    ax.axvline(1.0, color="#059669", linewidth=0.8, zorder=1)
    for gi, (_, _cell, comps) in enumerate(groups):
        y0 = len(groups) - 1 - gi
        if gi:
            ax.axhline(y0 + 0.5, color="#e5e7eb", linewidth=0.8)
        for si, (key, label, color) in enumerate(series):
            if key not in comps:
                continue
            comp, y = comps[key], y0 + 0.25 - si * 0.25
            lo, hi = max(comp["lo"], lo_lim), min(comp["hi"], hi_lim)
            ax.plot([lo, hi], [y, y], color=color, linewidth=2.4, solid_capstyle="butt", label=label if gi == 0 else None)
            ax.plot([min(max(comp["ratio"], lo_lim), hi_lim)], [y], "o", color=color, markersize=5)
            for edge, over, marker in ((hi_lim, comp["hi"] > hi_lim, ">"), (lo_lim, comp["lo"] < lo_lim, "<")):
                if over:
                    ax.plot([edge], [y], marker, color=color, markersize=6, clip_on=False)
    ax.set_yticks(range(len(groups)), [g[0] for g in reversed(groups)], fontsize=8)
    for tick in ax.get_yticklabels():
        if "(verdict)" in tick.get_text():
            tick.set_fontweight("bold")
    ax.set_ylim(-0.6, len(groups) - 0.4)
    ax.set_xlim(lo_lim, hi_lim)
    ax.set_xlabel(f"latency ratio to vanilla: median with 95% bootstrap CI ({clock} clock); band 1 ± {band:.0%} = unchanged")
    ax.grid(axis="y", visible=False)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 1.0 + 0.35 / (0.75 * len(groups) + 1.3)), ncol=3, fontsize=8)
    fig.tight_layout()
    return _png(fig)


# ----------------------------------------------------------------------------- sections
def config_section(run: Run) -> list[tuple[str, str]]:
    c, data = run.cfg, run.metrics("data")
    residual = c("distill.residual", True)
    methods = c("baseline.methods", ["ce"]) or []
    rows = [("dataset", f"{c('data.dataset', '?')}" + (f" · {_int(data.get('train_size'))} train / "
                                                       f"{_int(data.get('val_size'))} val images, {data.get('num_classes')} classes" if data else "")),
            ("teacher", f"{c('teacher.model', '?')}" + (" (imported checkpoint)" if c("teacher.checkpoint") else
                                                        f" · {c('teacher.epochs')} epochs")),
            ("student", f"{c('student.model', '?')}"),
            ("NORM", f"N = {c('distill.n')} · FT {'default, x + contract(expand(x))' if residual else 'plain, contract(expand(x))'}"),
            ("distill", f"{c('distill.epochs')} epochs · batch {c('distill.batch_size')} · lr {c('distill.lr')} "
                        f"({c('distill.schedule')}) · loss = {c('distill.gamma')}·CE + {c('distill.beta')}·KD + "
                        f"{c('distill.alpha')}·w(epoch)·NORM · T = {c('distill.temperature')}"),
            ("baseline", f"{c('baseline.epochs')} epochs · methods {', '.join(methods).upper()}"
                         + (f" · KD weight {c('baseline.kd_weight')}, T = {c('baseline.temperature')}" if "kd" in methods else "")),
            ("run", f"device {c('run.device')} · seed {c('run.seed')}"
                    + (f" · student seed {c('student.seed')}" if c("student.seed") not in (None, c("run.seed")) else ""))]
    prec = precision_text(precision_summary(run))
    if prec:
        rows.append(("precision", prec))
    return rows


def accuracy_rows(run: Run, s: dict) -> list[dict]:
    acc, d, m = s["accuracy"], s["deltas"], run.metrics
    teacher, student = run.cfg("teacher.model", "teacher"), run.cfg("student.model", "student")
    rows = [("teacher", teacher, acc["teacher_top1"], m("teacher").get("top5"), m("teacher").get("params"), d["teacher_vs_baseline_ce_pts"], "teacher"),
            ("student alone, CE (baseline)", student, acc["baseline_ce_top1"], m("baseline").get("ce_top5"),
             m("distill").get("student_params") or m("verify").get("params"), None, "baseline"),
            ("student alone, KD", student, acc["baseline_kd_top1"], m("baseline").get("kd_top5"),
             m("distill").get("student_params") or m("verify").get("params"), d["baseline_kd_vs_baseline_ce_pts"], "baseline"),
            ("NORM student, with FT (trained)", student, acc["norm_top1"], m("distill").get("top5"),
             m("merge").get("unmerged_params"), d["norm_vs_baseline_ce_pts"], "distill"),
            ("NORM merged (deployed)", student, acc["merged_top1"], None, m("verify").get("params"),
             d["merged_vs_baseline_ce_pts"], "verify")]
    out = []
    for label, model, top1, top5, params, delta, stage in rows:
        if top1 is None and label == "student alone, KD" and "kd" not in (run.cfg("baseline.methods") or []):
            continue
        out.append({"label": label, "model": model, "top1": fmt_pct(top1), "top5": fmt_pct(top5), "params": _int(params),
                    "delta": _delta(delta), "up": stage != "teacher" and (delta or 0) > 0, "down": stage != "teacher" and (delta or 0) < 0,
                    "missing": top1 is None, "stage": stage, "key": label.startswith("NORM")})
    return out


def verify_rows(run: Run) -> Optional[dict]:
    vj = run.artifact("verify", "verify")
    if not vj:
        return None
    tol, st = vj.get("tolerances", {}), vj.get("structure", {})
    f32, f64, f64s = vj.get("fp32", {}), vj.get("fp64", {}), vj.get("fp64_stored", {})
    checks = [("fp32: stored merged vs unmerged, max rel diff", fmt_sci(f32.get("max_rel_diff")), f"≤ {tol.get('fp32_rel_tol', 0):.0e}",
               f32.get("max_rel_diff", 1) <= tol.get("fp32_rel_tol", 0), f"{_int(f32.get('samples'))} images, max abs diff {fmt_sci(f32.get('max_abs_diff'))}"),
              ("fp64: merge algebra, max rel diff", fmt_sci(f64.get("max_rel_diff")), f"≤ {tol.get('fp64_rel_tol', 0):.0e}",
               f64.get("max_rel_diff", 1) <= tol.get("fp64_rel_tol", 0), f"{_int(f64.get('samples'))} images"),
              ("fp64: stored (fp32-rounded) weights, max rel diff", fmt_sci(f64s.get("max_rel_diff")), f"≤ {tol.get('fp32_rel_tol', 0):.0e}",
               f64s.get("max_rel_diff", 1) <= tol.get("fp32_rel_tol", 0), ""),
              ("top-1 agreement merged vs unmerged", fmt_pct(f32.get("top1_agreement")), f"≥ {fmt_pct(tol.get('min_top1_agreement'))}",
               f32.get("top1_agreement", 0) >= tol.get("min_top1_agreement", 1), f"merged top-1 {fmt_pct(f32.get('merged_top1'))}"),
              ("parameters (merged / vanilla / unmerged)", f"{_int(st.get('params'))} / {_int(st.get('vanilla_params'))} / {_int(st.get('unmerged_params'))}",
               "merged = vanilla", st.get("params_equal"), ""),
              ("FLOPs per image (merged / vanilla / unmerged)", f"{_int(st.get('flops'))} / {_int(st.get('vanilla_flops'))} / {_int(st.get('unmerged_flops'))}",
               "merged = vanilla", st.get("flops_equal"), ""),
              ("state_dict keys and shapes", "same as vanilla" if st.get("state_dict_equal") else "differ", "equal",
               st.get("state_dict_equal"), "")]
    return {"rows": [{"figure": a, "value": b, "rule": c, **_yes(d), "detail": e} for a, b, c, d, e in checks],
            "passed": _yes(vj.get("passed"))}


def export_section(run: Run) -> Optional[dict]:
    ej = run.artifact("export", "export")
    if not ej:
        return None
    rows = []
    for kind, f in ej.get("models", {}).items():
        p = f.get("parity", {})
        rows.append({"kind": kind, "file": f.get("file"), "model": f.get("model"), "size": _bytes(f.get("bytes")),
                     "ops": f.get("ops"), "params": _int(f.get("params")), "abs": fmt_sci(p.get("max_abs_diff")),
                     "rel": fmt_sci(p.get("max_rel_diff")), "agree": fmt_pct(p.get("top1_agreement")), **_yes(p.get("ok"))})
    gi = ej.get("graph_identity", {})
    mv, uv = gi.get("merged_vs_vanilla", {}), gi.get("unmerged_vs_vanilla", {})
    extra = ", ".join(f"{n}×{op}" for op, n in (uv.get("extra_ops") or {}).items()) or "none"
    return {"rows": rows, "opset": ej.get("opset"), "parity": ej.get("parity", {}), "identical": _yes(mv.get("identical")),
            "merged_ops": mv.get("ops"), "vanilla_ops": mv.get("reference_ops"), "unmerged_extra": extra,
            "unmerged_extra_params": _int(uv.get("extra_params"))}


def engine_section(run: Run) -> Optional[dict]:
    ej = run.artifact("engine", "engine")
    if not ej:
        return None
    rows = [{"prec": p, "top1": fmt_pct(e.get("top1")), "agree": fmt_pct(e.get("top1_agreement")),
             "abs": fmt_sci(e.get("parity", {}).get("max_abs_diff")), "rel": fmt_sci(e.get("parity", {}).get("max_rel_diff")),
             "tol": f"{e.get('parity', {}).get('atol')} / {e.get('parity', {}).get('rtol')}", **_yes(e.get("parity", {}).get("ok")),
             "build": f"{e.get('build_seconds', 0):.1f} s", "size": _bytes(e.get("plan_bytes")),
             "latency": f"{e['latency']['median_ms']:.3f} ms, batch {e['latency']['batch']}" if e.get("latency") else "—"}
            for p, e in sorted(ej.get("engines", {}).items(), key=lambda kv: kv[0] != "fp32")]
    return {"rows": rows, "trt": ej.get("tensorrt_version"), "gpu": ej.get("gpu"), "cc": ej.get("compute_capability"),
            "samples": _int(ej.get("samples")), "ort_top1": fmt_pct(ej.get("ort_top1"))}


def latency_section(run: Run, s: dict) -> Optional[dict]:
    bj = run.artifact("benchmark", "benchmark")
    if not bj:
        return None
    lat = s.get("latency") or {}
    clock, band = lat.get("verdict_clock") or "wall", lat.get("band") or bj.get("config", {}).get("band", 0.05)
    models = [n for n in ("vanilla", "merged", "unmerged", "teacher", "merged_fp32", "merged_fp16")
              if any(n in c.get("models", {}) for c in bj.get("cells", []))]
    rows = []
    for c in bj.get("cells", []):
        if "models" not in c:
            rows.append({"backend": c["backend"], "batch": c["batch"], "skipped": c.get("skipped", "")})
            continue
        comps = _cell_comparisons(c, clock)
        med = {n: f"{c['models'][n]['median_ms']:.3f}" if n in c["models"] else "—" for n in models}
        mv, aa = comps.get("merged_vs_vanilla"), comps.get("aa")
        rows.append({"backend": c["backend"], "batch": c["batch"], "med": [med[n] for n in models],
                     "mv": fmt_ci(mv["ratio"], mv["lo"], mv["hi"]) if mv else "—",
                     "aa": fmt_ci(aa["ratio"], aa["lo"], aa["hi"]) if aa else "—",
                     "verdict_cell": c["backend"] == lat.get("verdict_backend") and c["batch"] == lat.get("verdict_batch")})
    env = bj.get("environment", {})
    return {"models": models, "rows": rows, "clock": clock, "band": band, "skipped": bj.get("skipped_backends", {}),
            "ratios_png": ratios_png(bj, clock, band, (lat.get("verdict_backend"), lat.get("verdict_batch"))), "stage_png": _file_png(run.artifact_path("benchmark", "latency_png")),
            "rule": bj.get("verdict", {}).get("rule", ""), "env": f"{env.get('cpu', '?')} · {env.get('cpu_count', '?')} CPUs"
            + (f" · {env['gpu']}" if env.get("gpu") else "") + f" · torch {env.get('torch', '?')}"}


def bundle_section(run: Run, s: dict) -> Optional[dict]:
    man = run.artifact("bundle", "bundle", "manifest.json")
    if not man:
        return None
    files = [{"name": n, "size": _bytes(f.get("bytes")), "sha256": f.get("sha256")} for n, f in man.get("files", {}).items()]
    return {"files": files, "bundle": s.get("bundle") or {}, "tar_size": _bytes((s.get("bundle") or {}).get("tar_bytes")),
            "format": man.get("format"), "engines": man.get("engines") or []}


def stage_rows(run: Run) -> list[dict]:
    out = []
    for spec in graph.STAGES:
        rec = run.records.get(spec.name)
        status = "not run" if rec is None else rec.get("status", "?")
        out.append({"name": spec.name, "help": spec.help, "status": status,
                    "state": {"done": "yes", "skipped": "skip", "not run": "na"}.get(status, "no"),
                    "duration": f"{rec['duration_s']:.1f} s" if rec and rec.get("duration_s") is not None else "",
                    "fingerprint": (rec or {}).get("fingerprint", "")[:12],
                    "finished": ((rec or {}).get("finished") or "")[:19].replace("T", " "),
                    "reason": (rec or {}).get("reason", "")})
    return out


def render(run: Run, summary: dict) -> str:
    """The whole page as one string."""
    import jinja2

    from pipeline import report_cards, report_edge

    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    versions: dict = next((r.get("versions") for r in reversed(list(run.records.values())) if r and r.get("versions")), {})
    ctx: dict[str, Any] = {
        "run": run, "name": run.path.name, "generated": summary["generated"][:19].replace("T", " ") + " UTC",
        "version": __version__, "versions": versions, "cards": report_cards.verdict_cards(run, summary),
        "config_rows": config_section(run), "config_text": run.config_text,
        "curves": curves_png(run.histories()), "accuracy": accuracy_rows(run, summary),
        "verify": verify_rows(run), "export": export_section(run), "engine": engine_section(run), "seeds": report_cards.seeds_section(summary),
        "latency": latency_section(run, summary), "bundle": bundle_section(run, summary), "stages": stage_rows(run),
        "quantize": report_edge.quantize_section(run), "devices": report_edge.device_section(run),
        "teacher": run.cfg("teacher.model", "teacher"), "student": run.cfg("student.model", "student"),
        "dataset": run.cfg("data.dataset", "dataset"),
        "tally": {st: sum(1 for r in run.records.values() if (r or {}).get("status") == st) for st in ("done", "skipped")},
    }
    return env.get_template("report.html.j2").render(**ctx)
