"""Caching, staleness, resume and the lock, on the real training stages with a tiny dataset."""
from __future__ import annotations

import json

import pytest

from pipeline import graph
from pipeline.config import load_config
from pipeline.rundir import RunDir
from pipeline.runner import Runner
from stages.lib.errors import PipelineError

TRAIN = ["data", "teacher", "baseline", "distill", "merge"]


def _run(cfg, run_dir, stages=TRAIN, force=False):
    r = Runner(cfg, run_dir, log=lambda m: None)
    return {s: r.run_stage(s, force=force).status for s in stages}, r


def test_cache_staleness_and_downstream_only(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    first, r = _run(cfg, tmp_path)
    assert set(first.values()) == {"done"}
    for s in TRAIN:
        rec = json.loads((tmp_path / s / "record.json").read_text())
        assert rec["status"] == "done" and rec["fingerprint"] and rec["outputs"]
        assert all(len(h) == 64 for h in rec["outputs"].values())
    assert (tmp_path / "distill" / "norm_student.pt").is_file() and not (tmp_path / "distill" / "ckpt").exists()
    assert _run(cfg, tmp_path)[0] == {s: "cached" for s in TRAIN}

    cfg2 = load_config(None, tiny_overrides + ["distill.epochs=2"])
    second, r2 = _run(cfg2, tmp_path)
    assert second == {"data": "cached", "teacher": "cached", "baseline": "cached", "distill": "done", "merge": "done"}
    assert r2.state(graph.get("merge")) == "done"
    # the old config now sees distill and merge as stale, the rest as done
    r_old = Runner(cfg, tmp_path, log=lambda m: None)
    assert [r_old.state(graph.get(s)) for s in TRAIN] == ["done", "done", "done", "stale", "stale"]
    forced, _ = _run(cfg2, tmp_path, stages=["merge"], force=True)
    assert forced == {"merge": "done"}


def test_tampered_artifact_is_flagged_and_rebuilt(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    _run(cfg, tmp_path, stages=["data"])
    p = tmp_path / "data" / "dataset.json"
    p.write_text(p.read_text().replace('"fashion_mnist"', '"fashion_mnist" '))
    assert RunDir(tmp_path).modified_files("data") == ["dataset.json"]
    assert _run(cfg, tmp_path, stages=["data"])[0] == {"data": "done"}
    assert RunDir(tmp_path).modified_files("data") == []


def test_missing_input_names_the_producing_stage(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    with pytest.raises(PipelineError, match=r"needs stage 'data'.*norm-pipeline stage data"):
        Runner(cfg, tmp_path).run_stage("teacher")


def test_resume_after_interruption(tmp_path, tiny_overrides, interrupt_teacher_in_epoch_2):
    cfg = load_config(None, tiny_overrides + ["teacher.epochs=3"])
    _run(cfg, tmp_path, stages=["data"])
    interrupt_teacher_in_epoch_2(cfg, tmp_path)
    assert not (tmp_path / "teacher").exists(), "an interrupted stage must not look finished"
    logs = []
    res = Runner(cfg, tmp_path, log=logs.append).run_stage("teacher")
    assert res.status == "done"
    assert any("resuming after epoch 1/3" in m for m in logs)
    hist = (tmp_path / "teacher" / "history.csv").read_text().strip().splitlines()
    assert [line.split(",")[0] for line in hist[1:]] == ["1", "2", "3"]


def test_lock_names_holder_pid(tmp_path):
    import os

    a, b = RunDir(tmp_path), RunDir(tmp_path)
    a.lock()
    try:
        with pytest.raises(PipelineError, match=f"pid {os.getpid()}"):
            b.lock()
    finally:
        a.unlock()
    b.lock()
    b.unlock()


def test_swapped_teacher_checkpoint_makes_teacher_stale(tmp_path, tiny_overrides):
    import torch

    from models.registry import create_model

    ckpt = tmp_path / "teacher.pt"
    torch.save(create_model("resnet8", num_classes=10, in_chans=1).state_dict(), ckpt)
    cfg = load_config(None, tiny_overrides + [f"teacher.checkpoint={ckpt}"])
    run_dir = tmp_path / "run"
    assert _run(cfg, run_dir, stages=["data", "teacher"])[0] == {"data": "done", "teacher": "done"}
    assert Runner(cfg, run_dir).state(graph.get("teacher")) == "done"
    torch.manual_seed(1)
    torch.save(create_model("resnet8", num_classes=10, in_chans=1).state_dict(), ckpt)  # same path, new weights
    assert Runner(cfg, run_dir).state(graph.get("teacher")) == "stale"


def test_cosine_lr_anneals_within_the_last_epoch():
    from stages.lib.training import TrainSpec, lr_at

    spec = TrainSpec(epochs=2, lr=0.1, schedule="cosine")
    assert lr_at(spec, 0) == pytest.approx(0.1)
    assert lr_at(spec, 1.0) == pytest.approx(0.05)
    assert lr_at(spec, 1.99) < 0.001
