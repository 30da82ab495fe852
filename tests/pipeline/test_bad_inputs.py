"""Bad inputs a new user meets, through the real CLI: a decompression-bomb image, a full disk, a bad --nproc.

Each ends with one `error: ` line (or click's usage error) and a non-zero exit, never a traceback, and leaves
nothing that looks finished; after a full disk is freed, the same command resumes where it stopped.
"""
from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

from tests.pipeline.test_faults import (  # noqa: F401
    _image_folder,
    failed_cleanly,
    invoke,
    records,
    run_cli,
    run_copy,
    tiny_config,
    with_sets,
)


def _partial_files(folder: Path) -> list[Path]:
    return [p for p in Path(folder).rglob("*") if p.is_file() and ".tmp" in p.name]


# ----------------------------------------------------------------------------- decompression bomb
def _bomb_png(path: Path, side: int = 20000) -> Path:
    """A valid 1-bit PNG of side x side black pixels: about 50 kB on disk, 400 million pixels decoded."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    row = b"\x00" + bytes((side + 7) // 8)  # filter byte, then the packed pixels
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("workers", [0, 1], ids=["in-process", "dataloader-worker"])
def test_decompression_bomb_in_image_folder_names_the_file(tmp_path, workers):
    from PIL import Image

    data, rd = _image_folder(tmp_path / "data", {"a": 3, "b": 3}, {"a": 2, "b": 2}), tmp_path / "run"
    bomb = _bomb_png(data / "train" / "a" / "bomb.png")
    with pytest.raises(Image.DecompressionBombError):  # the file really is one for this Pillow
        Image.open(bomb)
    sets = with_sets(f"data.root={data}", "data.dataset=imagefolder", "data.image_size=8", "teacher.model=resnet8",
                     "teacher.epochs=1", "teacher.batch_size=8", f"data.num_workers={workers}")
    assert invoke("stage", "data", "--run-dir", str(rd), *sets).code == 0
    limit = 2 * Image.MAX_IMAGE_PIXELS
    failed_cleanly(invoke("stage", "teacher", "--run-dir", str(rd), *sets),
                   rf"^error: image \S*train/a/bomb\.png is too large to decode safely \(400,000,000 pixels, over "
                   rf"Pillow's decompression-bomb limit of {limit:,} pixels\); remove or downscale that file$",
                   run_dir=rd, before=records(rd), code=2)


# ----------------------------------------------------------------------------- --nproc
@pytest.mark.parametrize("command", ["run", "sweep"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_nproc_below_one_is_a_usage_error(tmp_path, value, command):
    rd = tmp_path / "run"
    extra = ("--grid", "distill.n=2,4") if command == "sweep" else ()
    res = run_cli(command, "--nproc", value, *extra, "--run-dir", str(rd))
    assert res.code == 2 and "Traceback" not in res.out + res.err, res
    assert f"Invalid value for '--nproc': {value} is not in the range x>=1." in res.err, res.err
    assert not rd.exists(), "a refused command touched the run directory"


# ----------------------------------------------------------------------------- disk full (simulated)
class _FullDiskOs:
    """``os`` as seen by stages.lib.io: files opened there write into a disk that fills up when the
    ``allowed + 1``-th file named ``name`` starts being written; from then on every write fails with ENOSPC
    after writing what fits (half of the block), like a real filesystem."""

    def __init__(self, name: str, allowed: int):
        self.name, self.allowed, self.seen, self.full, self.failures = name, allowed, 0, False, 0

    def __getattr__(self, attr: str):
        return getattr(os, attr)

    def fdopen(self, fd: int, *args, **kwargs):
        target = Path(os.readlink(f"/proc/self/fd/{fd}")).name  # ".<name>.<random>.tmp"
        if target.startswith(f".{self.name}."):
            self.seen += 1
            self.full = self.full or self.seen > self.allowed
        return _FullDiskFile(os.fdopen(fd, *args, **kwargs), self)


class _FullDiskFile:
    def __init__(self, f, disk: _FullDiskOs):
        self._f, self._disk = f, disk

    def write(self, data) -> int:
        if self._disk.full:
            self._disk.failures += 1
            self._f.write(bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._f.write(data)

    def __getattr__(self, attr: str):
        return getattr(self._f, attr)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def test_disk_full_while_training_then_resume(run_copy, monkeypatch):
    """The disk fills while epoch 2's checkpoint is written: one line naming the file, exit 2, no record, no
    partial file, epoch 1's checkpoint intact; after freeing space the same command resumes after epoch 1."""
    import stages.lib.io as io_mod

    rd, cfg, before = run_copy
    args = ("stage", "distill", "-c", cfg, "--run-dir", str(rd), "--set", "distill.epochs=2")
    disk = _FullDiskOs("last.pt", allowed=1)
    monkeypatch.setattr(io_mod, "os", disk)
    failed_cleanly(invoke(*args), r"^error: no space left on device while writing \S*/\.distill\.work/ckpt/last\.pt; "
                   r"free some space there and run the same command again: finished stages and epochs are kept",
                   run_dir=rd, before=before, code=2)
    assert disk.failures >= 1, "the simulated disk never filled: the test proves nothing"
    assert not _partial_files(rd), _partial_files(rd)
    state = torch.load(rd / ".distill.work" / "ckpt" / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0

    monkeypatch.setattr(io_mod, "os", os)  # space freed
    res = invoke(*args)
    assert res.code == 0, res.err
    assert "resuming after epoch 1/2" in res.out, res.out[-2000:]
    history = (rd / "distill" / "history.csv").read_text().strip().splitlines()
    assert len(history) == 3 and records(rd)["distill"] != before["distill"]


@pytest.mark.parametrize("case", ["onnx-exporter", "plain-copy"])
def test_disk_full_under_a_foreign_writer_is_one_line(run_copy, monkeypatch, case):
    """ENOSPC from writers that are not ours (the ONNX exporter wraps it, shutil raises it bare) is one line too."""
    rd, cfg, before = run_copy
    if case == "onnx-exporter":
        import stages.lib.onnx_utils as onnx_utils

        def no_space(*a, **k):
            raise RuntimeError("exporter failed") from OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(onnx_utils, "_torch_export", no_space)
        stage, needle = "export", r"\S+\.onnx"
    else:
        from pipeline.graph import stage_module

        bundle_mod = stage_module("bundle")

        class FullShutil:  # the bundle stage's shutil only: its copies hit a full disk
            def __getattr__(self, attr: str):
                return getattr(shutil, attr)

            @staticmethod
            def copyfile(src, dst, *a, **k):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

        monkeypatch.setattr(bundle_mod, "shutil", FullShutil())
        stage, needle = "bundle", r"\S+/model\.onnx"
    failed_cleanly(invoke("stage", stage, "-c", cfg, "--run-dir", str(rd), "--force"),
                   rf"^error: no space left on device while writing {needle}; free some space",
                   run_dir=rd, before=before, code=2)
    assert not _partial_files(rd), _partial_files(rd)


# ----------------------------------------------------------------------------- disk full (a real tmpfs)
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only); yields (mount point, grow) where grow(mib) frees space by remounting."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")

    def grow(mib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={mib}m", str(mnt)], check=True)

    try:
        yield mnt, grow
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_on_a_real_filesystem_then_resume(small_tmpfs, tmp_path, tiny_data_root):
    """A run directory on a 1 MiB filesystem: the teacher's checkpoints do not fit. One line, exit 2, nothing
    finished-looking; after the filesystem grows, the same command finishes, resuming from what was kept."""
    mnt, grow = small_tmpfs
    cfg, rd = str(tiny_config(tmp_path / "tiny.yaml", tiny_data_root)), mnt / "run"
    args = ("run", "-c", cfg, "--run-dir", str(rd), "--to", "teacher", "--set", "teacher.epochs=2")
    res = run_cli(*args)
    # 1 MiB holds epoch 1's checkpoints of the tiny resnet8, not epoch 2's new last.pt next to the old one
    failed_cleanly(res, r"^error: no space left on device while writing \S+/\.teacher\.work/ckpt/last\.pt; "
                   r"free some space there", code=2)
    assert not (rd / "teacher" / "record.json").exists() and not _partial_files(rd), _partial_files(rd)
    assert torch.load(rd / ".teacher.work" / "ckpt" / "last.pt", weights_only=True)["epoch"] == 0

    grow(64)
    res = run_cli(*args)
    assert res.code == 0 and "Traceback" not in res.err, res.err[-3000:]
    assert "resuming after epoch 1/2" in res.out, res.out[-3000:]
    assert (rd / "teacher" / "record.json").is_file()
