"""One training loop for teacher, baseline and distill: resumable, AMP, channels_last, DDP-aware.

The stage supplies ``step(x, y, epoch) -> (logits, {"ce": ..., "kd": ..., "norm": ...})``; the loop
handles the optimiser, the lr schedule, progress, evaluation, per-epoch checkpoints (resume from the
last finished epoch) and NaN/inf detection (stop, keep the last good checkpoint, say which epoch).
"""
from __future__ import annotations

import contextlib
import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn as nn

from stages.lib import dist
from stages.lib.errors import PipelineError, TrainingDiverged
from stages.lib.io import atomic_torch_save, atomic_write_text, safe_torch_load

StepFn = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


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

    @classmethod
    def from_cfg(cls, c) -> "TrainSpec":
        return cls(**{k: getattr(c, k) for k in cls.__dataclass_fields__})


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


class Checkpointer:
    """``ckpt/last.pt`` after every finished epoch (atomic), ``best.pt`` on improvement."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.folder = Path(folder)
        self.enabled = enabled

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    def save(self, state: dict, is_best: bool) -> None:
        if not self.enabled:
            return
        atomic_torch_save(state, self.last)
        if is_best:
            atomic_torch_save({"epoch": state["epoch"], "model": state["model"], "top1": state["best_top1"]},
                              self.folder / "best.pt")

    def load(self) -> Optional[dict]:
        if not self.last.is_file():
            return None
        return safe_torch_load(self.last, "training checkpoint", fix="delete it, or run with --force to start the stage over")


def write_history(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    lines = [",".join(keys)] + [",".join(_fmt(r.get(k, "")) for k in keys) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def read_history(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) if v not in ("",) else None for k, v in row.items()} for row in csv.DictReader(f)]


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _progress(disable: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=disable, transient=True)


def fit(*, model: nn.Module, step: Callable, train, val, spec: TrainSpec, out_dir: Path, device: str,
        label: str, log: Callable[[str], None] = print, eval_forward: Optional[Callable] = None,
        extra_row: Optional[Callable[[int], dict]] = None) -> dict:
    """Train ``model`` with ``step(model, x, y, epoch) -> (logits, terms)``; resumable; returns final metrics.

    Checkpoints live in ``out_dir/ckpt``; ``out_dir/history.csv`` gets one row per epoch. Under torchrun
    only rank 0 writes; every rank resumes from the same checkpoint (any world size).
    """
    is_main = dist.rank() == 0
    from stages.lib.precision import resolve_amp, resolve_channels_last

    amp = resolve_amp(spec.amp, device)
    amp_dtype = amp.dtype
    layout = resolve_channels_last(spec.channels_last, device, amp_dtype)
    channels_last = layout.channels_last
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                          nesterov=spec.nesterov)
    if is_main:
        log(f"{label}: {amp.describe()}; {layout.describe()}")
    scaler = torch.amp.GradScaler(device.split(":")[0]) if amp_dtype == torch.float16 else None
    ckpt = Checkpointer(out_dir / "ckpt", enabled=is_main)
    history: list[dict] = []
    start_epoch, best_top1, best_epoch = 0, -1.0, -1
    state = ckpt.load()  # every rank reads the same file: resume works with any world size
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise PipelineError(f"cannot resume {label} from {ckpt.last}: it belongs to another model ({str(e).splitlines()[0][:120]}); "
                                "run with --force to start over") from None
        start_epoch, best_top1, best_epoch = state["epoch"] + 1, state["best_top1"], state["best_epoch"]
        history = list(state["history"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        log(f"{label}: resuming after epoch {state['epoch'] + 1}/{spec.epochs} (best top-1 {best_top1:.4f})")
    train_model = dist.wrap_ddp(model, device)
    if spec.compile:
        train_model = torch.compile(train_model)
    forward = eval_forward or (lambda x: model(x))

    clock = _stage_clock(spec, train, val, start_epoch)
    val_info = ""
    with _progress(disable=not is_main) as progress:
        epochs_task = progress.add_task(f"{label} epochs", total=spec.epochs, completed=start_epoch, info="")
        for epoch in range(start_epoch, spec.epochs):
            lr = lr_at(spec, epoch)
            for g in opt.param_groups:
                g["lr"] = lr
            train.set_epoch(epoch)
            model.train()
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            seen = correct = 0
            batches = len(train)
            batch_task = progress.add_task(f"epoch {epoch + 1}", total=batches, info="")
            clock.start_batches()
            for i, (x, y) in enumerate(train):
                if spec.schedule == "cosine":
                    for g in opt.param_groups:
                        g["lr"] = lr_at(spec, epoch + i / max(batches, 1))
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(device, amp_dtype):
                    logits, terms = step(train_model, x, y, epoch)
                loss = sum(terms.values())
                if not torch.isfinite(loss):
                    bad = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
                    raise TrainingDiverged(_diverged(label, f"loss became {loss.item()} ({bad})", epoch, ckpt.last))
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
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
                progress.update(batch_task, advance=1,
                                info=" ".join(f"{k}={sums[k] / seen:.3f}" for k in sums))
                progress.update(epochs_task, info=_eta_info(clock, val_info))
            progress.remove_task(batch_task)
            keys = sorted(sums)
            reduced = dist.all_reduce_sum([sums[k] for k in keys] + [seen, correct], device)
            seen_all = max(reduced[-2], 1)
            row = {"epoch": epoch + 1, "lr": lr, **{f"train_{k}": reduced[i] / seen_all for i, k in enumerate(keys)},
                   "train_top1": reduced[-1] / seen_all}
            if extra_row:
                row.update(extra_row(epoch))
            model.eval()
            dist.broadcast_buffers(model)  # evaluate (on every rank's shard) exactly the model rank 0 saves
            clock.eval_started()
            ev = evaluate(forward, val, device=device, amp_dtype=amp_dtype, channels_last=channels_last)
            clock.eval_done()
            if not math.isfinite(ev["loss"]):  # a finite last step can still leave inf/NaN weights: never save them
                raise TrainingDiverged(_diverged(label, f"validation loss became {ev['loss']}", epoch, ckpt.last))
            row.update({"val_top1": ev["top1"], "val_top5": ev["top5"], "val_loss": ev["loss"],
                        "epoch_s": time.perf_counter() - t0})
            history.append(row)
            is_best = ev["top1"] > best_top1
            if is_best:
                best_top1, best_epoch = ev["top1"], epoch + 1
            ckpt.save({"epoch": epoch, "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
                       "optimizer": opt.state_dict(), "best_top1": best_top1, "best_epoch": best_epoch,
                       "history": history, "scaler": scaler.state_dict() if scaler else None}, is_best)
            if is_main:
                write_history(out_dir / "history.csv", history)
            val_info = f"val top-1 {ev['top1']:.4f}"
            progress.update(epochs_task, advance=1, info=_eta_info(clock, val_info))
            log(f"{label} epoch {epoch + 1}/{spec.epochs}: loss {row['train_loss']:.4f} "
                f"val top-1 {ev['top1']:.4f} top-5 {ev['top5']:.4f} ({row['epoch_s']:.1f}s)")
    dist.barrier()
    last = history[-1] if history else {}
    return {"top1": last.get("val_top1"), "top5": last.get("val_top5"), "best_top1": best_top1,
            "best_epoch": best_epoch, "epochs": spec.epochs,
            "train_s": sum(r.get("epoch_s", 0.0) for r in history), **amp.metrics(), **layout.metrics()}


def _stage_clock(spec: TrainSpec, train, val, start_epoch: int):
    """The stage's own ETA: its batches and evaluations timed; an evaluation batch priced by its images
    (forward only: a third of a training image) until the first evaluation has been timed."""
    from stages.lib.eta import StageEta

    per_train = getattr(train, "num_samples", 1) / max(len(train), 1)
    per_val = getattr(val, "num_samples", 1) / max(len(val), 1)
    return StageEta(epochs=spec.epochs, batches=len(train), eval_batches=len(val), start_epoch=start_epoch,
                    eval_weight=per_val / max(per_train, 1e-9) / 3)


def _eta_info(clock, prefix: str = "") -> str:
    """'val top-1 0.8512 · ETA stage 1:23 · run 5:40' for the epochs line of the progress display."""
    from stages.lib import eta

    left = clock.remaining()
    run = eta.current()
    if left is not None:  # calibrate the run's seconds per FLOP on this stage (a resumed one: on its share)
        run.stage_progress(clock.elapsed + left, share=(clock.epochs - clock.start_epoch) / max(clock.epochs, 1))
    total = run.total(left)
    parts = [prefix] if prefix else []
    parts.append(f"ETA stage {eta.fmt_eta(left)}")
    if total is not None:
        parts.append(f"run {eta.fmt_eta(total)}")
    return " · ".join(parts)


def _diverged(label: str, what: str, epoch: int, last: Path) -> str:
    """The one-line NaN/inf message: which epoch, and where the last good checkpoint is (if any)."""
    kept = (f"the last good checkpoint (epoch {epoch}) is kept in {last}" if epoch > 0
            else "no epoch had finished, so there is no checkpoint to keep")
    return f"{label}: {what} in epoch {epoch + 1}; {kept}; lower the learning rate (or the loss weights) or check the data"


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
    rank, world, device = dist.init(device)
    dist.release_followers({"run": True, "out_dir": str(ctx.out_dir), "force": ctx.force,
                            "inputs": {k: str(v) for k, v in ctx.inputs.items()}, "input_records": ctx.input_records})
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
