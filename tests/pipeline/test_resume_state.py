"""Resume through the runner and a real training stage: the model a resumed stage writes is the model an
uninterrupted run writes (log lines and epoch numbers alone cannot tell a run that restarted from fresh
weights)."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import load_config
from pipeline.runner import Runner


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_resumed_teacher_equals_an_uninterrupted_one(tmp_path, tiny_overrides, monkeypatch):
    import stages.lib.training as T

    cfg = load_config(None, tiny_overrides + ["teacher.epochs=2", "data.train_limit=128"])
    full, cut = tmp_path / "full", tmp_path / "cut"
    for rd in (full, cut):
        Runner(cfg, rd, log=lambda m: None).run_stage("data")
    assert Runner(cfg, full, log=lambda m: None).run_stage("teacher").status == "done"

    real_eval, calls = T.evaluate, {"n": 0}

    def interrupt_in_epoch_2(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_eval(*a, **k)

    monkeypatch.setattr(T, "evaluate", interrupt_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        Runner(cfg, cut, log=lambda m: None).run_stage("teacher")
    monkeypatch.setattr(T, "evaluate", real_eval)
    logs: list[str] = []
    assert Runner(cfg, cut, log=logs.append).run_stage("teacher").status == "done"
    assert any("resuming after epoch 1/2" in m for m in logs), logs

    a, b = _weights(full / "teacher" / "model.pt"), _weights(cut / "teacher" / "model.pt")
    assert a.keys() == b.keys() and any(k.endswith("weight") for k in a)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"the resumed teacher differs from the uninterrupted one in {differ[:5]}"
    hist = [(full / "teacher" / "history.csv").read_text(), (cut / "teacher" / "history.csv").read_text()]
    drop_time = [[ln.rsplit(",", 1)[0] for ln in h.splitlines()] for h in hist]  # epoch_s is the last column
    assert drop_time[0] == drop_time[1]
