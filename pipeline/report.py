"""The run report: ``report.html`` (one self-contained page), ``summary.json`` and the terminal summary.

Everything is read from the stage records and the artifacts the stages wrote; nothing is recomputed, so the
page shows what the run measured. A stage that has not run leaves a "not run yet" note in its sections,
a skipped one its reason. No torch import: ``norm-pipeline report`` stays quick.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from pipeline import __version__, graph
from pipeline.rundir import RunDir
from stages.lib.accuracy import accuracy_summary
from stages.lib.io import atomic_write_text

REPORT, SUMMARY = "report.html", "summary.json"
OWNER = {"student": "distill", "run": "teacher"}  # config section -> the stage whose record shows it
# (label, stage, the stage's named history output in pipeline/graph.py)
HISTORIES = (("teacher", "teacher", "history"), ("baseline CE", "baseline", "ce_history"),
             ("baseline KD", "baseline", "kd_history"), ("NORM student", "distill", "history"))


@dataclass
class Run:
    """A run directory as the report sees it: records, resolved config, artifacts of finished stages."""

    path: Path
    records: dict[str, Optional[dict]]
    config: dict
    config_text: str

    @classmethod
    def load(cls, path: Path | str) -> "Run":
        import yaml

        path = Path(path)
        rd = RunDir(path)
        cfg_file = path / "config.yaml"
        text = cfg_file.read_text() if cfg_file.is_file() else ""
        try:
            config = yaml.safe_load(text) or {}
        except yaml.YAMLError:
            config = {}
        return cls(path, {n: rd.record(n) for n in graph.ORDER}, config if isinstance(config, dict) else {}, text)

    def done(self, stage: str) -> bool:
        rec = self.records.get(stage)
        return rec is not None and rec.get("status") == "done"

    def metrics(self, stage: str) -> dict:
        rec = self.records.get(stage)
        return dict(rec.get("metrics") or {}) if rec is not None and self.done(stage) else {}

    def artifact_path(self, stage: str, name: str) -> Path:
        """Where the named output of ``stage`` (``outputs`` in pipeline/graph.py) lies in this run."""
        return graph.artifact_path(self.path, stage, name)

    def artifact(self, stage: str, name: str, inside: str = "") -> Optional[dict]:
        """The JSON output ``name`` of a finished stage (``inside``: a file in a folder output), or None."""
        p = self.artifact_path(stage, name) / inside if inside else self.artifact_path(stage, name)
        if not self.done(stage) or not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def cfg(self, dotted: str, default: Any = None) -> Any:
        """A config value as the stage that used it saw it (its record), else from config.yaml."""
        section, _, rest = dotted.partition(".")
        used = (self.records.get(OWNER.get(section, section)) or {}).get("config") or {}
        if dotted in used:  # e.g. "run.seed"
            return used[dotted]
        cur: Any = used.get(section)
        if cur is None:
            cur = self.config.get(section)
        for part in rest.split(".") if rest else ():
            if not isinstance(cur, dict) or part not in cur:
                return default
            cur = cur[part]
        return cur

    def note(self, *stages: str) -> Optional[dict]:
        """Why a section is empty: the first of ``stages`` that is not done (missing or skipped), else None."""
        for s in stages:
            rec = self.records.get(s)
            if rec is None:
                return {"stage": s, "skipped": False, "reason": ""}
            if rec.get("status") != "done":
                return {"stage": s, "skipped": True, "reason": rec.get("reason", "")}
        return None

    def histories(self) -> dict[str, list[dict]]:
        out = {}
        for label, stage, name in HISTORIES:
            p = self.artifact_path(stage, name)
            if self.done(stage) and p.is_file():
                with open(p, newline="") as f:
                    rows = [{k: _num(v) for k, v in r.items()} for r in csv.DictReader(f)]
                if rows:
                    out[label] = rows
        return out


def _num(v: Optional[str]) -> Optional[float]:
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


# ----------------------------------------------------------------------------- summary.json
def _pts(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else (a - b) * 100


def _pick(d: dict, keys: tuple[str, ...]) -> dict:
    return {k: d.get(k) for k in keys}


def build_summary(run: Run) -> dict:
    """The key figures for machines; every value comes from a record or a stage's JSON artifact."""
    m = run.metrics
    acc = accuracy_summary(m)
    base = acc["baseline_ce_top1"]
    deltas = {f"{k[:-5]}_vs_baseline_ce_pts": _pts(acc[k], base)
              for k in ("teacher_top1", "baseline_kd_top1", "norm_top1", "merged_top1")}
    vjson = run.artifact("verify", "verify") or {}
    verify = _pick(m("verify"), ("fp32_max_abs_diff", "fp32_max_rel_diff", "fp64_max_rel_diff", "fp64_stored_max_rel_diff",
                                  "top1_agreement", "params_equal", "flops_equal", "params", "flops"))
    verify["passed"] = vjson.get("passed") if vjson else None
    export = _pick(m("export"), ("ort_max_abs_diff", "ort_max_rel_diff", "ort_parity_ok", "graph_identical", "opset",
                                 "exporter", "model_onnx_sha256"))
    latency = _pick(m("benchmark"), ("verdict", "verdict_reason", "verdict_power", "merged_vs_vanilla_ratio",
                                     "merged_vs_vanilla_lo", "merged_vs_vanilla_hi", "aa_ratio", "aa_lo", "aa_hi",
                                     "aa_within_band", "unmerged_verdict", "unmerged_vs_vanilla_ratio",
                                     "unmerged_vs_vanilla_lo", "unmerged_vs_vanilla_hi", "band", "verdict_backend",
                                     "verdict_batch", "verdict_clock", "verdict_rounds", "verdict_seconds",
                                     "conditions_changed", "structure_identical"))
    b = m("bundle")
    bundle = {"path": str(run.artifact_path("bundle", "bundle")) if run.done("bundle") else None,
              "tar": str(run.artifact_path("bundle", "tar")) if b.get("tar_sha256") else None,
              **_pick(b, ("tar_sha256", "tar_bytes", "files", "bundle_bytes", "engines"))}
    cost = latency.get("verdict")
    from pipeline.seeds import seed_summary

    seeds = seed_summary(run)  # yes / no / inconclusive from the paired difference's CI over seeds
    verdicts = {"norm_vs_baseline_ce_pts": deltas["norm_vs_baseline_ce_pts"], "norm_helped": seeds["verdict"],
                "merge_exact": (vjson.get("passed") is True) if run.done("verify") else None,
                "cost_unchanged": {"yes": True, "no": False}.get(cost) if cost else None}
    return {"run_dir": str(run.path), "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "norm_pipeline_version": __version__, "verdicts": verdicts, "accuracy": acc, "deltas": deltas,
            "verify": verify if run.done("verify") else None, "export": export if run.done("export") else None,
            "engine": _engine_summary(run), "latency": latency if run.done("benchmark") else None,
            "bundle": bundle if run.done("bundle") else None, "stages": _stage_summary(run), "seeds": seeds,
            "precision": precision_summary(run),
            "quantize": _pick(m("quantize"), ("fp32_top1", "int8_top1", "int8_drop_pts", "int8_shipped", "int8_speedup",
                                              "int8_speedup_lo", "int8_speedup_hi", "int8_speed_verdict", "int8_speed_batch",
                                              "fp16_top1", "fp16_drop_pts", "fp16_shipped")) if run.done("quantize") else None,
            "devices": len(list((run.path / "devices").glob("*.json"))) if (run.path / "devices").is_dir() else 0}


