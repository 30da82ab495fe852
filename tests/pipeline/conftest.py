from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def tiny_overrides(tiny_data_root):
    """A training setup that runs in seconds on the tiny generated dataset."""
    common = ["epochs=1", "batch_size=64", "lr=0.05"]
    return ([f"data.root={tiny_data_root}", "teacher.model=resnet8", "student.model=resnet8", "distill.n=2",
             "data.eval_batch_size=64"]
            + [f"{s}.{c}" for s in ("teacher", "baseline", "distill") for c in common])


@pytest.fixture
def interrupt_teacher_in_epoch_2(monkeypatch):
    """Run the teacher stage and Ctrl-C it while epoch 2 evaluates (epoch 1's checkpoint is on disk)."""

    def run(cfg, run_dir: Path) -> None:
        from pipeline.runner import Runner
        from stages.lib import training

        real_eval, calls = training.evaluate, {"n": 0}

        def interrupt_in_epoch_2(*a, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            return real_eval(*a, **k)

        monkeypatch.setattr(training, "evaluate", interrupt_in_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            Runner(cfg, run_dir, log=lambda m: None).run_stage("teacher")
        monkeypatch.setattr(training, "evaluate", real_eval)
        assert (run_dir / ".teacher.work" / "ckpt" / "last.pt").is_file()

    return run
