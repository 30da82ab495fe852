"""The one place that decides whether a stage is current: `run`, `run --nproc`, `stage` and `status` all ask it.

A plan belongs to one invocation: records, artifact hashes, code hashes and fingerprints are computed once,
in stage order, and memoised; running a stage invalidates that stage and everything downstream of it.

A stage is current ("done", or "skipped" when it declined to run here) when its record exists, its files
still match the record (no tampering), its fingerprint matches today's config, code, inputs and
environment, and its inputs are current themselves.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

from pipeline import __version__, graph
from pipeline.codehash import CodeIndex
from pipeline.config import PipelineConfig
from pipeline.graph import StageSpec
from pipeline.rundir import RunDir

CURRENT = ("done", "skipped")
#: states of an input that make its dependents stale (its artifacts are not what today's config makes)
OUT_OF_DATE = ("stale", "missing", "interrupted", "modified")


def fingerprint(spec: StageSpec, cfg: PipelineConfig, upstream: dict[str, Optional[dict]], env: Optional[dict],
                code: Optional[str] = None, files: Optional[dict[str, Optional[str]]] = None) -> str:
    """sha256 of everything that shapes the stage's artifacts (see docs/caching.md)."""
    payload = {
        "stage": spec.name,
        "version": __version__,
        "code": code if code is not None else CodeIndex().code_hash(spec.module, spec.data_files),
        "config": {path: cfg.section(path) for path in spec.config},
        "inputs": {n: (r or {}).get("outputs") if (r or {}).get("status") == "done" else None
                   for n, r in sorted(upstream.items())},
        "environment": env if spec.environment else None,
        "files": files if files is not None else {p: _plain_file_hash(cfg.section(p)) for p in spec.file_config},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _plain_file_hash(path) -> Optional[str]:
    if path is None or not Path(path).is_file():
        return None
    from stages.lib.io import sha256_file

    return sha256_file(path)


class Plan:
    """Memoised states and fingerprints of one run directory under one config."""

    def __init__(self, cfg: PipelineConfig, rd: RunDir, env: Callable[[], dict], code: Optional[CodeIndex] = None):
        self.cfg, self.rd, self._env = cfg, rd, env
        self.code = code or CodeIndex(parsed=rd.hashes.parsed_memo())
        self._memo: dict[tuple[str, str], object] = {}

    def _get(self, kind: str, name: str, make: Callable[[], object]):
        key = (kind, name)
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    # ------------------------------------------------------------------ facts
    def record(self, name: str) -> Optional[dict]:
        return self._get("record", name, lambda: self.rd.record(name))

    def modified(self, name: str) -> list[str]:
        """Files of ``name`` that no longer match its record (each artifact hashed at most once)."""
        return self._get("modified", name, lambda: self.rd.modified_files(name) if self.record(name) else [])

    def upstream(self, spec: StageSpec) -> dict[str, Optional[dict]]:
        return {n: self.record(n) for n in spec.inputs + spec.optional_inputs}

    def file_hashes(self, spec: StageSpec) -> dict[str, Optional[str]]:
        """sha256 of files named in the config (a swapped teacher checkpoint at the same path re-runs the stage)."""
        out: dict[str, Optional[str]] = {}
        for p in spec.file_config:
            value = self.cfg.section(p)
            out[p] = self.rd.hashes.sha256(value) if value is not None and Path(value).is_file() else None
        self.rd.hashes.save()
        return out

    def fingerprint(self, name: str) -> str:
        spec = graph.get(name)
        return self._get("fingerprint", name, lambda: fingerprint(
            spec, self.cfg, self.upstream(spec), self._env() if spec.environment else None,
            code=self._code_hash(spec), files=self.file_hashes(spec)))

    def _code_hash(self, spec: StageSpec) -> str:
        code = self.code.code_hash(spec.module, spec.data_files)
        self.rd.hashes.save()  # keeps what parsing the source found, for the next call
        return code

    # ------------------------------------------------------------------ decision
    def state(self, name: str) -> str:
        """done | skipped | stale | missing | interrupted | modified."""
        return self._get("state", name, lambda: self._state(name))

    def _state(self, name: str) -> str:
        spec = graph.get(name)
        rec = self.record(name)
        if rec is None:
            return "interrupted" if self.rd.work_dir(name).exists() else "missing"
        if self.modified(name):
            return "modified"
        if rec.get("fingerprint") != self.fingerprint(name):
            return "stale"
        if any(self.state(d) in OUT_OF_DATE for d in spec.inputs):
            return "stale"  # consistent with its inputs, but they are out of date themselves
        if any(self.state(d) in ("stale", "modified") for d in spec.optional_inputs):
            return "stale"  # it used an optional input that is out of date now
        return "skipped" if rec.get("status") == "skipped" else "done"

    def is_current(self, name: str) -> bool:
        return self.state(name) in CURRENT

    def invalidate(self, name: str) -> None:
        """Forget what we know about ``name`` and everything downstream (it has just been re-run)."""
        names = {name, *graph.downstream(name)}
        self._memo = {k: v for k, v in self._memo.items() if k[1] not in names}
