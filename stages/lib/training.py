"""One training loop for teacher, baseline and distill: resumable, AMP, channels_last, DDP-aware.

The stage supplies a distiller (models/distillers.py: ``forward_train(x, y, epoch) -> (logits, {"ce": ...,
"kd": ..., "norm": ...})``); the loop handles the optimiser, the lr schedule, progress, evaluation, per-epoch
checkpoints (resume from the last finished epoch) and NaN/inf detection (stop, keep the last good checkpoint,
say which epoch). Checkpoint files, history.csv and the progress display live in stages/lib/fit_io.py.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Protocol, Union

import torch
import torch.nn as nn

from stages.lib import dist
from stages.lib.errors import PipelineError, TrainingDiverged
from stages.lib.fit_io import Checkpointer, diverged_message, eta_info, progress_display, stage_clock, write_history


@dataclass
class TrainSpec:
    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "step"
    milestones: list[float] = field(default_factory=lambda: [0.625, 0.75, 0.875])
    lr_decay: float = 0.1
    warmup_epochs: int = 0
    amp: str = "none"
    channels_last: Union[bool, str] = False  # True/False, or "auto" (resolved per device by precision.resolve_channels_last)
    compile: bool = False
    val_every: int = 1  # evaluate after every N-th epoch and after the last; 0 = after the last only

    @classmethod
    def from_cfg(cls, c) -> "TrainSpec":
        return cls(**{k: getattr(c, k) for k in cls.__dataclass_fields__})


class EvalSchedule(Protocol):
    """What decides the evaluations: a TrainSpec, or a training stage's config section (same field names)."""

    epochs: int
    val_every: int


def evaluates_after(spec: EvalSchedule, epoch: int) -> bool:
    """Whether fit() evaluates after ``epoch`` (0-based): every ``val_every``-th epoch, and always the last."""
    last = epoch + 1 >= spec.epochs
    return last or (spec.val_every > 0 and (epoch + 1) % spec.val_every == 0)


def evaluations_in(spec: EvalSchedule, start_epoch: int = 0) -> int:
    """How many evaluations fit() runs in epochs ``start_epoch .. epochs-1``."""
    return sum(evaluates_after(spec, e) for e in range(start_epoch, spec.epochs))


def lr_at(spec: TrainSpec, epoch: float) -> float:
    """Learning rate at a (fractional) epoch: linear warm-up, then step decay at fractions or cosine.

    Cosine follows the fraction of the run per batch, so short runs still anneal to ~0 by the end.
    """
    if epoch < spec.warmup_epochs:
        return spec.lr * (int(epoch) + 1) / (spec.warmup_epochs + 1)
    if spec.schedule == "cosine":
        t = (epoch - spec.warmup_epochs) / max(1, spec.epochs - spec.warmup_epochs)
        return spec.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    drops = sum(int(epoch) >= round(m * spec.epochs) for m in spec.milestones)
    return spec.lr * spec.lr_decay**drops


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"run.device={device} but no CUDA GPU is visible; use run.device=auto or cpu")
    return device


def cpu_supports_bf16() -> bool:
    """Whether oneDNN runs bf16 on this CPU at all (natively or emulated); see stages.lib.precision."""
    from stages.lib.precision import bf16_supported

    return bf16_supported("cpu")


def autocast_dtype(amp: str, device: str) -> Optional[torch.dtype]:
    """The autocast dtype for ``amp`` on ``device`` (None = full fp32); ``auto`` as stages.lib.precision decides."""
    from stages.lib.precision import resolve_amp

    return resolve_amp(amp, device).dtype


