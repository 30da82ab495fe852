"""The training loop's resume path: an interrupted and resumed run must train exactly the model an
uninterrupted run trains (weights, BatchNorm statistics, optimizer momentum, lr schedule), not merely log
the right epoch numbers."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as functional

from models.distillers import CE
from stages.lib.datasets import TensorSplit
from stages.lib.training import TrainSpec, evaluate, fit

EPOCHS = 4


def _tiny_net(seed: int) -> nn.Module:
    """Conv + BatchNorm (so buffers matter) + linear head; ``seed`` gives each instance its own init."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, 4))


def _splits() -> tuple[TensorSplit, TensorSplit]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (80, 1, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 4, (80,), generator=g)
    common = dict(mean=torch.tensor([0.45]), std=torch.tensor([0.3]))
    train = TensorSplit(x, y, batch_size=16, shuffle=True, augment=True, padding=1, hflip=True, seed=3, **common)
    val = TensorSplit(x[:32], y[:32], batch_size=32, **common)
    return train, val


def read_history(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) if v != "" else None for k, v in row.items()} for row in csv.DictReader(f)]


def _train(model: nn.Module, out: Path, snapshots: dict[int, dict], stop_in_epoch: int | None = None) -> dict:
    """fit() recording the weights after each epoch's training; KeyboardInterrupt inside ``stop_in_epoch``."""

    def after_epoch(epoch: int) -> dict:
        if epoch == stop_in_epoch:
            raise KeyboardInterrupt  # Ctrl-C after epoch ``stop_in_epoch``'s steps, before its checkpoint
        snapshots[epoch] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {}

    train, val = _splits()
    spec = TrainSpec(epochs=EPOCHS, lr=0.1, momentum=0.9, weight_decay=5e-4, milestones=[0.5], lr_decay=0.1)
    return fit(distiller=CE(model), train=train, val=val, spec=spec, out_dir=out, device="cpu", label="tiny",
               log=lambda m: None, extra_row=after_epoch)


def test_resumed_weights_equal_an_uninterrupted_runs(tmp_path):
    full: dict[int, dict] = {}
    expected = _train(_tiny_net(0), tmp_path / "full", full)

    part: dict[int, dict] = {}
    with pytest.raises(KeyboardInterrupt):
        _train(_tiny_net(0), tmp_path / "resumed", part, stop_in_epoch=2)
    assert sorted(part) == [0, 1] and (tmp_path / "resumed" / "ckpt" / "last.pt").is_file()
    for epoch in part:  # same seed, same data order: the first epochs match before any resume
        assert all(torch.equal(part[epoch][k], full[epoch][k]) for k in full[epoch]), epoch

    logs: list[str] = []
    resumed: dict[int, dict] = {}
    model = _tiny_net(7)  # a new process builds a freshly initialised model: resume must overwrite it
    train, val = _splits()
    spec = TrainSpec(epochs=EPOCHS, lr=0.1, momentum=0.9, weight_decay=5e-4, milestones=[0.5], lr_decay=0.1)
    got = fit(distiller=CE(model), train=train, val=val, spec=spec, out_dir=tmp_path / "resumed", device="cpu",
              label="tiny", log=logs.append,
              extra_row=lambda e: resumed.__setitem__(e, {k: v.detach().clone() for k, v in model.state_dict().items()}) or {})
    assert any("resuming after epoch 2/4" in line for line in logs), logs
    assert sorted(resumed) == [2, 3], "the resumed run must start at the first unfinished epoch"
    for epoch in (2, 3):
        for k, v in full[epoch].items():
            assert torch.equal(resumed[epoch][k], v), f"after epoch {epoch + 1}, {k} differs from the uninterrupted run"
    assert got["top1"] == expected["top1"] and got["best_top1"] == expected["best_top1"]
    assert got["best_epoch"] == expected["best_epoch"]
    # the reported top-1 is the last epoch's validation accuracy of this very model
    assert got["top1"] == pytest.approx(read_history(tmp_path / "resumed" / "history.csv")[-1]["val_top1"], abs=1e-6)
    assert got["top1"] == evaluate(model, val)["top1"]


