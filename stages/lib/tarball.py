"""Bundle tarballs: write a folder as a reproducible .tar.gz, extract one refusing anything unsafe."""
from __future__ import annotations

import os
import shutil
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from stages.lib.errors import PipelineError


def make_tarball(folder: Path, dest: Path) -> Path:
    """``folder`` as ``<folder name>/...`` in a .tar.gz: relative names, plain files, no owners; atomic rename."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for path in [folder, *sorted(folder.rglob("*"))]:
                if path.is_symlink() or not (path.is_file() or path.is_dir()):
                    raise PipelineError(f"{path} is not a plain file or folder; bundles hold plain files only")
                arc = folder.name if path == folder else f"{folder.name}/{path.relative_to(folder).as_posix()}"
                info = tar.gettarinfo(str(path), arcname=arc)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o755 if path.is_dir() or path.suffix == ".py" else 0o644
                if path.is_file():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def safe_extract(archive: Path, dest: Path) -> list[str]:
    """Extract plain files and folders only; any absolute path, '..', link or device refuses the archive."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            return _extract_members(tar, dest)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:  # truncated or not an archive at all
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        if isinstance(e, tarfile.ReadError) and "could not be opened" in reason:
            reason = "not a tar or .tar.gz file"
        return [f"{archive} is not a readable tar archive ({reason})"]


def _extract_members(tar: tarfile.TarFile, dest: Path) -> list[str]:
    """Check every member first (plain files/folders, safe relative paths), then write them under ``dest``."""
    members, bad = tar.getmembers(), []
    for m in members:
        p = PurePosixPath(m.name)
        if not p.parts or p.is_absolute() or m.name.startswith(("/", "\\")) or ".." in p.parts or ":" in p.parts[0]:
            bad.append(f"unsafe path in archive: {m.name}")
        elif not (m.isfile() or m.isdir()):
            bad.append(f"archive member {m.name} is a link or special file; bundles hold plain files only")
    if bad:
        return bad
    root = dest.resolve()
    for m in members:
        target = (dest / m.name).resolve()
        if root not in target.parents and target != root:
            return [f"unsafe path in archive: {m.name}"]
        if m.isdir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with tar.extractfile(m) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
    return []
