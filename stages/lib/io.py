"""Atomic file writes, hashing and safe checkpoint loading."""
from __future__ import annotations

import contextlib
import errno
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


_NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


class DiskFull(PipelineError):
    """A write failed for lack of space; the partial file is gone, finished stages and epochs are kept."""


def no_space_error(exc: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT ``OSError`` behind ``exc`` (itself, or in its ``__cause__``/``__context__`` chain).

    Writers often hide it: torch.save's zip writer reports "unexpected pos" from C++, exporters wrap it.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full(what: Path | str, err: OSError) -> DiskFull:
    """The one-line error for a full disk while writing ``what``."""
    return DiskFull(f"{_NO_SPACE.get(err.errno, 'no space left on device')} while writing {what}; free some space "
                    "there and run the same command again: finished stages and epochs are kept, and it resumes")


class _ErrorRecordingFile:
    """A file proxy that remembers the first ``OSError`` of a write or flush, for writers that swallow it."""

    def __init__(self, f) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def _atomic_replace(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _signals_deferred():
        tmp: str | None = None
        f: _ErrorRecordingFile | None = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get the usual permissions
            with os.fdopen(fd, "wb") as raw:
                f = _ErrorRecordingFile(raw)
                write(f)
                f.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            err = no_space_error(e) or no_space_error(f.error if f is not None else None)
            if err is not None:
                raise disk_full(path, err) from None
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