def test_evaluate_counts_top1_top5_and_the_loss():
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5, 0], [0.0, 9, 8, 7, 6, 5, 4], [1.0, 2, 3, 4, 5, 6, 7]])
    y = torch.tensor([0, 2, 0])  # right; second guess (top-5, not top-1); last place (neither)
    got = evaluate(lambda x: x, [(logits[:2], y[:2]), (logits[2:], y[2:])])
    assert got["top1"] == pytest.approx(1 / 3) and got["top5"] == pytest.approx(2 / 3)
    assert got["loss"] == pytest.approx(functional.cross_entropy(logits, y).item(), rel=1e-6)


def _fit_val_every(out: Path, val_every: int, epochs: int = 5, stop_in_epoch: int | None = None) -> tuple[dict, nn.Module, list]:
    """fit() with ``val_every``; returns (metrics, model, epochs evaluated), the evaluations counted by a wrapper."""
    model = _tiny_net(0)
    distiller = CE(model)
    evaluated: list[int] = []
    current = {"epoch": -1}
    plain = distiller.forward_test

    def counting_forward_test(x):  # bound per instance: fit() evaluates through distiller.forward_test
        if not evaluated or evaluated[-1] != current["epoch"]:
            evaluated.append(current["epoch"])
        return plain(x)

    distiller.forward_test = counting_forward_test  # type: ignore[method-assign]

    def mark(epoch: int) -> dict:
        if epoch == stop_in_epoch:
            raise KeyboardInterrupt
        current["epoch"] = epoch
        return {}

    train, val = _splits()
    spec = TrainSpec(epochs=epochs, lr=0.1, momentum=0.9, weight_decay=5e-4, milestones=[0.5], val_every=val_every)
    got = fit(distiller=distiller, train=train, val=val, spec=spec, out_dir=out, device="cpu", label="tiny",
              log=lambda m: None, extra_row=mark)
    return got, model, evaluated


@pytest.mark.parametrize("val_every, expected", [(1, [0, 1, 2, 3, 4]), (2, [1, 3, 4]), (0, [4])])
def test_val_every_evaluates_those_epochs_and_always_the_last(tmp_path, val_every, expected):
    got, model, evaluated = _fit_val_every(tmp_path / "run", val_every)
    assert evaluated == expected
    rows = read_history(tmp_path / "run" / "history.csv")
    assert [i for i, r in enumerate(rows) if r["val_top1"] is not None] == expected
    assert all(r["epoch_s"] is not None for r in rows), "every epoch keeps its row and time"
    assert got["top1"] == evaluate(model, _splits()[1])["top1"]  # the last epoch is always evaluated
    assert got["best_epoch"] - 1 in expected


def test_skipping_evaluations_leaves_the_trained_weights_unchanged(tmp_path):
    _, every, _ = _fit_val_every(tmp_path / "every", 1)
    _, last, _ = _fit_val_every(tmp_path / "last", 0)
    for k, v in every.state_dict().items():
        assert torch.equal(last.state_dict()[k], v), k


def test_val_every_resumes_with_the_same_schedule(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _fit_val_every(tmp_path / "run", 2, stop_in_epoch=2)
    got, _, evaluated = _fit_val_every(tmp_path / "run", 2)
    assert evaluated == [3, 4]  # 0-based: epoch 2 (the first after the resume) is not evaluated, 3 and the last are
    rows = read_history(tmp_path / "run" / "history.csv")
    assert [i for i, r in enumerate(rows) if r["val_top1"] is not None] == [1, 3, 4]
    assert got["best_epoch"] in (2, 4, 5)


def test_inf_weights_after_an_unevaluated_epoch_are_not_saved(tmp_path):
    """Without an evaluation after epoch 2 (val_every=0), its inf weights must still stop the run before they are
    checkpointed: the last good checkpoint (epoch 1) stays."""
    from stages.lib.errors import TrainingDiverged

    model = _tiny_net(0)

    def poison(epoch: int) -> dict:
        if epoch == 1:  # after epoch 2's steps, before its checkpoint: as a finite last step that overflowed
            with torch.no_grad():
                model[0].weight[0, 0, 0, 0] = float("inf")
        return {}

    train, val = _splits()
    spec = TrainSpec(epochs=4, lr=0.1, momentum=0.9, val_every=0)
    with pytest.raises(TrainingDiverged, match=r"a weight became nan/inf in epoch 2; the last good checkpoint \(epoch 1\)"):
        fit(distiller=CE(model), train=train, val=val, spec=spec, out_dir=tmp_path, device="cpu", label="tiny",
            log=lambda m: None, extra_row=poison)
    state = torch.load(tmp_path / "ckpt" / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert len(read_history(tmp_path / "history.csv")) == 1
