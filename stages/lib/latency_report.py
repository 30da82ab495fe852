"""The benchmark's human-readable outputs: latency.md (one row per backend, batch and model) and latency.png."""
from __future__ import annotations

from pathlib import Path

from stages.lib.latency import MODELS
from stages.lib.latency_verdict import pct


def _ci(comp: dict) -> str:
    return f"{comp['ratio']:.3f} [{comp['lo']:.3f}, {comp['hi']:.3f}]"


def latency_table(cells: list[dict], skipped: dict, metrics: dict, struct: dict) -> str:
    """Markdown: one row per (backend, batch, model), then skipped backends, structure and the verdict."""
    rows = ["| backend | batch | model | median ms | p90 ms | p99 ms | items/s | / vanilla [95% CI] | CPU ms | "
            "CPU / vanilla [95% CI] |", "|---|---:|---|---:|---:|---:|---:|---|---:|---|"]
    for c in cells:
        if "skipped" in c:
            rows.append(f"| {c['backend']} | {c['batch']} | skipped: {c['skipped']} | | | | | | | |")
            continue
        vs = {v["candidate"]: _ci(v) for v in c["comparisons"].values()}
        cpu_vs = {v["candidate"]: _ci(v) for v in c.get("cpu_comparisons", {}).values()}
        for n, s in c["models"].items():
            cpu = f"{s['cpu']['median_ms']:.3f}" if "cpu" in s else ""
            rows.append(f"| {c['backend']} | {c['batch']} | {n} | {s['median_ms']:.3f} | {s['p90_ms']:.3f} | "
                        f"{s['p99_ms']:.3f} | {s['throughput_per_s']:.0f} | {vs.get(n, '')} | {cpu} | {cpu_vs.get(n, '')} |")
    lines = ["# Inference latency", "", *rows, ""]
    lines += [f"- {b}: skipped: {why}" for b, why in skipped.items()]
    lines += [f"- params: {struct['params']}", f"- FLOPs per image: {struct['flops']}",
              f"- merged vs vanilla identical (the proof): {struct['identical']}"]
    if metrics.get("verdict_backend"):
        rounds = f", {metrics['verdict_rounds']} rounds" if metrics.get("verdict_rounds") else ""
        secs = f" in {metrics['verdict_seconds']:.0f} s" if metrics.get("verdict_seconds") is not None else ""
        lines.append(f"- **inference cost unchanged: {metrics['verdict']}** ({metrics['verdict_backend']}, batch "
                     f"{metrics['verdict_batch']}, {metrics['verdict_clock']} clock{rounds}{secs}, band ±{pct(metrics['band'])}): "
                     f"{metrics['verdict_reason']}" + ("" if "A/A" in metrics["verdict_reason"] else
                     f"; A/A control {metrics['aa_ratio']:.3f} [{metrics['aa_lo']:.3f}, {metrics['aa_hi']:.3f}]"))
        if metrics.get("verdict_power"):
            lines.append(f"- negative control: {metrics['verdict_power']}")
    else:
        lines.append("- inference cost unchanged: n/a (no backend timed merged and vanilla)")
    if metrics.get("conditions_changed"):
        lines.append(f"- conditions changed during the timing: {metrics['conditions_changed']}")
    return "\n".join(lines) + "\n"


def plot_latency(cells: list[dict], path: Path) -> None:
    """One panel per batch size: per backend, grouped bars of median latency with p90 whiskers + ratio CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [c for c in cells if "models" in c]
    batches = sorted({c["batch"] for c in done}) or [0]
    order = [*MODELS, "merged_fp32", "merged_fp16"]
    names = sorted({n for c in done for n in c["models"]}, key=lambda n: (order.index(n) if n in order else len(order), n))
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    per_panel = max([6.0] + [2.6 * sum(c["batch"] == b for c in done) for b in batches])
    fig, axes = plt.subplots(1, len(batches), figsize=(per_panel * len(batches), 5.2), squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        group = [c for c in done if c["batch"] == b]
        width, labelled = 0.8 / max(len(names), 1), set()
        for gi, c in enumerate(group):
            for mi, n in enumerate(names):
                if n in c["models"]:
                    s = c["models"][n]
                    ax.bar(gi + (mi - (len(names) - 1) / 2) * width, s["median_ms"], width, color=colors[n],
                           yerr=[[0], [s["p90_ms"] - s["median_ms"]]], capsize=2,
                           label=None if n in labelled else n)
                    labelled.add(n)
        ticks = []  # backend name, then the ratio CIs under it
        for c in group:
            notes = [f"{label} {clock} {_ci(c[key][k])}" for key, clock in (("comparisons", "wall"), ("cpu_comparisons", "cpu"))
                     for k, label in (("merged_vs_vanilla", "merged/v"), ("aa", "A/A")) if k in c.get(key, {})]
            ticks.append("\n".join([c["backend"], *notes]))
        ax.set_xticks(range(len(group)), ticks, fontsize=7)
        ax.set_title(f"batch {b}")
        ax.set_ylabel("median latency, ms (whisker: p90)")
    legend = {lb: h for ax in axes[0] for h, lb in zip(*ax.get_legend_handles_labels(), strict=True)}
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="upper center", ncol=len(legend), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
