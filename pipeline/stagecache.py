"""A content-addressed store of finished stages, shared by the run directories of seeds and sweeps.

An entry is keyed by the stage's fingerprint (its config, its inputs' output hashes, its code): two run
directories whose teacher has the same fingerprint would train the same teacher, so the second one takes the
first one's folder instead (as DVC's run cache does). Entries are hard links of the stage's files (a copy where
the filesystem refuses links) plus the record; every file is checked against the record's sha256 before it is
restored, so an entry damaged through a link is dropped and the stage simply runs again.

Layout: ``<cache>/<fingerprint>/`` = the stage's files + ``record.json`` (the record of the run that made it,
with ``origin``: the run directory it was trained in).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from pipeline.rundir import RECORD, RunDir, hash_tree
from stages.lib.io import atomic_write_text

CACHE_DIR = ".stage-cache"


def _link_tree(src: Path, dst: Path, skip: tuple[str, ...] = (RECORD,)) -> None:
    """Hard-link (else copy) every file of ``src`` into ``dst``, keeping relative paths."""
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if not p.is_file() or rel.as_posix() in skip:
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, target)
        except OSError:
            shutil.copy2(p, target)


class StageCache:
    """``store`` a finished stage of a run directory; ``restore`` it into another one with the same fingerprint."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def entry(self, fingerprint: str) -> Path:
        return self.root / fingerprint

    def record(self, fingerprint: str) -> Optional[dict]:
        p = self.entry(fingerprint) / RECORD
        try:
            return json.loads(p.read_text()) if p.is_file() else None
        except (OSError, json.JSONDecodeError):
            return None

    def store(self, rd: RunDir, name: str) -> bool:
        """Add the finished stage ``name`` of ``rd`` (unless the same outputs are stored already); True if added.

        An entry with the same fingerprint but other files (a non-deterministic re-run, e.g. on a GPU) is
        replaced: the run directory being stored is the one the others now follow.
        """
        rec = rd.record(name)
        if not rec or rec.get("status") != "done" or not rec.get("fingerprint"):
            return False
        fp = rec["fingerprint"]
        old = self.record(fp)
        if old is not None and old.get("outputs") == rec.get("outputs"):
            return False
        if rd.modified_files(name):
            return False  # never spread files that no longer match their record
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{fp}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            _link_tree(rd.stage_dir(name), tmp)
            entry_rec = {**rec, "origin": rec.get("origin") or str(rd.path)}
            entry_rec.pop("restored", None)
            atomic_write_text(tmp / RECORD, json.dumps(entry_rec, indent=2, sort_keys=True, default=str))
            final = self.entry(fp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return True

    def adopt(self, rd: RunDir, names: list[str]) -> list[str]:
        """Store every finished, unmodified stage of ``rd`` among ``names`` (e.g. the parent run of a sweep)."""
        return [n for n in names if self.store(rd, n)]

    def restore(self, rd: RunDir, name: str, fingerprint: str) -> Optional[dict]:
        """Put the entry for ``fingerprint`` in place as stage ``name`` of ``rd``; its new record, or None.

        Nothing happens (None) when there is no entry, or when ``rd`` already holds exactly the entry's files.
        """
        entry = self.entry(fingerprint)
        rec = self.record(fingerprint)
        if rec is None or rec.get("status") != "done":
            return None
        mine = rd.record(name)
        if (mine and mine.get("fingerprint") == fingerprint and mine.get("outputs") == rec.get("outputs")
                and not rd.modified_files(name)):
            return None
        if hash_tree(entry) != rec.get("outputs"):
            shutil.rmtree(entry, ignore_errors=True)  # damaged (e.g. edited in place through a link): run it again
            return None
        work = rd.work_dir(name)
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        _link_tree(entry, work)
        new = {**rec, "restored": {"from": str(entry), "at": datetime.now(timezone.utc).isoformat()}}
        rd.commit(name, new)
        return new


def describe_restored(rec: dict) -> str:
    return f"restored from the stage cache (trained in {rec.get('origin', '?')})"


def run_shared(runner, names: list[str], cache: StageCache, *, run_one: Callable[[str], object],
               fresh: tuple[str, ...] = ()):
    """Run ``names`` in ``runner``'s directory, taking each stage from ``cache`` when its fingerprint is there.

    ``run_one(name)`` runs a stage the usual way (in process or under torchrun); every finished stage is
    stored. Stages in ``fresh`` are never restored (they are being re-run on purpose, e.g. ``--force``).
    Yields one ``StageResult`` per stage, so the caller can print as it goes.
    """
    from pipeline import graph
    from pipeline.runner import StageResult

    for name in names:
        spec = graph.get(name)
        if name not in fresh:
            upstream = runner.upstream_records(spec)
            if all((upstream[d] or {}).get("status") == "done" for d in spec.inputs):
                rec = cache.restore(runner.rd, name, runner.current_fingerprint(spec))
                if rec is not None:
                    runner.refresh(name)  # the plan memoises states: the restored record changes them downstream
                    yield StageResult(name, "restored", metrics=rec.get("metrics", {}), reason=describe_restored(rec))
                    continue
        result = run_one(name)
        runner.refresh(name)  # run_one may have run it in another process (torchrun)
        cache.store(runner.rd, name)
        yield result
