"""torchrun + DDP with gloo on this CPU: `run --nproc 2` end to end, and resume across world sizes.

The 2-process runs go through the real CLI and the real launcher (``python -m torch.distributed.run``);
the 1-process runs use the Runner in-process (same code path as `norm-pipeline run` without --nproc).
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
import torch

from pipeline.config import load_config
from pipeline.rundir import RunDir
from pipeline.runner import Runner

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["data", "teacher", "baseline", "distill", "merge"]


@pytest.fixture
def cfg_file(tmp_path) -> Path:
    """An explicit (empty) config file, so the CLI does not pick up the repository's ./pipeline.yaml."""
    p = tmp_path / "tiny.yaml"
    p.write_text("run:\n  seed: 0\n")
    return p


@pytest.fixture
def overrides(tiny_data_root) -> list[str]:
    """Tiny but real: 256 train images, an odd number of val images (uneven eval shards), KD baseline too."""
    common = ["epochs=1", "batch_size=64", "lr=0.05"]
    return ([f"data.root={tiny_data_root}", "data.val_limit=101", "data.eval_batch_size=64", "teacher.model=resnet8",
             "student.model=resnet8", "distill.n=2", "baseline.methods=[ce, kd]", "run.device=cpu"]
            + [f"{s}.{c}" for s in ("teacher", "baseline", "distill") for c in common])


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    env.pop("NORM_PIPELINE_LOCK_HELD", None)
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _layout(run_dir: Path) -> dict[str, list[str]]:
    return {s: sorted(p.relative_to(run_dir / s).as_posix() for p in (run_dir / s).rglob("*") if p.is_file())
            for s in TRAIN}


