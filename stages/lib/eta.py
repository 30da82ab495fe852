"""Time left: for a training stage from its own speed so far, for the whole run from a cost model.

``StageEta`` times a training stage's batches and per-epoch evaluations and extrapolates the rest of the
stage. ``RunEta`` (one per process, ``RUN``) holds the run's plan: each stage's cost in FLOPs (training:
epochs x (train images x 3 forward passes + validation images x 1), the frozen teacher's forward included)
and a few fixed seconds for the stages that do not scale with FLOPs. The seconds per FLOP come from the
training stage running now (its own ETA) or the last one that finished, so the run's ETA follows this
machine's real speed. Pure Python: nothing here imports torch until a plan is built.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

# seconds, for stages whose time does not follow FLOPs (ONNX exports, timing loops, file hashing); rough
FIXED_SECONDS = {"data": 1.0, "merge": 1.0, "verify": 3.0, "export": 10.0, "engine": 0.0, "benchmark": 12.0,
                 "bundle": 1.0}
TRAINING = ("teacher", "baseline", "distill")


def fmt_eta(seconds: Optional[float]) -> str:
    """'1:05' / '1:02:03'; '?' while unknown."""
    if seconds is None:
        return "?"
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


@dataclass
class StageEta:
    """A training stage's remaining time from its own speed so far.

    ``eval_weight``: the cost of one evaluation batch relative to one training batch, used until the
    first evaluation has been timed (default: eval images / train images per batch, forward only = 1/3).
    """

    epochs: int
    batches: int
    eval_batches: int
    start_epoch: int = 0
    eval_weight: float = 1 / 3
    evals: Optional[int] = None  # evaluations from start_epoch to the end (None: one per epoch)
    clock: Callable[[], float] = time.perf_counter
    _train_s: float = 0.0
    _batches_done: int = 0
    _eval_s: list[float] = field(default_factory=list)
    _evals_done: int = 0
    _t: Optional[float] = None
    _started: Optional[float] = None

    def start_batches(self) -> None:
        self._t = self.clock()
        if self._started is None:
            self._started = self._t

    def batch_done(self) -> None:
        now = self.clock()
        if self._t is not None:
            self._train_s += now - self._t
        self._batches_done += 1
        self._t = now

    def eval_started(self) -> None:
        self._t = self.clock()

    def eval_done(self) -> None:
        if self._t is not None:
            self._eval_s.append(self.clock() - self._t)
        self._evals_done += 1
        self._t = None

    @property
    def elapsed(self) -> float:
        return 0.0 if self._started is None else self.clock() - self._started

    def remaining(self) -> Optional[float]:
        """Seconds left in this stage (None until a batch has been timed)."""
        if self._batches_done == 0:
            return None
        per_batch = self._train_s / self._batches_done
        per_eval = (sum(self._eval_s) / len(self._eval_s) if self._eval_s
                    else self.eval_batches * self.eval_weight * per_batch)
        epochs_left = self.epochs - self.start_epoch
        batches_left = epochs_left * self.batches - self._batches_done
        evals_left = max(0, (epochs_left if self.evals is None else self.evals) - self._evals_done)
        return max(0.0, batches_left * per_batch + evals_left * per_eval)


@dataclass
class RunEta:
    """The whole run's ETA: the current stage's own estimate plus the planned cost of the stages after it."""

    order: list[str] = field(default_factory=list)
    flops: dict[str, float] = field(default_factory=dict)  # stage -> FLOPs of its work (0 = fixed cost only)
    done: set[str] = field(default_factory=set)
    current: Optional[str] = None
    seconds_per_flop: Optional[float] = None
    _stage_started: Optional[float] = None
    clock: Callable[[], float] = time.perf_counter

    def plan(self, order: list[str], flops: dict[str, float]) -> None:
        self.order, self.flops = list(order), dict(flops)

    def begin(self, stage: str) -> None:
        self.current, self._stage_started = stage, self.clock()

    def end(self, stage: str, seconds: Optional[float] = None, ran: bool = True) -> None:
        """A stage finished (``ran``=False: cached or skipped, its seconds say nothing about speed)."""
        self.done.add(stage)
        if ran and seconds and stage in TRAINING and self.flops.get(stage):
            self.seconds_per_flop = seconds / self.flops[stage]
        self.current = None

    def stage_progress(self, stage_seconds_total: float, share: float = 1.0) -> None:
        """The running training stage predicts its total seconds (elapsed + its own ETA) for ``share`` of its
        planned work (a resumed stage runs only its remaining epochs): calibrate the speed on it."""
        if self.current in TRAINING and self.flops.get(self.current) and stage_seconds_total > 0 and share > 0:
            self.seconds_per_flop = stage_seconds_total / (self.flops[self.current] * share)

    def estimate(self, stage: str) -> Optional[float]:
        if stage not in self.flops and stage not in FIXED_SECONDS:
            return None
        flops = self.flops.get(stage, 0.0)
        if flops and self.seconds_per_flop is None:
            return None
        return flops * (self.seconds_per_flop or 0.0) + FIXED_SECONDS.get(stage, 0.0)

    def after_current(self) -> Optional[float]:
        """Seconds planned for the stages after the current one (None while the speed is unknown)."""
        if not self.order:
            return None
        start = self.order.index(self.current) + 1 if self.current in self.order else 0
        total = 0.0
        for s in self.order[start:]:
            if s in self.done:
                continue
            est = self.estimate(s)
            if est is None:
                return None
            total += est
        return total

    def total(self, current_remaining: Optional[float]) -> Optional[float]:
        """The run's remaining seconds: the current stage's own ETA + the stages after it."""
        after = self.after_current()
        if after is None:
            return None
        if current_remaining is None:
            if self.current is None:
                return after
            est = self.estimate(self.current)
            if est is None:
                return None
            started = self.clock() if self._stage_started is None else self._stage_started
            current_remaining = max(0.0, est - (self.clock() - started))
        return current_remaining + after


RUN = RunEta()


def reset() -> RunEta:
    """A fresh plan for a new run in this process."""
    global RUN
    RUN = RunEta()
    return RUN


def current() -> RunEta:
    return RUN


def plan_flops(cfg, meta: dict, stages: list[str]) -> dict[str, float]:
    """FLOPs of each FLOP-bound stage of ``stages`` (training, verify) for ``cfg`` on the dataset ``meta``.

    Training: epochs x train images x (3 x student forward [+ teacher forward]) + evaluations (``val_every``)
    x val images x forward.
    """
    from models.norm import LogitsOnly, NormStudent
    from models.registry import create_model
    from stages.lib.training import evaluations_in as evals  # a config section carries epochs and val_every

    shape = [1, meta["in_chans"], *meta["input_size"]]
    ntrain, nval = float(meta["train_size"]), float(meta["val_size"])
    teacher = create_model(cfg.teacher.model, num_classes=meta["num_classes"], in_chans=meta["in_chans"])
    student = create_model(cfg.student.model, num_classes=meta["num_classes"], in_chans=meta["in_chans"])
    f_t, f_s = conv_linear_flops(teacher, shape), conv_linear_flops(student, shape)
    ns = NormStudent(create_model(cfg.student.model, num_classes=meta["num_classes"], in_chans=meta["in_chans"]),
                     teacher.num_features, n=cfg.distill.n, residual=cfg.distill.residual)
    f_ns = conv_linear_flops(LogitsOnly(ns), shape)
    out: dict[str, float] = {}
    if "teacher" in stages:
        out["teacher"] = (nval * f_t if cfg.teacher.checkpoint is not None
                          else cfg.teacher.epochs * ntrain * 3 * f_t + evals(cfg.teacher) * nval * f_t)
    if "baseline" in stages:
        b = cfg.baseline
        out["baseline"] = sum(b.epochs * ntrain * (3 * f_s + (f_t if m == "kd" else 0.0)) + evals(b) * nval * f_s
                              for m in b.methods)
    if "distill" in stages:
        d = cfg.distill
        out["distill"] = d.epochs * ntrain * (3 * f_ns + f_t) + evals(d) * nval * f_ns
    if "verify" in stages:
        out["verify"] = nval * (f_s + f_ns)
    return out



def conv_linear_flops(model, input_shape: list[int]) -> float:
    """FLOPs (2 per multiply-add) of the convolutions and linear layers in one forward pass, from forward hooks.

    The same figure as torch's FlopCounterMode for these networks, without importing its dispatch machinery
    (seconds on a 2-core machine) just to plan an ETA.
    """
    import torch
    import torch.nn as nn

    total = [0.0]

    def hook(m, inputs, out):
        if isinstance(m, nn.Conv2d):
            k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        else:
            k = m.in_features
        total[0] += 2.0 * out.numel() * k

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(*input_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total[0]