def autocast(device: str, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, *, device: str = "cpu",
             amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy and CE loss; sums are reduced across ranks under torchrun."""
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for x, y in batches:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = forward(x)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        total += len(y)
    correct1, correct5, total, loss_sum = dist.all_reduce_sum([correct1, correct5, total, loss_sum], device)
    total = max(total, 1)
    return {"top1": correct1 / total, "top5": correct5 / total, "loss": loss_sum / total}


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


@dataclass
class _Loop:
    """What one fit() call's epochs share: the distiller, its optimiser, the resume state and the display."""

    distiller: nn.Module
    train_model: nn.Module  # the distiller, wrapped by DDP / torch.compile when asked
    opt: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    spec: TrainSpec
    device: str
    amp_dtype: Optional[torch.dtype]
    channels_last: bool
    label: str
    log: Callable[[str], None]
    ckpt: Checkpointer
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1


def fit(*, distiller: nn.Module, train, val, spec: TrainSpec, out_dir: Path, device: str, label: str,
        log: Callable[[str], None] = print, extra_row: Optional[Callable[[int], dict]] = None) -> dict:
    """Train a distiller (models.distillers: ``forward_train(x, y, epoch) -> (logits, terms)``); resumable.

    The optimiser updates ``distiller.learnable_parameters()``; checkpoints hold ``distiller.trainable``'s state
    (never the frozen teacher's). Checkpoints live in ``out_dir/ckpt``; ``out_dir/history.csv`` gets one row
    per epoch. Under torchrun only rank 0 writes; every rank resumes from the same checkpoint (any world size).
    Returns the final metrics.
    """
    from stages.lib.precision import resolve_amp, resolve_channels_last

    is_main = dist.rank() == 0
    amp = resolve_amp(spec.amp, device)
    layout = resolve_channels_last(spec.channels_last, device, amp.dtype)
    distiller.to(device)  # the frozen teacher follows the student's device and memory format
    if layout.channels_last:
        distiller.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(distiller.learnable_parameters(), lr=spec.lr, momentum=spec.momentum,
                          weight_decay=spec.weight_decay, nesterov=spec.nesterov)
    if is_main:
        log(f"{label}: {amp.describe()}; {layout.describe()}")
    scaler = torch.amp.GradScaler(device.split(":")[0]) if amp.dtype == torch.float16 else None
    loop = _Loop(distiller=distiller, train_model=distiller, opt=opt, scaler=scaler, spec=spec, device=device,
                 amp_dtype=amp.dtype, channels_last=layout.channels_last, label=label, log=log,
                 ckpt=Checkpointer(out_dir / "ckpt", enabled=is_main))
    _resume(loop)
    loop.train_model = dist.wrap_ddp(distiller, device)
    if spec.compile:
        loop.train_model = torch.compile(loop.train_model)

    clock = stage_clock(spec, train, val, loop.start_epoch)
    val_info = ""
    with progress_display(disable=not is_main) as progress:
        epochs_task = progress.add_task(f"{label} epochs", total=spec.epochs, completed=loop.start_epoch, info="")

        def show_eta() -> None:  # the last evaluation's accuracy and the ETAs on the epochs line
            progress.update(epochs_task, info=eta_info(clock, val_info))

        for epoch in range(loop.start_epoch, spec.epochs):
            t0 = time.perf_counter()
            row = _train_epoch(loop, train, epoch, clock, progress, show_eta)
            if extra_row:
                row.update(extra_row(epoch))
            ev = _finish_epoch(loop, val, epoch, row, clock, t0, out_dir, is_main)
            if ev is not None:
                val_info = f"val top-1 {ev['top1']:.4f}"
            progress.update(epochs_task, advance=1, info=eta_info(clock, val_info))
            val_text = (f"val top-1 {ev['top1']:.4f} top-5 {ev['top5']:.4f}" if ev is not None
                        else f"not evaluated (val_every={spec.val_every})")
            log(f"{label} epoch {epoch + 1}/{spec.epochs}: loss {row['train_loss']:.4f} {val_text} ({row['epoch_s']:.1f}s)")
    dist.barrier()
    history = loop.history
    last = history[-1] if history else {}
    return {"top1": last.get("val_top1"), "top5": last.get("val_top5"), "best_top1": loop.best_top1,
            "best_epoch": loop.best_epoch, "epochs": spec.epochs,
            "train_s": sum(r.get("epoch_s", 0.0) for r in history), **amp.metrics(), **layout.metrics()}


def _resume(loop: _Loop) -> None:
    """Load ``ckpt/last.pt`` when there is one: weights, optimiser, scaler, history and the epoch to start at."""
    state = loop.ckpt.load()  # every rank reads the same file: resume works with any world size
    if state is None:
        return
    model, opt = loop.distiller.trainable, loop.opt
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise PipelineError(f"cannot resume {loop.label} from {loop.ckpt.last}: it belongs to another model "
                            f"({str(e).splitlines()[0][:120]}); run with --force to start over") from None
    loop.start_epoch, loop.best_top1, loop.best_epoch = state["epoch"] + 1, state["best_top1"], state["best_epoch"]
    loop.history = list(state["history"])
    if loop.scaler is not None and state.get("scaler"):
        loop.scaler.load_state_dict(state["scaler"])
    loop.log(f"{loop.label}: resuming after epoch {state['epoch'] + 1}/{loop.spec.epochs} "
             f"(best top-1 {loop.best_top1:.4f})")


def _train_epoch(loop: _Loop, train, epoch: int, clock, progress, show_eta: Callable[[], None]) -> dict:
    """One epoch of optimiser steps; returns the history row's training part (terms averaged over all ranks)."""
    spec, opt = loop.spec, loop.opt
    lr = lr_at(spec, epoch)
    for g in opt.param_groups:
        g["lr"] = lr
    train.set_epoch(epoch)
    loop.distiller.train()
    sums: dict[str, float] = {}
    seen = correct = 0
    batches = len(train)
    batch_task = progress.add_task(f"epoch {epoch + 1}", total=batches, info="")
    clock.start_batches()
    for i, (x, y) in enumerate(train):
        if spec.schedule == "cosine":
            for g in opt.param_groups:
                g["lr"] = lr_at(spec, epoch + i / max(batches, 1))
        if loop.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(loop.device, loop.amp_dtype):
            logits, terms = loop.train_model(x, y, epoch)
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            bad = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
            raise TrainingDiverged(diverged_message(loop.label, f"loss became {loss.item()} ({bad})", epoch, loop.ckpt.last))
        opt.zero_grad(set_to_none=True)
        if loop.scaler is not None:
            loop.scaler.scale(loss).backward()
            loop.scaler.step(opt)
            loop.scaler.update()
        else:
            loss.backward()
            opt.step()
        n = len(y)
        seen += n
        correct += (logits.detach().argmax(1) == y).sum().item()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float().item() * n
        sums["loss"] = sums.get("loss", 0.0) + loss.detach().float().item() * n
        clock.batch_done()
        progress.update(batch_task, advance=1, info=" ".join(f"{k}={sums[k] / seen:.3f}" for k in sums))
        show_eta()
    progress.remove_task(batch_task)
    keys = sorted(sums)
    reduced = dist.all_reduce_sum([sums[k] for k in keys] + [seen, correct], loop.device)
    seen_all = max(reduced[-2], 1)
    return {"epoch": epoch + 1, "lr": lr, **{f"train_{k}": reduced[i] / seen_all for i, k in enumerate(keys)},
            "train_top1": reduced[-1] / seen_all}


def _finish_epoch(loop: _Loop, val, epoch: int, row: dict, clock, t0: float, out_dir: Path,
                  is_main: bool) -> Optional[dict]:
    """Evaluate the epoch's model when ``spec.val_every`` asks for it, complete its history row and checkpoint
    (``best.pt`` on improvement: only evaluated epochs compete). Returns the evaluation, or None."""
    distiller = loop.distiller
    ev = _evaluate(loop, val, epoch, clock) if evaluates_after(loop.spec, epoch) else None
    is_best = False
    if ev is not None:
        row.update({"val_top1": ev["top1"], "val_top5": ev["top5"], "val_loss": ev["loss"]})
        is_best = ev["top1"] > loop.best_top1
        if is_best:
            loop.best_top1, loop.best_epoch = ev["top1"], epoch + 1
    row["epoch_s"] = time.perf_counter() - t0
    weights = {k: v.detach().cpu() for k, v in distiller.trainable.state_dict().items()}
    if ev is None and not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
        # what the validation loss catches on evaluated epochs: a finite last step that left inf/NaN weights
        raise TrainingDiverged(diverged_message(loop.label, "a weight became nan/inf", epoch, loop.ckpt.last))
    loop.history.append(row)
    loop.ckpt.save({"epoch": epoch, "model": weights, "optimizer": loop.opt.state_dict(),
                    "best_top1": loop.best_top1, "best_epoch": loop.best_epoch, "history": loop.history,
                    "scaler": loop.scaler.state_dict() if loop.scaler else None}, is_best)
    if is_main:
        write_history(out_dir / "history.csv", loop.history)
    return ev


def _evaluate(loop: _Loop, val, epoch: int, clock) -> dict:
    """Top-1/top-5/loss of the epoch's model on the validation set; inf/NaN weights stop the run unsaved."""
    distiller = loop.distiller
    distiller.eval()
    dist.broadcast_buffers(distiller)  # evaluate (on every rank's shard) exactly the model rank 0 saves
    clock.eval_started()
    ev = evaluate(distiller.forward_test, val, device=loop.device, amp_dtype=loop.amp_dtype,
                  channels_last=loop.channels_last)
    clock.eval_done()
    if not math.isfinite(ev["loss"]):  # a finite last step can still leave inf/NaN weights: never save them
        raise TrainingDiverged(diverged_message(loop.label, f"validation loss became {ev['loss']}", epoch, loop.ckpt.last))
    return ev


@dataclass
class Prepared:
    meta: dict
    device: str
    train: object
    val: object


def prepare(ctx, c, seed: int) -> Prepared:
    """Dataset description, device (torchrun-aware), seeds and (train, val) splits for a training stage.

    ``batch_size`` is the global batch: each of the torchrun processes takes ``batch_size / world`` of it,
    so a recipe (and a resumed run) means the same thing on 1 or N processes.
    """
    import random

    from stages.lib.dataset_meta import DatasetMeta
    from stages.lib.datasets import make_splits

    device = resolve_device(ctx.cfg.run.device)
    rank, world, device = dist.rank(), dist.world_size(), dist.local_device(device)  # the runner started torchrun's group
    meta = DatasetMeta.load(ctx.artifact("data", "dataset")).to_dict()
    if c.batch_size % world:
        raise PipelineError(f"{ctx.name}.batch_size={c.batch_size} is the global batch and must be divisible by the "
                            f"{world} processes; change it or --nproc")
    if ctx.cfg.run.threads:
        torch.set_num_threads(ctx.cfg.run.threads)
    random.seed(seed)
    torch.manual_seed(seed)
    train, val = make_splits(meta, batch_size=c.batch_size // world, eval_batch_size=ctx.cfg.data.eval_batch_size,
                             device=device, rank=rank, world_size=world, seed=seed,
                             num_workers=ctx.cfg.data.num_workers, shard_val=True)
    return Prepared(meta=meta, device=device, train=train, val=val)


def build(name: str, meta: dict, what: str) -> nn.Module:
    """create_model with the dataset's classes/channels; an unknown name is a user error."""
    from models.registry import create_model

    try:
        return create_model(name, num_classes=meta["num_classes"], in_chans=meta["in_chans"])
    except ValueError as e:
        raise PipelineError(f"{what}: {e}") from None


def finish_checkpoints(out_dir: Path) -> None:
    """Keep best.pt next to the final weights; drop the resume state (optimizer etc.) once done."""
    ck = Path(out_dir) / "ckpt"
    if (ck / "best.pt").is_file():
        (ck / "best.pt").replace(Path(out_dir) / "best.pt")
    (ck / "last.pt").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        ck.rmdir()