def _history(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _val_top1(model: Callable[[torch.Tensor], torch.Tensor], run_dir: Path) -> float:
    """Top-1 of ``model`` on the whole val split in this (single) process."""
    from stages.lib.datasets import val_batches

    meta = json.loads((run_dir / "data" / "dataset.json").read_text())
    correct = total = 0
    with torch.no_grad():
        for x, y in val_batches(meta, batch_size=64):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    assert total == 101
    return correct / total


def test_nproc2_run_matches_single_process_layout(tmp_path, overrides, cfg_file):
    from stages.lib.checkpoints import load_model, load_norm_student

    two, one = tmp_path / "two", tmp_path / "one"
    proc = _cli("run", "--nproc", "2", "--to", "merge", "-c", str(cfg_file), "--run-dir", str(two), *_sets(overrides))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runner = Runner(load_config(cfg_file, overrides), one, log=lambda m: None)
    assert [runner.run_stage(s).status for s in TRAIN] == ["done"] * 5

    assert _layout(two) == _layout(one)
    assert "ce/model.pt" in _layout(two)["baseline"] and "kd/model.pt" in _layout(two)["baseline"]
    assert not list(two.glob(".*.work")), "every stage must have been committed by rank 0"
    for s in TRAIN:
        r1, r2 = (json.loads((d / s / "record.json").read_text()) for d in (one, two))
        assert set(r2) == set(r1) and r2["status"] == "done"
        assert set(r2["metrics"]) == set(r1["metrics"])
        assert set(r2["outputs"]) == set(r1["outputs"]), "a rank other than 0 wrote a file"
    # one log line per epoch: ranks > 0 stay quiet
    assert proc.stdout.count("teacher resnet8 epoch 1/1") == 1
    # metrics are reduced over both ranks' (uneven, 51 + 50) val shards, on exactly the model rank 0 saved
    teacher, _ = load_model(two / "teacher" / "model.pt")
    rec = json.loads((two / "teacher" / "record.json").read_text())
    assert rec["metrics"]["top1"] == pytest.approx(_val_top1(teacher, two), abs=1e-9)
    ns, _ = load_norm_student(two / "distill" / "norm_student.pt")
    rec = json.loads((two / "distill" / "record.json").read_text())
    assert rec["metrics"]["top1"] == pytest.approx(_val_top1(lambda x: ns(x)[0], two), abs=1e-9)
    # the parent released its lock; nothing was left holding it
    rd = RunDir(two)
    rd.lock()
    rd.unlock()
    # a second `run --nproc 2` finds everything cached and launches nothing
    again = _cli("run", "--nproc", "2", "--to", "merge", "-c", str(cfg_file), "--run-dir", str(two), *_sets(overrides))
    assert again.returncode == 0 and "epoch 1/1" not in again.stdout
    assert again.stdout.count("skipped (cached)") >= 5


LAUNCHER = """
import sys
from stages.lib import training

real, calls = training.evaluate, {"n": 0}


def evaluate(*args, **kwargs):  # Ctrl-C while evaluating the second epoch this process trains
    calls["n"] += 1
    if calls["n"] == 2:
        raise KeyboardInterrupt
    return real(*args, **kwargs)


training.evaluate = evaluate
from pipeline.cli import main

sys.argv[0] = "norm-pipeline"
main()
"""


def test_resume_across_world_sizes(tmp_path, overrides, cfg_file, interrupt_teacher_in_epoch_2):
    """1 process trains epoch 1 and is interrupted; 2 processes resume, train epoch 2 and are interrupted;
    1 process resumes again and finishes epoch 3. History and checkpoints carry over both ways."""
    sets = [o for o in overrides if not o.startswith("teacher.epochs")] + ["teacher.epochs=3"]
    cfg = load_config(cfg_file, sets)
    assert Runner(cfg, tmp_path, log=lambda m: None).run_stage("data").status == "done"
    work = tmp_path / ".teacher.work"

    # 1 process: interrupted while evaluating epoch 2 (epoch 1's checkpoint is on disk)
    interrupt_teacher_in_epoch_2(cfg, tmp_path)
    assert [r["epoch"] for r in _history(work / "history.csv")] == ["1"]
    row1 = _history(work / "history.csv")[0]

    # 2 processes (real torchrun): resume after epoch 1, train epoch 2, interrupted while evaluating epoch 3
    launcher = tmp_path / "launcher.py"
    launcher.write_text(textwrap.dedent(LAUNCHER))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("NORM_PIPELINE_LOCK_HELD", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(launcher), "stage", "teacher", "-c", str(cfg_file), "--run-dir", str(tmp_path),
                           *_sets(sets)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "resuming after epoch 1/3" in out, out[-3000:]
    assert out.count("resuming after epoch 1/3") == 1, "only rank 0 logs"
    hist = _history(work / "history.csv")
    assert [r["epoch"] for r in hist] == ["1", "2"] and hist[0] == row1
    assert torch.load(work / "ckpt" / "last.pt", weights_only=True)["epoch"] == 1  # 0-based: epoch 2 done

    # 1 process again: resume after epoch 2 and finish
    logs: list[str] = []
    assert Runner(cfg, tmp_path, log=logs.append).run_stage("teacher").status == "done"
    assert any("resuming after epoch 2/3" in m for m in logs)
    hist = _history(tmp_path / "teacher" / "history.csv")
    assert [r["epoch"] for r in hist] == ["1", "2", "3"] and hist[0] == row1
    assert not work.exists()


def test_more_processes_than_gpus_is_a_one_line_error(monkeypatch):
    from stages.lib import dist
    from stages.lib.errors import PipelineError

    for k, v in {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(PipelineError, match="4 processes on this host need one GPU each, but 2 are visible"):
        dist.init("cuda")


def test_the_runner_releases_followers_before_a_distributed_stage_and_prepare_does_not(tmp_path, overrides,
                                                                                        monkeypatch):
    """The torchrun handshake (join the group, release the waiting ranks with rank 0's context) happens once,
    in the runner, before a distributed stage's function runs; training.prepare() only reads rank and device."""
    from pipeline.graph import stage_module
    from stages.lib import dist, training

    cfg = load_config(None, overrides)
    runner = Runner(cfg, tmp_path, log=lambda m: None)
    events: list = []
    monkeypatch.setattr(dist, "start_stage", lambda device, payload: events.append(("start", payload)) or device)
    assert runner.run_stage("data").status == "done" and events == []  # not a distributed stage

    for name in ("init", "release_followers"):  # prepare() must not touch the process group any more
        monkeypatch.setattr(dist, name, lambda *a, _n=name: pytest.fail(f"prepare() called dist.{_n}"))

    def run(ctx):
        events.append(("stage", ctx.out_dir))
        p = training.prepare(ctx, ctx.cfg.teacher, 0)
        for rel in ("model.pt", "history.csv"):  # the teacher's declared outputs, so the runner records it
            (ctx.out_dir / rel).write_bytes(b"")
        return {"device": p.device}

    monkeypatch.setattr(stage_module("teacher"), "run", run)
    result = runner.run_stage("teacher")
    assert result.status == "done" and result.metrics == {"device": "cpu"}
    assert [e[0] for e in events] == ["start", "stage"]
    payload = events[0][1]
    assert payload["run"] is True and payload["out_dir"] == str(events[1][1]) and payload["force"] is False
    assert payload["inputs"] == {"data": str(tmp_path / "data")} and set(payload["input_records"]) == {"data"}
