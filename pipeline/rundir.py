"""The run directory: one folder per stage, a record per stage, a lock against concurrent runs.

``runs/<name>/<stage>/record.json`` says what produced the folder (fingerprint, inputs, hashes of every
file, metrics, versions, times). A stage is built in ``.<stage>.work/`` (kept when interrupted, so
training resumes) and renamed into place only when it finished: a folder that looks done is done.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from pipeline.hashcache import CACHE_NAME, HashCache
from stages.lib.errors import PipelineError
from stages.lib.io import atomic_write_text, sha256_file

RECORD = "record.json"


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock_fd: Optional[int] = None
        self.hashes = HashCache(self.path / CACHE_NAME)  # an unchanged artifact is read once, not on every call

    # ------------------------------------------------------------------ folders
    def stage_dir(self, name: str) -> Path:
        return self.path / name

    def work_dir(self, name: str) -> Path:
        return self.path / f".{name}.work"

    def ensure(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise PipelineError(f"run directory {self.path} is not writable ({e.strerror}); pass --run-dir to a writable folder") from None

    # ------------------------------------------------------------------ records
    def record(self, name: str) -> Optional[dict]:
        path = self.stage_dir(name) / RECORD
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def commit(self, name: str, record: dict) -> Path:
        """Hash the work folder's files into the record, then swap it into place atomically."""
        work, final = self.work_dir(name), self.stage_dir(name)
        record["outputs"] = hash_tree(work)
        atomic_write_text(work / RECORD, json.dumps(record, indent=2, sort_keys=True, default=str))
        old = self.path / f".{name}.old"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            final.replace(old)
        work.replace(final)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        return final

    def write_skipped(self, name: str, record: dict) -> None:
        work = self.work_dir(name)
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        self.commit(name, record)

    @staticmethod
    def remove_partial_files(folder: Path) -> None:
        """Delete temp files left in a work folder by a process killed mid-write (resume starts clean)."""
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file() and is_partial(p):
                p.unlink(missing_ok=True)

    def modified_files(self, name: str) -> list[str]:
        """Files whose sha256 no longer matches the record (or that vanished / appeared)."""
        rec = self.record(name)
        if rec is None:
            return []
        now = hash_tree(self.stage_dir(name), self.hashes.sha256)
        self.hashes.save()
        expected = rec.get("outputs", {})
        changed = [f for f, h in expected.items() if now.get(f) != h]
        extra = [f"{f} (unrecorded)" for f in now if f not in expected]
        return changed + extra

    # ------------------------------------------------------------------ lock
    def lock(self) -> None:
        """An exclusive lock for this run directory; the holder's pid is in the error message."""
        self.ensure()
        path = self.path / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise PipelineError(f"run directory {self.path} is in use by another norm-pipeline process (pid {holder}); "
                                "wait for it to finish or use another --run-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None


def is_partial(path: Path) -> bool:
    """A temp file of an atomic write (``.<name>.<random>.tmp[.<ext>]``): what a killed process leaves behind."""
    return path.name.endswith(".tmp") or (path.name.startswith(".") and ".tmp" in path.suffixes)


def hash_tree(folder: Path, sha256: Callable[[Path], str] = sha256_file) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative posix paths), the record and temp files excluded."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != RECORD and not is_partial(p):
            out[p.relative_to(folder).as_posix()] = sha256(p)
    return out