def precision_summary(run: Run) -> dict:
    """Training stage -> {"amp": fp32/bf16/fp16, "requested", "reason"} from its record (amp: auto resolved)."""
    out = {}
    for stage in ("teacher", "baseline", "distill"):
        m = run.metrics(stage)
        if m.get("amp"):
            out[stage] = {"amp": m["amp"], "requested": m.get("amp_requested"), "reason": m.get("amp_reason"),
                          "channels_last": m.get("channels_last"), "channels_last_reason": m.get("channels_last_reason")}
    return out


def precision_text(precision: dict) -> str:
    """'teacher fp32 · baseline fp32 · NORM fp32 (amp: auto: <reason>)': what training used and why."""
    if not precision:
        return ""
    layout = {True: " NHWC", False: " NCHW"}
    used = " · ".join(f"{ {'distill': 'NORM'}.get(k, k)} {v['amp']}{layout.get(v.get('channels_last'), '')}"
                      for k, v in precision.items())
    why = list(dict.fromkeys(f"amp: {v['requested']}: {v['reason']}" for v in precision.values()))
    why += list(dict.fromkeys(f"channels_last: {v['channels_last_reason']}" for v in precision.values()
                              if v.get("channels_last_reason")))
    return f"{used} ({'; '.join(why)})"


def _engine_summary(run: Run) -> dict:
    rec = run.records.get("engine")
    if rec is None:
        return {"status": "not run"}
    if rec.get("status") != "done":
        return {"status": rec.get("status"), "reason": rec.get("reason", "")}
    keep = {k: v for k, v in run.metrics("engine").items() if k.endswith(("top1", "agreement", "diff", "_ok", "version", "gpu"))}
    return {"status": "done", **keep}


def _stage_summary(run: Run) -> dict:
    out = {}
    for name in graph.ORDER:
        rec = run.records.get(name)
        out[name] = ({"status": "not run"} if rec is None else
                     {"status": rec.get("status"), "duration_s": rec.get("duration_s"), "finished": rec.get("finished"),
                      "fingerprint": rec.get("fingerprint"), **({"reason": rec["reason"]} if rec.get("reason") else {})})
    return out


