"""Resume through the runner and a real training stage: the model a resumed stage writes is the model an
uninterrupted run writes (log lines and epoch numbers alone cannot tell a run that restarted from fresh
weights), and leftovers of another configuration are never resumed from."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.runner import Runner


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _same_teacher(a_dir: Path, b_dir: Path) -> None:
    a, b = _weights(a_dir / "teacher" / "model.pt"), _weights(b_dir / "teacher" / "model.pt")
    assert a.keys() == b.keys() and any(k.endswith("weight") for k in a)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"the teacher differs from the uninterrupted run's in {differ[:5]}"
    rows = [[ln.rsplit(",", 1)[0] for ln in (d / "teacher" / "history.csv").read_text().splitlines()]
            for d in (a_dir, b_dir)]  # every column but the last, epoch_s (a time)
    assert rows[0] == rows[1]


@pytest.fixture
def setup(tmp_path, tiny_overrides):
    """(cfg, folder of an uninterrupted 2-epoch teacher run, a fresh run folder with the data stage done)."""
    cfg = load_config(None, tiny_overrides + ["teacher.epochs=2", "data.train_limit=128"])
    full, other = tmp_path / "full", tmp_path / "other"
    for rd in (full, other):
        Runner(cfg, rd, log=lambda m: None).run_stage("data")
    assert Runner(cfg, full, log=lambda m: None).run_stage("teacher").status == "done"
    return cfg, full, other


def test_resumed_teacher_equals_an_uninterrupted_one(setup, interrupt_teacher_in_epoch_2):
    cfg, full, cut = setup
    interrupt_teacher_in_epoch_2(cfg, cut)
    logs: list[str] = []
    assert Runner(cfg, cut, log=logs.append).run_stage("teacher").status == "done"
    assert any("resuming after epoch 1/2" in m for m in logs), logs
    _same_teacher(full, cut)


def test_an_interrupted_run_of_another_config_is_not_resumed(setup, interrupt_teacher_in_epoch_2):
    cfg, full, rd = setup
    other = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"lr": 0.2})})
    interrupt_teacher_in_epoch_2(other, rd)  # leaves an lr=0.2 checkpoint in .teacher.work
    logs: list[str] = []
    assert Runner(cfg, rd, log=logs.append).run_stage("teacher").status == "done"
    assert not any("resuming" in m for m in logs), logs
    _same_teacher(full, rd)
