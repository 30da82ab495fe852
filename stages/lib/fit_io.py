"""What fit() writes and shows besides the weights: checkpoints, history.csv, progress and ETA, messages."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from stages.lib.io import atomic_torch_save, atomic_write_text, safe_torch_load


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


def progress_display(disable: bool):
    from stages.lib.progress import progress_bar

    return progress_bar(eta=True, info=True, disable=disable)


def stage_clock(spec, train, val, start_epoch: int):
    """The stage's own ETA: its batches and evaluations (those ``val_every`` asks for) timed; an evaluation
    batch priced by its images (forward only: a third of a training image) until the first one is timed."""
    from stages.lib.eta import StageEta
    from stages.lib.training import evaluations_in

    per_train = getattr(train, "num_samples", 1) / max(len(train), 1)
    per_val = getattr(val, "num_samples", 1) / max(len(val), 1)
    return StageEta(epochs=spec.epochs, batches=len(train), eval_batches=len(val), start_epoch=start_epoch,
                    eval_weight=per_val / max(per_train, 1e-9) / 3, evals=evaluations_in(spec, start_epoch))


def eta_info(clock, prefix: str = "") -> str:
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


def diverged_message(label: str, what: str, epoch: int, last: Path) -> str:
    """The one-line NaN/inf message: which epoch, and where the last good checkpoint is (if any)."""
    kept = (f"the last good checkpoint (epoch {epoch}) is kept in {last}" if epoch > 0
            else "no epoch had finished, so there is no checkpoint to keep")
    return f"{label}: {what} in epoch {epoch + 1}; {kept}; lower the learning rate (or the loss weights) or check the data"
