"""Runs stages in graph order with caching: an unchanged fingerprint means "skipped (cached)".

fingerprint = sha256(stage name, its config sections, its inputs' output hashes, the stage code's hash,
the package version, and for GPU stages the TensorRT/CUDA/GPU environment).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from pipeline import __version__, graph
from pipeline.config import PipelineConfig, dump_config
from pipeline.graph import StageSpec
from pipeline.rundir import RunDir
from stages.lib.errors import PipelineError, StageSkipped
from stages.lib.io import atomic_write_text, disk_full, no_space_error


@dataclass
class StageResult:
    name: str
    status: str  # done | cached | skipped | failed
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)
    reason: str = ""


_CODE_CACHE: dict[str, str] = {}


def _code_hash(module: str) -> str:
    """The stage's own module plus everything it can reach in this project (models/, stages/lib, bundle files).

    Any change to that code invalidates the stage's cache: a cached artifact is always what today's code makes.
    """
    if module not in _CODE_CACHE:
        root = Path(__file__).resolve().parent.parent
        spec = importlib.util.find_spec(module)
        files = [Path(spec.origin)] if spec and spec.origin else []
        for folder in (root / "models", root / "stages" / "lib", root / "stages" / "bundle_files"):
            files += sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".py", ".tmpl"))
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
        _CODE_CACHE[module] = h.hexdigest()[:16]
    return _CODE_CACHE[module]


def environment() -> dict:
    """What a GPU stage's output depends on beyond its inputs: TensorRT, CUDA, the GPU (no torch import)."""
    from stages.engine import environment_fingerprint

    return environment_fingerprint()


