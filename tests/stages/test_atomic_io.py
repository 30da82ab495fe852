"""Atomic writes on the real path: a process killed (SIGKILL, no cleanup) in the middle of a write or between
the write and the rename leaves the previous file, or no file, never a partial one; a failing writer leaves
the previous file and no temp file."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.rundir import is_partial
from stages.lib.io import atomic_torch_save, atomic_write_bytes

ROOT = Path(__file__).resolve().parents[2]
OLD = b"the previous, complete artifact"

# The child writes with the project's own atomic writers and is SIGKILLed at the chosen moment.
CHILD = r"""
import os, signal, sys
from pathlib import Path
import stages.lib.io as io

target, where = Path(sys.argv[1]), sys.argv[2]
def die(*_a, **_k):
    os.kill(os.getpid(), signal.SIGKILL)

if where == "before_rename":         # everything written and synced; killed just before the rename
    os.replace = die
    io.atomic_write_bytes(target, b"the new artifact" * 4096)
elif where == "mid_write":           # half of the bytes written (and flushed to the file), then killed
    def half(f):
        f.write(b"the first half of the new artifact")
        f.flush()
        die()
    io._atomic_replace(target, half)
elif where == "mid_torch_save":      # a checkpoint write: torch.save killed after its first bytes
    import torch
    def half_save(obj, f):
        f.write(b"PK\x03\x04 first bytes of a zip")
        f.flush()
        die()
    torch.save = half_save
    io.atomic_torch_save({"w": torch.zeros(3)}, target)
raise SystemExit("not killed")
"""


def _killed_while_writing(target: Path, where: str) -> None:
    res = subprocess.run([sys.executable, "-c", CHILD, str(target), where], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr[-2000:])


@pytest.mark.parametrize("where", ["before_rename", "mid_write", "mid_torch_save"])
@pytest.mark.parametrize("existed", [True, False])
def test_kill9_leaves_the_old_file_or_none(tmp_path, where, existed):
    target = tmp_path / "artifact.bin"
    if existed:
        target.write_bytes(OLD)
    _killed_while_writing(target, where)
    if existed:
        assert target.read_bytes() == OLD, "the previous artifact was overwritten by a write that never finished"
    else:
        assert not target.exists(), "a write that never finished left a file under the artifact's name"
    others = [p for p in tmp_path.iterdir() if p != target]
    assert len(others) == 1 and is_partial(others[0]), others  # the killed write's temp file, recognisably partial


def test_failing_writer_keeps_the_old_file_and_cleans_up(tmp_path, monkeypatch):
    import torch

    target = tmp_path / "ckpt.pt"
    target.write_bytes(OLD)

    def broken_save(obj, f):
        f.write(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"w": torch.zeros(2)}, target)
    assert target.read_bytes() == OLD and sorted(tmp_path.iterdir()) == [target]


def test_completed_write_replaces_the_file(tmp_path):
    target = tmp_path / "a" / "artifact.bin"
    atomic_write_bytes(target, OLD)
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and sorted(target.parent.iterdir()) == [target]
