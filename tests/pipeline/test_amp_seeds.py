"""benchmarks/amp_seeds.py: fp32 vs bf16 runs paired by seed, sharing the teacher, statistics from the records."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import amp_seeds  # noqa: E402


def test_mean_ci_is_the_student_t_interval():
    m, sd, lo, hi = amp_seeds.mean_ci([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)
    assert (m, sd) == (2.0, 1.0)
    assert (lo, hi) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert amp_seeds.mean_ci([0.5]) == (0.5, None, None, None)


def test_verdict_yes_no_inconclusive():
    assert amp_seeds.verdict([0.3], [1.0])[0] == "inconclusive"  # one seed
    assert amp_seeds.verdict([2.0, 2.1, 1.9], [1.0, 1.5, 0.5])[0] == "no"  # interval excludes 0
    assert amp_seeds.verdict([0.1, -0.1, 0.0], [0.0, 1.0, 2.0])[0] == "yes"  # inside the seed spread (sd 1)
    assert amp_seeds.verdict([1.0, -1.0, 0.5], [1.0, 1.1, 0.9])[0] == "inconclusive"  # wider than the spread


def test_each_run_is_the_cli_up_to_distill(monkeypatch, tmp_path):
    calls = []

    class Done:
        returncode = 0

    monkeypatch.setattr(amp_seeds.subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw)) or Done())
    amp_seeds.run_pipeline("pipeline.yaml", tmp_path / "r", amp_seeds.overrides_for(2, "bf16", "none", ["x.y=1"]))
    cmd, kw = calls[0]
    assert cmd[1:] == ["-m", "pipeline.cli", "run", "-c", "pipeline.yaml", "--run-dir", str(tmp_path / "r"),
                       "--to", "distill", "--set", "run.seed=2", "--set", "teacher.amp=none",
                       "--set", "baseline.amp=bf16", "--set", "distill.amp=bf16", "--set", "x.y=1"]
    assert kw["cwd"] == amp_seeds.ROOT
    Done.returncode = 2
    with pytest.raises(SystemExit, match="failed"):
        amp_seeds.run_pipeline("pipeline.yaml", tmp_path / "r", [])


@pytest.mark.timeout(900)  # eight training stages (bf16 is emulated on CPUs without native bf16)
def test_two_seeds_on_tiny_data(tmp_path, tiny_overrides, capsys, monkeypatch):
    from pipeline.config import load_config
    from pipeline.session import run_pipeline

    def in_process(config, rd, overrides):  # the CLI's run, without an interpreter start per run
        run_pipeline(load_config(config, overrides), rd, to_stage="distill")

    monkeypatch.setattr(amp_seeds, "run_pipeline", in_process)
    argv = ["--seeds", "0", "1", "--root", str(tmp_path), "--json", str(tmp_path / "s.json")]
    for o in tiny_overrides + ["data.train_limit=64", "data.val_limit=32"]:
        argv += ["--set", o]
    s = amp_seeds.main(argv)
    assert [r["seed"] for r in s["rows"]] == [0, 1]
    for r in s["rows"]:
        assert r["teacher_shared"], "the bf16 arm must reuse the fp32 arm's teacher"
        for arm, amp in (("none", "fp32"), ("bf16", "bf16")):
            rd = tmp_path / f"seed{r['seed']}-{arm}"
            rec = {st: json.loads((rd / st / "record.json").read_text())["metrics"] for st in ("teacher", "baseline", "distill")}
            assert rec["baseline"]["amp"] == rec["distill"]["amp"] == amp
            assert rec["teacher"]["amp"] == "fp32"
            gain = (rec["distill"]["top1"] - rec["baseline"]["ce_top1"]) * 100
            assert r[arm]["gain_pts"] == pytest.approx(gain)
        assert r["diff_pts"] == pytest.approx(r["bf16"]["gain_pts"] - r["none"]["gain_pts"])
    diffs = [r["diff_pts"] for r in s["rows"]]
    assert s["diff"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert s["within_seed_noise"] in ("yes", "no", "inconclusive")
    assert json.loads((tmp_path / "s.json").read_text())["diff"]["mean"] == pytest.approx(s["diff"]["mean"])
    out = capsys.readouterr().out
    assert "paired difference bf16 - fp32" in out and "within seed noise" in out
