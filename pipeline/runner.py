"""Runs stages in graph order with caching: a current stage (pipeline/plan.py decides) is "skipped (cached)".

fingerprint = sha256(stage name, the config it declares, its inputs' output hashes, the hash of the code it
runs (its import closure in this project, plus declared data files), the package version, and for GPU
stages the TensorRT/CUDA/GPU environment). The rules for users are in docs/caching.md.
"""
from __future__ import annotations

import importlib
import importlib.util
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline import __version__, graph
from pipeline.config import PipelineConfig, dump_config
from pipeline.graph import StageSpec
from pipeline.plan import CURRENT, Plan, fingerprint  # noqa: F401  (fingerprint: kept importable from here)
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


def environment() -> dict:
    """What a GPU stage's output depends on beyond its inputs: TensorRT, CUDA, the GPU (no torch import)."""
    from stages.lib.trt_env import environment_fingerprint

    return environment_fingerprint()


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
    """Executes stages of one run directory; ``log`` prints a line. One ``plan`` per runner decides what is current."""

    def __init__(self, cfg: PipelineConfig, run_dir: Path, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.rd = RunDir(run_dir)
        self.log = log
        self._env: Optional[dict] = None
        self.plan = Plan(cfg, self.rd, self.env)

    def env(self) -> dict:
        if self._env is None:
            self._env = environment()
        return self._env

    def upstream_records(self, spec: StageSpec) -> dict[str, Optional[dict]]:
        return self.plan.upstream(spec)

    def current_fingerprint(self, spec: StageSpec) -> str:
        return self.plan.fingerprint(spec.name)

    def state(self, spec: StageSpec) -> str:
        """done | skipped | stale | missing | interrupted | modified (see pipeline/plan.py)."""
        return self.plan.state(spec.name)

    def cached(self, name: str, force: bool = False, standalone: bool = False) -> Optional[StageResult]:
        """The cached result when ``name`` need not run, else None: the one test `run`, `stage` and `--nproc` use."""
        rec = self.plan.record(name)
        if force or rec is None or not self.plan.is_current(name):
            return None
        if standalone and rec.get("status") == "skipped":
            return None  # `stage X` asks again, so the user sees why it cannot run here
        return StageResult(name, "cached", metrics=rec.get("metrics", {}), reason=rec.get("reason", ""))

    def refresh(self, name: str) -> None:
        """``name`` was (re)built by another process: forget what the plan knew about it and its dependents."""
        self.plan.invalidate(name)

    def check_inputs(self, spec: StageSpec) -> None:
        """Refuse to build on inputs that are missing, skipped, tampered with or out of date."""
        name = spec.name
        for dep in spec.inputs + spec.optional_inputs:
            rec = self.plan.record(dep)
            if rec is None:
                if dep in spec.optional_inputs:
                    continue
                raise PipelineError(f"stage {name!r} needs stage {dep!r}, which has not run in {self.rd.path}; "
                                    f"run `norm-pipeline stage {dep}` (or `norm-pipeline run --to {name}`)")
            if rec.get("status") != "done":
                if dep in spec.optional_inputs:
                    continue
                raise PipelineError(f"stage {name!r} needs stage {dep!r}, which was skipped: {rec.get('reason', '')}")
            state = self.plan.state(dep)
            if state == "modified":  # provenance: read only what the records vouch for
                changed = self.plan.modified(dep)
                raise PipelineError(f"stage {name!r} reads {dep}/{changed[0]}, which no longer matches the record of "
                                    f"stage {dep!r} (modified, corrupt or deleted); re-run it: `norm-pipeline stage {dep}` "
                                    "(or `norm-pipeline run`)")
            if state not in CURRENT:
                raise PipelineError(f"stage {name!r} needs stage {dep!r}, which is {state}: its config, code or inputs "
                                    f"changed since it ran; run `norm-pipeline run --from {dep} --to {name}` "
                                    "(`norm-pipeline status` shows what is out of date)")

    # ------------------------------------------------------------------ running
    def run_stage(self, name: str, force: bool = False, standalone: bool = False) -> StageResult:
        spec = graph.get(name)
        upstream = self.upstream_records(spec)
        for dep in spec.inputs:  # the cheap checks first: a missing input needs no hashing to report
            rec = upstream[dep]
            if rec is None or rec.get("status") != "done":
                self.check_inputs(spec)
        hit = self.cached(name, force=force, standalone=standalone)
        if hit is not None:
            return hit
        self.check_inputs(spec)
        fp = self.plan.fingerprint(name)
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
        record: dict[str, Any] = {"stage": name, "fingerprint": fp, "started": started.isoformat(), "versions": versions(),
                  "config": {p: self.cfg.section(p) for p in spec.config},
                  "code": self.plan.code.relative(self.plan.code.files(spec.module, spec.data_files)),
                  "inputs": {n: {"fingerprint": r.get("fingerprint"), "outputs": r.get("outputs")}
                             for n, r in upstream.items() if r},
                  "environment": self.env() if spec.environment else None}
        if spec.distributed:  # under torchrun: join the process group and release the waiting ranks into this stage
            from stages.lib import dist

            ctx.device = dist.start_stage(ctx.device, {
                "run": True, "out_dir": str(work), "force": force, "inputs": {k: str(v) for k, v in inputs.items()},
                "input_records": ctx.input_records})
        try:
            metrics = spec.load()(ctx) or {}
        except StageSkipped as e:
            record.update(status="skipped", reason=str(e), metrics={}, finished=_now(), duration_s=time.perf_counter() - t0)
            if standalone:
                raise PipelineError(f"stage {name!r} cannot run here: {e}") from None
            self.rd.write_skipped(name, record)
            self.plan.invalidate(name)
            return StageResult(name, "skipped", time.perf_counter() - t0, reason=str(e))
        except Exception as e:  # a full disk under a writer that is not ours (ONNX export, copies, plots)
            full = no_space_error(e)
            if full is None or isinstance(e, PipelineError):
                raise
            raise disk_full(full.filename or work, full) from None
        check_outputs(spec, self.cfg, work)
        marker.unlink(missing_ok=True)
        record.update(status="done", metrics=metrics, finished=_now(), duration_s=time.perf_counter() - t0)
        self.rd.commit(name, record)
        self.plan.invalidate(name)
        return StageResult(name, "done", time.perf_counter() - t0, metrics)

    def save_config(self) -> None:
        atomic_write_text(self.rd.path / "config.yaml", dump_config(self.cfg))


def check_outputs(spec: StageSpec, cfg: PipelineConfig, folder: Path) -> None:
    """A stage that returned without writing a declared (required) output fails here, before it is recorded."""
    for name, rel in spec.required_outputs(cfg).items():
        path = folder / rel.rstrip("/")
        if not (path.is_dir() if rel.endswith("/") else path.is_file()):
            raise PipelineError(f"stage {spec.name!r} finished without writing its output {name!r} ({rel}); "
                                "the stage's code and its declaration in pipeline/graph.py disagree")


def select(from_stage: Optional[str], to_stage: Optional[str]) -> list[str]:
    order = graph.ORDER
    lo = order.index(graph.get(from_stage).name) if from_stage else 0
    hi = order.index(graph.get(to_stage).name) if to_stage else len(order) - 1
    if lo > hi:
        raise PipelineError(f"--from {from_stage} comes after --to {to_stage} in the stage order: {', '.join(order)}")
    return order[lo : hi + 1]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
