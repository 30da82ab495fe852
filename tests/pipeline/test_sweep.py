"""`norm-pipeline sweep` end to end on tiny generated data: shared teacher, per-seed baseline, resume, figures."""
from __future__ import annotations

import html
import json
import math
import re
import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from tests.pipeline.test_seeds import same_weights

COMBOS = {(2, 0): "n=2_seed=0", (2, 1): "n=2_seed=1", (4, 0): "n=4_seed=0", (4, 1): "n=4_seed=1"}
T975_DF1 = 12.7062  # Student t, two-sided 95%, 1 degree of freedom (2 seeds)


def _invoke(args: list[str], overrides: list[str], folder: Path):
    """The CLI in this process, with the schema's defaults (not ./pipeline.yaml) under ``overrides``."""
    import signal

    cfg = folder / "defaults.yaml"
    cfg.write_text("{}\n")
    for o in overrides:
        args += ["--set", o]
    saved = signal.getsignal(signal.SIGTERM)
    try:
        return CliRunner().invoke(main, [*args, "-c", str(cfg)])
    finally:
        signal.signal(signal.SIGTERM, saved)


def _sweep(run_dir: Path, overrides: list[str]):
    return _invoke(["sweep", "--run-dir", str(run_dir), "--grid", "distill.n=2,4", "--seeds", "0,1"], overrides,
                   run_dir.parent)


def _rec(run_dir: Path, folder: str, stage: str) -> dict:
    return json.loads((run_dir / "sweep" / folder / stage / "record.json").read_text())


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_data_root):
    """A sweep over distill.n in {2, 4} x seeds {0, 1}, interrupted in its third run and then resumed."""
    from pipeline.graph import stage_module

    distill_stage = stage_module("distill")

    common = ["epochs=1", "batch_size=64", "lr=0.05"]
    overrides = ([f"data.root={tiny_data_root}", "teacher.model=resnet8", "student.model=resnet8", "data.eval_batch_size=64"]
                 + [f"{s}.{c}" for s in ("teacher", "baseline", "distill") for c in common])
    run_dir = tmp_path_factory.mktemp("sweep-run")
    real = distill_stage.run

    def killed_in_third_run(ctx):
        if "n=4_seed=0" in str(ctx.run_dir):
            raise KeyboardInterrupt
        return real(ctx)

    mp = pytest.MonkeyPatch()
    mp.setattr(distill_stage, "run", killed_in_third_run)
    try:
        first = _sweep(run_dir, overrides)
    finally:
        mp.undo()
    assert first.exit_code == 130, first.output
    assert not (run_dir / "sweep" / "sweep.json").exists()
    second = _sweep(run_dir, overrides)
    assert second.exit_code == 0, second.output
    return run_dir, overrides, second.output


def test_teacher_trained_once_and_baseline_once_per_seed(swept):
    run_dir, _, _ = swept
    recs = {k: {s: _rec(run_dir, folder, s) for s in ("data", "teacher", "baseline", "distill")} for k, folder in COMBOS.items()}
    teachers = [r["teacher"] for r in recs.values()]
    assert sum("restored" not in t for t in teachers) == 1, "the teacher must be trained exactly once"
    assert len({json.dumps(t["outputs"], sort_keys=True) for t in teachers}) == 1
    assert len({t["fingerprint"] for t in teachers}) == 1
    for seed in (0, 1):
        base = [recs[(n, seed)]["baseline"] for n in (2, 4)]
        assert sum("restored" not in b for b in base) == 1, f"baseline of seed {seed} must be trained exactly once"
        assert base[0]["outputs"] == base[1]["outputs"]
        assert base[0]["config"]["student"]["seed"] == seed
    folder = run_dir / "sweep"
    assert not same_weights(folder / COMBOS[(2, 0)] / "baseline/ce/model.pt", folder / COMBOS[(2, 1)] / "baseline/ce/model.pt"), \
        "another seed must give another student"
    for (n, seed), r in recs.items():  # every NORM student is its own
        assert "restored" not in r["distill"]
        assert r["distill"]["config"]["distill"]["n"] == n and r["distill"]["config"]["student"]["seed"] == seed
        assert r["teacher"]["config"]["run.seed"] == 0  # the teacher keeps run.seed
    data = json.loads((run_dir / "sweep" / "sweep.json").read_text())
    assert {k: len(v) for k, v in data["trained_in"].items()} == {"data": 1, "teacher": 1, "baseline": 2, "distill": 4}


