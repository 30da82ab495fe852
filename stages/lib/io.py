"""Atomic file writes, hashing and safe checkpoint loading."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

from stages.lib.errors import PipelineError


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM until the block ends, then deliver them to the handlers that were installed.

    A Ctrl-C landing inside torch.save's zip writer surfaces as a RuntimeError from C++ (a traceback, not
    the resume hint); deferring it makes every write finish or not start, and the interrupt still happens.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in pending[:1]:
            handler = previous[s]
            if callable(handler):
                handler(s, None)
            elif handler == signal.SIG_DFL:
                raise KeyboardInterrupt


def _atomic_replace(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _signals_deferred():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get the usual permissions
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    return _atomic_replace(Path(path), lambda f: f.write(data))


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: Path | str) -> Path:
    import torch

    return _atomic_replace(Path(path), lambda f: torch.save(obj, f))


def safe_torch_load(path: Path | str, what: str = "checkpoint",
                    fix: str = "point to a state_dict saved with torch.save") -> Any:
    """``torch.load(weights_only=True)`` with one clear error (ending in ``fix``) for missing, truncated or foreign files."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure here means "not a usable checkpoint"
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
        # torch's own text suggests weights_only=False; keep only its reason (e.g. "Unsupported global: ...")
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global|\n\n|$)", text, re.S)
        first = " ".join(found.group(1).split()) if found else (text.splitlines()[0] if text else type(e).__name__)
        if found and "global" in first.lower():
            raise PipelineError(f"{what} {path} was refused: it holds Python objects or code, not only tensors "
                                f"({first[:120]}); {fix}") from None
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] != b"PK" and head[:1] != b"\x80":  # neither torch.save's zip nor a pickle
            first = f"not a PyTorch file at all: it starts with {head!r}"
        else:
            first = first.split(". ")[0] + (" - truncated or corrupt" if head[:2] == b"PK" else "")
        raise PipelineError(
            f"{what} {path} is not a readable PyTorch checkpoint of tensors ({first[:160]}); {fix}"
        ) from None