def fingerprint(spec: StageSpec, cfg: PipelineConfig, upstream: dict[str, Optional[dict]], env: Optional[dict]) -> str:
    payload = {
        "stage": spec.name,
        "version": __version__,
        "code": _code_hash(spec.module),
        "config": {path: cfg.section(path) for path in spec.config},
        "inputs": {n: (r or {}).get("outputs") if (r or {}).get("status") == "done" else None
                   for n, r in sorted(upstream.items())},
        "environment": env if spec.environment else None,
        "files": {path: _file_hash(cfg.section(path)) for path in spec.file_config},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _file_hash(path) -> Optional[str]:
    """sha256 of a file named in the config (a swapped teacher checkpoint at the same path re-runs the stage)."""
    if path is None or not Path(path).is_file():
        return None
    from stages.lib.io import sha256_file

    return sha256_file(path)


def versions() -> dict:
    """Library versions for the record: ``__version__`` when already imported, else the package metadata
    (importing torchvision just to read its version costs seconds on every stage)."""
    from importlib import metadata

    out = {"norm-pipeline": __version__, "python": platform.python_version()}
    for mod in ("torch", "torchvision", "onnx", "onnxruntime", "tensorrt"):
        loaded = sys.modules.get(mod)
        if loaded is not None and hasattr(loaded, "__version__"):
            out[mod] = str(loaded.__version__)
        elif importlib.util.find_spec(mod) is not None:
            try:
                out[mod] = metadata.version(mod)
            except metadata.PackageNotFoundError:  # e.g. onnxruntime-gpu: another distribution name
                try:
                    out[mod] = importlib.import_module(mod).__version__
                except Exception:  # noqa: BLE001
                    out[mod] = "broken"
    return out


class Runner:
    """Executes stages of one run directory; ``log`` prints a line, ``on_result`` gets each result."""

    def __init__(self, cfg: PipelineConfig, run_dir: Path, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.rd = RunDir(run_dir)
        self.log = log
        self._env: Optional[dict] = None

    def env(self) -> dict:
        if self._env is None:
            self._env = environment()
        return self._env

    def upstream_records(self, spec: StageSpec) -> dict[str, Optional[dict]]:
        return {n: self.rd.record(n) for n in spec.inputs + spec.optional_inputs}

    def current_fingerprint(self, spec: StageSpec) -> str:
        return fingerprint(spec, self.cfg, self.upstream_records(spec), self.env() if spec.environment else None)

    def state(self, spec: StageSpec) -> str:
        """done | stale | skipped | missing | interrupted (for `status`)."""
        rec = self.rd.record(spec.name)
        if rec is None:
            return "interrupted" if self.rd.work_dir(spec.name).exists() else "missing"
        if rec.get("fingerprint") != self.current_fingerprint(spec):
            return "stale"
        if any(self.state(graph.get(n)) in ("stale", "missing", "interrupted") for n in spec.inputs):
            return "stale"  # consistent with its inputs, but they are out of date themselves
        return "skipped" if rec.get("status") == "skipped" else "done"

    # ------------------------------------------------------------------ running
    def run_stage(self, name: str, force: bool = False, standalone: bool = False) -> StageResult:
        spec = graph.get(name)
        upstream = self.upstream_records(spec)
        for dep in spec.inputs:
            rec = upstream[dep]
            if rec is None:
                raise PipelineError(f"stage {name!r} needs stage {dep!r}, which has not run in {self.rd.path}; "
                                    f"run `norm-pipeline stage {dep}` (or `norm-pipeline run --to {name}`)")
            if rec.get("status") != "done":
                raise PipelineError(f"stage {name!r} needs stage {dep!r}, which was skipped: {rec.get('reason', '')}")
        fp = fingerprint(spec, self.cfg, upstream, self.env() if spec.environment else None)
        rec = self.rd.record(name)
        if rec and rec.get("fingerprint") == fp and not force and not self.rd.modified_files(name):
            if not (standalone and rec.get("status") == "skipped"):
                return StageResult(name, "cached", metrics=rec.get("metrics", {}), reason=rec.get("reason", ""))

        for dep in spec.inputs + spec.optional_inputs:  # provenance: read only what the records vouch for
            changed = self.rd.modified_files(dep) if (upstream[dep] or {}).get("status") == "done" else []
            if changed:
                raise PipelineError(f"stage {name!r} reads {dep}/{changed[0]}, which no longer matches the record of "
                                    f"stage {dep!r} (modified, corrupt or deleted); re-run it: `norm-pipeline stage {dep}` "
                                    "(or `norm-pipeline run`)")
        work = self.rd.work_dir(name)
        marker = work / ".fingerprint"
        if work.exists() and (force or not marker.is_file() or marker.read_text() != fp):
            shutil.rmtree(work)  # leftovers of another configuration: never resume from them
        work.mkdir(parents=True, exist_ok=True)
        self.rd.remove_partial_files(work)  # temp files of a killed process: never part of an artifact
        marker.write_text(fp)
        from stages.lib.context import StageContext
        from stages.lib.training import resolve_device

        inputs = {n: self.rd.stage_dir(n) for n, r in upstream.items() if r and r.get("status") == "done"}
        ctx = StageContext(name=name, out_dir=work, run_dir=self.rd.path, cfg=self.cfg, inputs=inputs,
                           input_records={n: r for n, r in upstream.items() if r}, force=force, log=self.log,
                           device=resolve_device(self.cfg.run.device))
        started = datetime.now(timezone.utc)
        t0 = time.perf_counter()
        record = {"stage": name, "fingerprint": fp, "started": started.isoformat(), "versions": versions(),
                  "config": {p: self.cfg.section(p) for p in spec.config},
                  "inputs": {n: {"fingerprint": r.get("fingerprint"), "outputs": r.get("outputs")}
                             for n, r in upstream.items() if r},
                  "environment": self.env() if spec.environment else None}
        try:
            metrics = spec.load()(ctx) or {}
        except StageSkipped as e:
            record.update(status="skipped", reason=str(e), metrics={}, finished=_now(), duration_s=time.perf_counter() - t0)
            if standalone:
                raise PipelineError(f"stage {name!r} cannot run here: {e}") from None
            self.rd.write_skipped(name, record)
            return StageResult(name, "skipped", time.perf_counter() - t0, reason=str(e))
        except Exception as e:  # a full disk under a writer that is not ours (ONNX export, copies, plots)
            full = no_space_error(e)
            if full is None or isinstance(e, PipelineError):
                raise
            raise disk_full(full.filename or work, full) from None
        marker.unlink(missing_ok=True)
        record.update(status="done", metrics=metrics, finished=_now(), duration_s=time.perf_counter() - t0)
        self.rd.commit(name, record)
        return StageResult(name, "done", time.perf_counter() - t0, metrics)

    def save_config(self) -> None:
        atomic_write_text(self.rd.path / "config.yaml", dump_config(self.cfg))


def select(from_stage: Optional[str], to_stage: Optional[str]) -> list[str]:
    order = graph.ORDER
    lo = order.index(graph.get(from_stage).name) if from_stage else 0
    hi = order.index(graph.get(to_stage).name) if to_stage else len(order) - 1
    if lo > hi:
        raise PipelineError(f"--from {from_stage} comes after --to {to_stage} in the stage order: {', '.join(order)}")
    return order[lo : hi + 1]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