def _expected(run_dir: Path) -> dict:
    """Per n: mean and CI of NORM, baseline and the paired difference, computed here from the records."""
    out = {}
    for n in (2, 4):
        norm = [_rec(run_dir, COMBOS[(n, s)], "distill")["metrics"]["top1"] for s in (0, 1)]
        base = [_rec(run_dir, COMBOS[(n, s)], "baseline")["metrics"]["ce_top1"] for s in (0, 1)]
        diff = [(a - b) * 100 for a, b in zip(norm, base, strict=True)]
        half = T975_DF1 * statistics.stdev(diff) / math.sqrt(2)
        out[n] = {"norm": statistics.mean(norm), "base": statistics.mean(base), "diff": statistics.mean(diff),
                  "lo": statistics.mean(diff) - half, "hi": statistics.mean(diff) + half,
                  "norm_half": T975_DF1 * statistics.stdev(norm) / math.sqrt(2)}
    return out


def test_json_table_and_html_hold_the_means(swept):
    from rich.console import Console

    from pipeline.sweep import terminal_table

    run_dir, _, output = swept
    exp = _expected(run_dir)
    data = json.loads((run_dir / "sweep" / "sweep.json").read_text())
    assert data["grid"] == {"distill.n": [2, 4]} and data["seeds"] == [0, 1]
    combos = {c["combo"]["distill.n"]: c for c in data["combinations"]}
    for n, e in exp.items():
        c = combos[n]
        assert c["n"] == 2 and c["seeds"] == [0, 1]
        assert c["norm_top1"]["mean"] == pytest.approx(e["norm"]) and c["baseline_ce_top1"]["mean"] == pytest.approx(e["base"])
        assert c["diff_pts"]["mean"] == pytest.approx(e["diff"])
        assert c["diff_pts"]["lo"] == pytest.approx(e["lo"], abs=1e-3) and c["diff_pts"]["hi"] == pytest.approx(e["hi"], abs=1e-3)
        assert c["verdict"] == ("yes" if e["lo"] > 0 else "no" if e["hi"] < 0 else "inconclusive")
    best = max(exp, key=lambda n: exp[n]["norm"])
    assert [c["best"] for c in data["combinations"]] == [n == best for n in (2, 4)]
    assert data["best"] == f"n={best}"

    console = Console(width=250, record=True)
    console.print(terminal_table(data))
    table = console.export_text()
    page = html.unescape((run_dir / "sweep" / "sweep.html").read_text())
    for n, e in exp.items():
        norm = f"{e['norm'] * 100:.2f}% ± {e['norm_half'] * 100:.2f}"
        diff = f"{e['diff']:+.2f} [{e['lo']:+.2f}, {e['hi']:+.2f}]"
        row = next(line for line in table.splitlines() if f"n={n} " in line)
        assert norm in row and diff in row and (("★" in row) == (n == best)), row
        assert norm in page and diff in page
    assert "sweep.html" in output and "NORM sweep" in page and "★" in page
    sources = re.findall(r'\bsrc="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)  # self-contained, with the plot
    assert "http" not in "".join(re.findall(r'href="([^"]*)"', page))


def test_rerun_is_instant(swept, monkeypatch):
    from stages.lib import training

    run_dir, overrides, _ = swept
    before = (run_dir / "sweep" / "sweep.json").read_text()

    def no_training(*a, **k):
        raise AssertionError("a finished sweep trained again")

    monkeypatch.setattr(training, "fit", no_training)
    res = _sweep(run_dir, overrides)
    assert res.exit_code == 0, res.output
    assert "done in" not in res.output and "restored" not in res.output
    after = json.loads((run_dir / "sweep" / "sweep.json").read_text())
    assert after["combinations"] == json.loads(before)["combinations"]


def test_sweep_user_errors_are_one_line(tmp_path, tiny_data_root):
    for args, msg in ((["--grid", "distill.nn=1,2"], "unknown key"), (["--grid", "student.seed=1,2"], "--seeds"),
                      (["--grid", "distill.n"], "expected section.key=value1"), (["--to", "teacher"], "baseline and distill"),
                      (["--seeds", "0,a"], "comma-separated integers"), (["--grid", "distill.n=2,2"], "repeated"),
                      (["--seeds", "0,1", "--set", "student.seed=3"], "use one of them")):
        res = _invoke(["sweep", "--run-dir", str(tmp_path / "r"), *args], [f"data.root={tiny_data_root}"], tmp_path)
        assert res.exit_code == 2 and msg in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert not (tmp_path / "r" / "sweep").exists() or not any((tmp_path / "r" / "sweep").glob("*seed*"))
