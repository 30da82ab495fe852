"""sha256 of artifacts, remembered by (path, size, mtime, ctime, inode) in the run directory.

`status` and `run` check every artifact against its record; re-reading a multi-GB checkpoint on every call
would make both slow. A file whose size, modification time, status-change time and inode are unchanged
is not re-read (the approach of git's index and DVC's state database). The change time cannot be set by
user tools, so a rewrite that restores the old modification time is still seen. A hash taken within
``RACY_NS`` of the file's last change is not trusted on the next call (the timestamp may not have ticked
between two writes), so a file edited right after it was hashed is re-read, not served from the cache.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

CACHE_NAME = ".hashes.json"
RACY_NS = 2_000_000_000  # coarse-timestamp filesystems (FAT: 2 s) still get a tick between two writes
_FORMAT = 1
MAX_PARSED = 2000


class HashCache:
    """In memory for one invocation; persisted (best effort) to ``<run dir>/.hashes.json``."""

    def __init__(self, path: Optional[Path]):
        self.path = Path(path) if path is not None else None
        self._entries: Optional[dict[str, list]] = None
        self._dirty = False
        self.parsed: dict[str, list[str]] = {}  # imports per source file content (pipeline.codehash), kept alongside
        self._parsed_at_load = 0
        self.hashed: list[str] = []  # files actually read in this invocation (tests and the benchmark check it)

    def _load(self) -> dict[str, list]:
        if self._entries is None:
            self._entries = {}
            if self.path is not None and self.path.is_file():
                try:
                    data = json.loads(self.path.read_text())
                    if data.get("format") == _FORMAT and isinstance(data.get("entries"), dict):
                        self._entries = data["entries"]
                        self.parsed.update(data.get("parsed") or {})
                        self._parsed_at_load = len(self.parsed)
                except (OSError, ValueError, AttributeError):
                    pass  # a damaged cache is only a slower call
        return self._entries

    def parsed_memo(self) -> dict[str, list[str]]:
        """What parsing project sources found, by content (see pipeline.codehash.CodeIndex), loaded from disk."""
        self._load()
        return self.parsed

    def sha256(self, path: Path | str) -> str:
        """The file's sha256, read from disk only when its stat key changed (or the old hash was racy)."""
        from stages.lib.io import sha256_file

        p = os.path.abspath(path)
        st = os.stat(p)
        key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        entries = self._load()
        hit = entries.get(p)
        if hit and hit[:4] == key and (hit[5] == "session" or max(key[1], key[2]) + RACY_NS < hit[4]):
            return hit[6]
        digest = sha256_file(p)
        self.hashed.append(p)
        # "session": trusted for the rest of this invocation only (racy entries are re-read next time)
        entries[p] = [*key, time.time_ns(), "session", digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        """Write the trusted entries back (atomically); a read-only run directory just keeps no cache."""
        entries = self._load()
        if (not self._dirty and len(self.parsed) == self._parsed_at_load) or self.path is None:
            return
        from stages.lib.io import atomic_write_text

        keep = {}
        for p, e in entries.items():
            if os.path.exists(p):
                keep[p] = [*e[:5], "disk", e[6]]
        try:
            if self.path.parent.is_dir():
                parsed = dict(list(self.parsed.items())[-MAX_PARSED:])  # old source versions age out
                atomic_write_text(self.path, json.dumps({"format": _FORMAT, "entries": keep, "parsed": parsed}))
                self._dirty, self._parsed_at_load = False, len(self.parsed)
        except OSError:
            pass
