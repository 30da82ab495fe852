"""``sweep.html``: the sweep's comparison table, the accuracy-vs-key plot and every run, in report.html's style.

The stylesheet is read from report.html's own template, so the two pages cannot drift apart; the plot is a
base64 PNG: the page is one self-contained file.
"""
from __future__ import annotations

import re
from typing import Any, Optional

from pipeline import __version__
from pipeline.report import fmt_pct
from pipeline.stats import fmt_mean_ci

PALETTE = ("#059669", "#2563eb", "#d97706", "#dc2626", "#7c3aed", "#0891b2", "#64748b")


def report_css(env) -> str:
    """The <style> block of report.html.j2."""
    source = env.loader.get_source(env, "report.html.j2")[0]
    m = re.search(r"<style>(.*?)</style>", source, re.S)
    return m.group(1) if m else ""


def _x_positions(values: list) -> tuple[dict[str, float], bool]:
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return {str(v): (float(v) if numeric else float(i)) for i, v in enumerate(values)}, numeric


def sweep_png(data: dict) -> Optional[str]:
    """Top-1 of NORM and of the student alone, and their paired difference, against the first swept key."""
    from pipeline.report_html import _plt, _png

    combos = [c for c in data["combinations"] if c["n"]]
    if not combos:
        return None
    keys = list(data["grid"])
    xkey = keys[0] if keys else None
    pos, numeric = _x_positions(data["grid"][xkey] if xkey else ["config"])
    span = (max(pos.values()) - min(pos.values())) or 1.0
    groups: dict[str, list[dict]] = {}
    for c in combos:
        rest = ", ".join(f"{k.rsplit('.', 1)[-1]}={c['combo'][k]}" for k in keys[1:])
        groups.setdefault(rest, []).append(c)
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.9))
    for gi, (rest, cs) in enumerate(groups.items()):
        color = PALETTE[gi % len(PALETTE)]
        x = [pos[str(c["combo"][xkey])] if xkey else 0.0 for c in cs]

        def pts(series: str, scale: float, cs=cs):
            return ([c[series]["mean"] * scale for c in cs],
                    [(c[series]["half"] or 0.0) * scale for c in cs])

        y, e = pts("norm_top1", 100)
        ax1.errorbar(x, y, yerr=e, color=color, marker="o", markersize=5, capsize=3, linewidth=1.8,
                     label=f"NORM{' · ' + rest if rest else ''}")
        y, e = pts("baseline_ce_top1", 100)
        ax1.errorbar([v + 0.015 * span for v in x], y, yerr=e, color=color if len(groups) > 1 else "#2563eb",
                     marker="s", markersize=4, capsize=3,
                     linewidth=1.2, linestyle="--", markerfacecolor="white", alpha=0.85,
                     label=f"student alone{' · ' + rest if rest else ''}")
        y, e = pts("diff_pts", 1)
        ax2.errorbar(x, y, yerr=e, color=color, marker="o", markersize=5, capsize=3, linewidth=1.8,
                     label=rest or None)
        for c, xv in zip(cs, x, strict=True):
            if c["best"]:
                ax1.plot([xv], [c["norm_top1"]["mean"] * 100], marker="*", markersize=15, color="#f59e0b",
                         markeredgecolor="#92400e", zorder=5, linestyle="none", label="best")
    ax2.axhline(0.0, color="#9ca3af", linewidth=1)
    lo, hi = ax1.get_ylim()
    ax1.set_ylim(max(lo, 0.0), min(hi, 100.0))  # a CI bar past 0% or 100% is cut at the possible range
    one_seed = all(c["n"] < 2 for c in combos)
    xlabel = xkey or ""
    ax1.set(title="top-1 (%): mean ± 95% CI over seeds" + (" (one seed: no CI)" if one_seed else ""), xlabel=xlabel)
    ax2.set(title="NORM − student alone (pts), paired by seed", xlabel=xlabel)
    for ax in (ax1, ax2):
        if not numeric or not xkey:
            ax.set_xticks(sorted(pos.values()), [k for k, _ in sorted(pos.items(), key=lambda kv: kv[1])])
        elif len(pos) <= 12:
            ax.set_xticks(sorted(pos.values()), [k for k, _ in sorted(pos.items(), key=lambda kv: kv[1])])
        ax.set_xlim(min(pos.values()) - 0.12 * span, max(pos.values()) + 0.12 * span)
    ax1.legend(fontsize=7.5)
    if len(groups) > 1:
        ax2.legend(fontsize=7.5)
    fig.tight_layout()
    return _png(fig)


def _state(verdict: Optional[str]) -> dict:
    states = {"yes": {"state": "yes", "text": "yes"}, "no": {"state": "no", "text": "no"},
              "inconclusive": {"state": "warn", "text": "inconclusive"}}
    return states.get(verdict or "", {"state": "na", "text": "n/a"})


def combo_rows(data: dict) -> list[dict]:
    out = []
    for c in data["combinations"]:
        d = c["diff_pts"]
        out.append({"label": c["label"], "best": c["best"], "seeds": ", ".join(map(str, c["seeds"])) or "—",
                    "n": f"{c['n']}/{c['planned']}", "norm": fmt_mean_ci(c["norm_top1"], 100, "%"),
                    "norm_ci": _ci(c["norm_top1"], 100, "%"), "base": fmt_mean_ci(c["baseline_ce_top1"], 100, "%"),
                    "base_ci": _ci(c["baseline_ce_top1"], 100, "%"), "diff": fmt_mean_ci(d, signed=True),
                    "up": (d.get("lo") or 0) > 0, "down": (d.get("hi") or 0) < 0 and d.get("hi") is not None,
                    "why": c["why"], "teacher": fmt_mean_ci(c["teacher_top1"], 100, "%"), **_state(c["verdict"])})
    return out


def _ci(e: dict, scale: float, unit: str) -> str:
    if not e or e.get("lo") is None:
        return ""
    return f"[{e['lo'] * scale:.2f}, {e['hi'] * scale:.2f}]{unit}"


def run_rows(data: dict) -> list[dict]:
    out = []
    for r in data["runs"]:
        diff = None if r["norm_top1"] is None or r["baseline_ce_top1"] is None else (r["norm_top1"] - r["baseline_ce_top1"]) * 100
        st = r["stages"]
        how = {n: ("not run" if s is None else s["status"] if s["status"] != "done" else
                   "restored" if s["restored"] else "trained here") for n, s in st.items()}
        out.append({"label": r["label"], "seed": r["seed"], "dir": r["dir"], "norm": fmt_pct(r["norm_top1"]),
                    "base": fmt_pct(r["baseline_ce_top1"]), "teacher": fmt_pct(r["teacher_top1"]),
                    "diff": "—" if diff is None else f"{diff:+.2f}", "up": (diff or 0) > 0, "down": (diff or 0) < 0,
                    "how": how})
    return out


def render(data: dict) -> str:
    """The whole page as one string."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    combos = combo_rows(data)
    best = next((c for c in combos if c["best"]), None)
    trained = {n: len(v) for n, v in data["trained_in"].items()}
    ctx: dict[str, Any] = {
        "css": report_css(env), "data": data, "version": __version__, "combos": combos, "runs": run_rows(data),
        "best": best, "plot": sweep_png(data), "trained": trained, "stages": data["stages"],
        "generated": data["generated"][:19].replace("T", " ") + " UTC",
        "grid": [(k, ", ".join(map(str, v))) for k, v in data["grid"].items()],
    }
    return env.get_template("sweep.html.j2").render(**ctx)
