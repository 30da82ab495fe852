"""`run --seeds`: the teacher once, baseline and distill per seed, and a "Did NORM help?" verdict that is
yes / no only when the paired difference's 95% CI over seeds says so (one seed: inconclusive)."""
from __future__ import annotations

import html
import json
import math
import shutil
import signal
import statistics
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main

T975_DF1 = 12.7062  # Student t, two-sided 95%, 1 degree of freedom (2 seeds)


def _invoke(args: list[str], overrides: list[str], folder: Path):
    cfg = folder / "defaults.yaml"
    cfg.write_text("{}\n")
    saved = signal.getsignal(signal.SIGTERM)
    try:
        return CliRunner().invoke(main, [*args, "-c", str(cfg), *[a for o in overrides for a in ("--set", o)]])
    finally:
        signal.signal(signal.SIGTERM, saved)


def _rec(path: Path, stage: str) -> dict:
    return json.loads((path / stage / "record.json").read_text())


def same_weights(a: Path, b: Path) -> bool:
    """Whether two model files hold equal tensors (file hashes differ anyway: histories carry timings)."""
    import torch

    sa, sb = (torch.load(p, weights_only=True)["state_dict"] for p in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _set_top1(path: Path, norm: float, base: float) -> None:
    """Give a run's distill/baseline records chosen accuracies (records are not part of the artifact hashes)."""
    for stage, key, value in (("distill", "top1", norm), ("baseline", "ce_top1", base)):
        p = path / stage / "record.json"
        rec = json.loads(p.read_text())
        rec["metrics"][key] = value
        p.write_text(json.dumps(rec))


def _summary(path: Path) -> dict:
    from pipeline.report import write_report

    write_report(path)
    return json.loads((path / "summary.json").read_text())


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, tiny_data_root):
    common = ["epochs=1", "batch_size=64", "lr=0.05"]
    overrides = ([f"data.root={tiny_data_root}", "teacher.model=resnet8", "student.model=resnet8", "distill.n=2",
                  "data.eval_batch_size=64"] + [f"{s}.{c}" for s in ("teacher", "baseline", "distill") for c in common])
    run_dir = tmp_path_factory.mktemp("seeded") / "run"
    res = _invoke(["run", "--run-dir", str(run_dir), "--seeds", "0,1", "--to", "distill"], overrides, run_dir.parent)
    assert res.exit_code == 0, res.output
    return run_dir, overrides, res.output


def test_teacher_once_students_per_seed(seeded):
    run_dir, _, output = seeded
    other = run_dir / "seeds" / "seed=1"
    assert "restored" not in _rec(run_dir, "teacher")
    for stage in ("data", "teacher"):
        assert _rec(other, stage)["restored"] and _rec(other, stage)["outputs"] == _rec(run_dir, stage)["outputs"]
    for stage in ("baseline", "distill"):
        assert "restored" not in _rec(other, stage)
        assert _rec(run_dir, stage)["config"]["student"]["seed"] == 0 and _rec(other, stage)["config"]["student"]["seed"] == 1
    for rel in ("baseline/ce/model.pt", "distill/norm_student.pt"):  # another seed, another student
        assert not same_weights(run_dir / rel, other / rel), rel
    assert _rec(other, "teacher")["config"]["run.seed"] == 0
    assert "NORM helped" in output


def test_summary_and_card_report_the_paired_difference(seeded):
    run_dir, _, _ = seeded
    s = json.loads((run_dir / "summary.json").read_text())  # written by the run itself
    runs = {0: run_dir, 1: run_dir / "seeds" / "seed=1"}
    norm = {k: _rec(p, "distill")["metrics"]["top1"] for k, p in runs.items()}
    base = {k: _rec(p, "baseline")["metrics"]["ce_top1"] for k, p in runs.items()}
    diff = [(norm[k] - base[k]) * 100 for k in (0, 1)]
    half = T975_DF1 * statistics.stdev(diff) / math.sqrt(2)
    sd = s["seeds"]
    assert sd["n"] == 2 and sd["seeds"] == [0, 1] and sd["excluded"] == []
    assert sd["norm_top1"]["mean"] == pytest.approx(statistics.mean(norm.values()))
    assert sd["baseline_ce_top1"]["mean"] == pytest.approx(statistics.mean(base.values()))
    assert sd["diff_pts"]["mean"] == pytest.approx(statistics.mean(diff))
    assert sd["diff_pts"]["lo"] == pytest.approx(statistics.mean(diff) - half, abs=1e-3)
    lo, hi = statistics.mean(diff) - half, statistics.mean(diff) + half
    assert s["verdicts"]["norm_helped"] == ("yes" if lo > 0 else "no" if hi < 0 else "inconclusive")
    page = html.unescape((run_dir / "report.html").read_text())
    assert f"{statistics.mean(diff):+.2f} [{lo:+.2f}, {hi:+.2f}] pts top-1, 2 seeds" in page
    assert ">Seeds<" in page and "seeds/seed=1" in page