# ----------------------------------------------------------------------------- writing
def write_report(run_dir: Path | str) -> Path:
    """Write ``report.html`` and ``summary.json`` into ``run_dir`` (atomically); returns the report's path."""
    from pipeline import report_html

    run = Run.load(run_dir)
    summary = build_summary(run)
    atomic_write_text(run.path / SUMMARY, json.dumps(summary, indent=2, default=str) + "\n")
    path = run.path / REPORT
    atomic_write_text(path, report_html.render(run, summary))
    return path


# ----------------------------------------------------------------------------- terminal
def fmt_pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{x * 100:.2f}%"


def fmt_ci(r: Optional[float], lo: Optional[float], hi: Optional[float]) -> str:
    return "—" if r is None else f"{r:.3f} [{lo:.3f}, {hi:.3f}]"


def fmt_sci(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.2e}"


def helped_detail(summary: dict) -> str:
    """The figures behind "NORM helped": the paired mean difference with its CI over seeds, or the one seed."""
    from pipeline.stats import fmt_mean_ci

    sd, acc = summary.get("seeds") or {}, summary["accuracy"]
    d = summary["verdicts"]["norm_vs_baseline_ce_pts"]
    if d is None:
        return "baseline or distill not run"
    if (sd.get("n") or 0) >= 2:
        return (f"{fmt_mean_ci(sd['diff_pts'], signed=True)} pts top-1, paired over {sd['n']} seeds "
                f"({', '.join(map(str, sd['seeds']))}): NORM {fmt_mean_ci(sd['norm_top1'], 100, '%')} vs student alone "
                f"{fmt_mean_ci(sd['baseline_ce_top1'], 100, '%')} (mean ± 95% CI); {sd['why']}")
    return (f"{d:+.2f} pts top-1: NORM {fmt_pct(acc['norm_top1'])} vs student alone "
            f"{fmt_pct(acc['baseline_ce_top1'])} (teacher {fmt_pct(acc['teacher_top1'])}); {sd.get('why') or ''}")


def terminal_summary(summary: dict):
    """A small rich table with the verdicts and the figures behind them (printed at the end of ``run``)."""
    from rich.table import Table
    from rich.text import Text

    v = summary["verdicts"]
    ver, lat = summary.get("verify") or {}, summary.get("latency") or {}
    ex, eng, b = summary.get("export") or {}, summary.get("engine") or {}, summary.get("bundle") or {}
    word = {True: "[green]yes[/]", False: "[red]no[/]", None: "[dim]n/a[/]", "yes": "[green]yes[/]", "no": "[red]no[/]",
            "inconclusive": "[yellow]inconclusive[/]"}
    cost_word = word.get(lat.get("verdict"), word[None])
    rows = [("NORM helped", word[v["norm_helped"]], helped_detail(summary)),
            ("merge exact", word[v["merge_exact"]], "verify not run" if not ver else
             f"fp32 max rel diff {fmt_sci(ver.get('fp32_max_rel_diff'))}, fp64 {fmt_sci(ver.get('fp64_max_rel_diff'))}, "
             f"top-1 agreement {fmt_pct(ver.get('top1_agreement'))}"),
            ("cost unchanged", cost_word, "benchmark not run" if lat.get("merged_vs_vanilla_ratio") is None
             else f"{lat.get('verdict_reason') or ''}; A/A {fmt_ci(lat.get('aa_ratio'), lat.get('aa_lo'), lat.get('aa_hi'))} "
                  f"({lat.get('verdict_clock')} clock)" + (f". {lat['verdict_power'][0].upper()}{lat['verdict_power'][1:]}"
                                                           if lat.get("verdict_power") else ""))]
    if ex:
        rows.append(("ONNX parity", word[ex.get("ort_parity_ok")], f"onnxruntime max abs diff {fmt_sci(ex.get('ort_max_abs_diff'))}, "
                     f"graph identical to vanilla: {'yes' if ex.get('graph_identical') else 'no'}"))
    if eng.get("status") == "done":
        rows.append(("TensorRT", word[eng.get("parity_ok")], f"fp32 top-1 {fmt_pct(eng.get('fp32_top1'))}, "
                     f"fp16 top-1 {fmt_pct(eng.get('fp16_top1'))}"))
    elif eng.get("status") == "skipped":
        rows.append(("TensorRT", "[cyan]skipped[/]", eng.get("reason", "")))
    if summary.get("precision"):
        rows.append(("precision", "", precision_text(summary["precision"])))
    if b:
        rows.append(("bundle", "", f"{b.get('tar') or b.get('path')}"
                     + (f" (sha256 {b['tar_sha256'][:16]}…)" if b.get("tar_sha256") else "")))
    t = Table(title="summary", show_header=False, title_justify="left", box=None, padding=(0, 1))
    t.add_column(style="bold", no_wrap=True)
    t.add_column(no_wrap=True)
    t.add_column()
    for name, badge, detail in rows:
        t.add_row(name, badge, Text(detail))  # figures and reasons are plain text, not rich markup
    return t
