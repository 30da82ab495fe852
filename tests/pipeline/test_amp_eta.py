"""A real run on tiny data: the precision amp: auto chose is in the records and the report, and the run's
progress display carries a run ETA once the teacher has measured the machine's speed."""
from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from pipeline.config import load_config
from stages.lib import precision
from stages.lib.precision import resolve_amp


@pytest.mark.timeout(900)  # a real run up to verify
def test_run_records_precision_and_shows_run_eta(tmp_path, tiny_overrides, monkeypatch):
    from pipeline import session

    buf = io.StringIO()
    monkeypatch.setattr(session, "console", Console(file=buf, width=250, highlight=False))
    cfg = load_config(None, tiny_overrides + ["data.train_limit=64", "data.val_limit=32"])
    session.run_pipeline(cfg, tmp_path, to_stage="verify")
    out = buf.getvalue()

    choice = resolve_amp("auto", "cpu")
    for stage in ("teacher", "baseline", "distill"):
        m = json.loads((tmp_path / stage / "record.json").read_text())["metrics"]
        assert (m["amp"], m["amp_requested"], m["amp_reason"]) == (choice.name, "auto", choice.reason)
    summary = json.loads((tmp_path / "summary.json").read_text())
    layout = precision.resolve_channels_last("auto", "cpu", choice.dtype)
    assert summary["precision"]["distill"] == {"amp": choice.name, "requested": "auto", "reason": choice.reason,
                                               "channels_last": layout.channels_last,
                                               "channels_last_reason": layout.reason}
    html = (tmp_path / "report.html").read_text()
    assert f"NORM {choice.name} NHWC" in html and "precision" in html
    for stage in ("teacher", "baseline", "distill"):  # auto on CPU: NHWC, recorded per training stage
        assert json.loads((tmp_path / stage / "record.json").read_text())["metrics"].get("channels_last") is True, stage
    flat = " ".join(out.split())  # the console wraps the long line
    assert f"teacher resnet8: {choice.describe()}; {layout.describe()}" in flat  # said when training starts

    rules = [line for line in out.splitlines() if " — " in line]
    by_stage = {s: next(line for line in rules if f" {s} " in line) for s in ("teacher", "baseline", "merge", "verify")}
    assert "run ETA" not in by_stage["teacher"]  # nothing measured yet
    for s in ("baseline", "merge", "verify"):  # planned from FLOPs, at the speed the teacher measured
        assert "run ETA" in by_stage[s], by_stage[s]
