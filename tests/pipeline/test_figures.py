"""The report's and the benchmark stage's figures show the figures they are given: the plotted points are
read back from the matplotlib objects and compared with the inputs, and the PNG decodes to a drawn image."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

HIST = {
    "teacher": [{"epoch": 1.0, "val_top1": 0.50, "train_loss": 1.9}, {"epoch": 2.0, "val_top1": 0.70, "train_loss": 1.2}],
    "baseline CE": [{"epoch": 1.0, "val_top1": 0.30, "train_loss": 2.1}, {"epoch": 2.0, "val_top1": 0.45, "train_loss": 1.6}],
    "NORM student": [
        {"epoch": 1.0, "val_top1": 0.35, "train_loss": 9.0, "train_ce": 2.0, "train_norm": 7.0, "norm_weight": 0.1},
        {"epoch": 2.0, "val_top1": 0.55, "train_loss": 4.0, "train_ce": 1.5, "train_norm": 2.5, "norm_weight": 1.0}],
}


def _decoded(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    img.load()
    return img


def _drawn(img: Image.Image) -> None:
    """A real plot: a sensible size and many colours, not a blank canvas."""
    assert img.width > 300 and img.height > 150
    assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 20


@pytest.fixture
def captured(monkeypatch):
    """Figures handed to report_html._png, kept open for inspection (the real PNG is still made)."""
    from pipeline import report_html

    figs, real = [], report_html._png

    def keep(fig):
        figs.append(fig)
        uri = real(fig)
        figs.append(uri)
        return uri

    monkeypatch.setattr(report_html, "_png", keep)
    return figs


def _lines(ax) -> dict[str, list[float]]:
    return {ln.get_label(): [float(v) for v in ln.get_ydata()] for ln in ax.get_lines() if not ln.get_label().startswith("_")}


def test_training_curves_plot_the_histories(captured):
    from pipeline.report_html import curves_png

    uri = curves_png(HIST)
    fig, made = captured
    assert made == uri
    _drawn(_decoded(uri))
    top1, loss, terms = fig.axes[:3]
    assert _lines(top1) == {k: [r["val_top1"] * 100 for r in rows] for k, rows in HIST.items()}
    assert _lines(loss) == {k: [r["train_loss"] for r in rows] for k, rows in HIST.items()}
    norm = HIST["NORM student"]
    assert _lines(terms) == {"ce": [r["train_ce"] for r in norm], "norm": [r["train_norm"] for r in norm]}
    for ax in (top1, loss, terms):
        for ln in ax.get_lines():
            assert [float(v) for v in ln.get_xdata()] == [1.0, 2.0]
    twin = fig.axes[3]  # the NORM weight on its own axis
    assert [float(v) for v in twin.get_lines()[0].get_ydata()] == [r["norm_weight"] for r in norm]


def _cell(backend: str, batch: int, comps: dict[str, tuple[float, float, float]], medians: dict[str, float]) -> dict:
    return {"backend": backend, "batch": batch,
            "models": {n: {"median_ms": m, "p90_ms": m * 1.1} for n, m in medians.items()},
            "comparisons": {k: {"ratio": r, "lo": lo, "hi": hi} for k, (r, lo, hi) in comps.items()}}


CELLS = [
    _cell("onnxruntime_cpu", 1, {"merged_vs_vanilla": (1.01, 0.98, 1.04), "aa": (0.99, 0.97, 1.02),
                                 "unmerged_vs_vanilla": (1.30, 1.25, 1.36)},
          {"vanilla": 2.0, "vanilla_b": 2.1, "merged": 2.05, "unmerged": 2.7}),
    _cell("torch_cpu", 1, {"merged_vs_vanilla": (0.96, 0.90, 1.03), "aa": (1.02, 0.95, 1.08),
                           "unmerged_vs_vanilla": (2.5, 2.2, 2.8)},  # beyond the axis: drawn at its edge
          {"vanilla": 3.0, "vanilla_b": 3.1, "merged": 3.2, "unmerged": 7.5}),
]


def test_ratio_forest_plots_each_comparisons_interval(captured):
    from pipeline.report_html import ratios_png

    ratios_png({"cells": CELLS}, "wall", 0.05, ("onnxruntime_cpu", 1))
    fig, made = captured
    _drawn(_decoded(made))
    ax = fig.axes[0]
    colours = {"merged_vs_vanilla": "#059669", "aa": "#64748b", "unmerged_vs_vanilla": "#dc2626"}
    segments = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 2 and ln.get_ydata()[0] == ln.get_ydata()[1]]
    points = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 1 and ln.get_marker() == "o"]
    for cell in CELLS:
        for key, comp in cell["comparisons"].items():
            lo, hi = max(comp["lo"], 0.5), min(comp["hi"], 2.0)
            seg = [s for s in segments if s.get_color() == colours[key] and list(map(float, s.get_xdata())) == [lo, hi]]
            dot = [p for p in points if p.get_color() == colours[key] and float(p.get_xdata()[0]) == min(comp["ratio"], 2.0)]
            assert len(seg) == 1 and len(dot) == 1, (cell["backend"], key)
            assert float(dot[0].get_ydata()[0]) == float(seg[0].get_ydata()[0])  # the point sits on its interval
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["torch_cpu\nbatch 1", "onnxruntime_cpu\nbatch 1\n(verdict)"]
    assert [t.get_fontweight() for t in ax.get_yticklabels()] == ["normal", "bold"]
    lo_band, hi_band = ax.patches[0].get_x(), ax.patches[0].get_x() + ax.patches[0].get_width()
    assert (lo_band, hi_band) == pytest.approx((0.95, 1.05))


def test_benchmark_latency_png_shows_every_median(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from stages.lib.latency_report import plot_latency

    shown, real_close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: shown.append(fig))
    cells = CELLS + [_cell("onnxruntime_cpu", 8, {}, {"vanilla": 9.0, "vanilla_b": 9.2, "merged": 9.1, "unmerged": 12.0}),
                     {"backend": "tensorrt", "batch": 8, "skipped": "no engine"}]
    plot_latency(cells, tmp_path / "latency.png")
    fig = shown[0]
    try:
        img = Image.open(tmp_path / "latency.png")
        img.load()
        _drawn(img)
        assert len(fig.axes) == 2 and [ax.get_title() for ax in fig.axes] == ["batch 1", "batch 8"]
        for ax, batch in zip(fig.axes, (1, 8), strict=True):
            bars = sorted(round(p.get_height(), 9) for p in ax.patches)
            want = sorted(round(m["median_ms"], 9) for c in cells if c.get("batch") == batch and "models" in c
                          for m in c["models"].values())
            assert bars == want, batch
        assert img.size[0] > img.size[1]  # two panels side by side
    finally:
        real_close(fig)