def test_rerun_with_seeds_is_all_cached(seeded, monkeypatch):
    from stages.lib import training

    run_dir, overrides, _ = seeded

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(training, "fit", no_training)
    res = _invoke(["run", "--run-dir", str(run_dir), "--seeds", "0,1", "--to", "distill"], overrides, run_dir.parent)
    assert res.exit_code == 0, res.output
    assert "done in" not in res.output


@pytest.mark.parametrize("diffs,verdict", [((0.020, 0.021), "yes"), ((-0.020, -0.021), "no"), ((0.020, -0.021), "inconclusive")])
def test_verdict_follows_the_sign_of_the_ci(seeded, tmp_path, diffs, verdict):
    """The verdict's direction: NORM above the student alone in both seeds is yes, below is no, mixed is neither."""
    from rich.console import Console

    from pipeline.report import terminal_summary

    run_dir, _, _ = seeded
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    _set_top1(copy, 0.80 + diffs[0], 0.80)
    _set_top1(copy / "seeds" / "seed=1", 0.70 + diffs[1], 0.70)
    s = _summary(copy)
    assert s["seeds"]["n"] == 2 and s["verdicts"]["norm_helped"] == verdict
    mean = (diffs[0] + diffs[1]) * 50
    assert s["seeds"]["diff_pts"]["mean"] == pytest.approx(mean)
    page = html.unescape((copy / "report.html").read_text())
    badge = {"yes": '<span class="badge yes">yes</span>', "no": '<span class="badge no">no</span>',
             "inconclusive": '<span class="badge warn">inconclusive</span>'}[verdict]
    card = page.split("Did NORM help?")[1].split("</div>")[0]
    assert badge in card
    console = Console(width=300, record=True)
    console.print(terminal_summary(s))
    row = next(line for line in console.export_text().splitlines() if "NORM helped" in line)
    assert row.split()[2] == verdict and f"{mean:+.2f} [" in row


def test_one_seed_is_inconclusive_however_large(seeded, tmp_path):
    run_dir, _, _ = seeded
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "seeds")
    _set_top1(copy, 0.95, 0.60)  # +35 points, but from one seed
    s = _summary(copy)
    assert s["seeds"]["n"] == 1 and s["verdicts"]["norm_helped"] == "inconclusive"
    assert s["verdicts"]["norm_vs_baseline_ce_pts"] == pytest.approx(35.0)
    page = html.unescape((copy / "report.html").read_text())
    assert "+35.00 pts top-1, one seed" in page and "rests on one seed" in page


def test_seed_folders_of_another_config_are_not_counted(seeded, tmp_path):
    run_dir, _, _ = seeded
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    other = copy / "seeds" / "seed=1"
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["distill"]["epochs"] = 2  # its records were made with another config than its config.yaml says
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    s = _summary(copy)
    assert s["seeds"]["n"] == 1 and s["verdicts"]["norm_helped"] == "inconclusive"
    assert s["seeds"]["excluded"] == [{"seed": 1, "dir": "seeds/seed=1", "reason": "its distill stage is stale"}]
    page = html.unescape((copy / "report.html").read_text())
    assert "Not counted: seeds/seed=1 (seed 1): its distill stage is stale" in page.replace("<code>", "").replace("</code>", "")

    shutil.rmtree(copy)
    shutil.copytree(run_dir, copy)
    rec = json.loads((other / "distill" / "record.json").read_text())
    rec["config"]["distill"]["alpha"] = 0.5  # trained with another alpha than this run
    (other / "distill" / "record.json").write_text(json.dumps(rec))
    s = _summary(copy)
    assert s["seeds"]["n"] == 1 and "another config" in s["seeds"]["excluded"][0]["reason"]


def test_seeds_user_errors(tmp_path, tiny_data_root):
    for args, msg in ((["--seeds", "0,x"], "comma-separated integers"), (["--seeds", "0,1", "--to", "teacher"], "baseline and distill"),
                      (["--seeds", "1,1"], "twice"), (["--seeds", "0,1", "--set", "student.seed=2"], "use one of them")):
        res = _invoke(["run", "--run-dir", str(tmp_path / "r"), *args], [f"data.root={tiny_data_root}"], tmp_path)
        assert res.exit_code == 2 and msg in res.output, (args, res.output)
        assert "Traceback" not in res.output
    assert not (tmp_path / "r").exists()
