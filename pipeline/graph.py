"""The stage graph: what each stage reads, writes and which config it depends on.

Stage code is referenced by module path and imported only when the stage runs, so the CLI's
``--help``, ``list`` and ``status`` stay fast and never import torch or GPU libraries.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str  # "stages.<name>", exposing run(ctx) -> dict of metrics
    help: str
    inputs: tuple[str, ...] = ()  # upstream stages that must be done
    optional_inputs: tuple[str, ...] = ()  # used when done, ignored when skipped/absent
    config: tuple[str, ...] = ()  # config the stage reads that shapes its artifacts (dotted paths, fingerprinted)
    # named artifacts {name: path relative to the stage folder ("bundle/" is a folder)}: what other stages and the
    # report read through ``ctx.artifact(stage, name)`` / ``artifact_path``; the runner checks them after the stage
    outputs: Mapping[str, str] = field(default_factory=dict)
    # outputs written only under some config: {name: (dotted config path, value)}, required when that config value
    # equals ``value`` or, for a list, holds it (baseline writes kd/model.pt only when baseline.methods has "kd")
    required_when: Mapping[str, tuple[str, Any]] = field(default_factory=dict)
    environment: bool = False  # fingerprint also covers the GPU/TensorRT environment
    file_config: tuple[str, ...] = ()  # config paths naming files whose contents are inputs (sha256 in the fingerprint)
    distributed: bool = False  # may run under torchrun (training stages)
    key_metrics: tuple[str, ...] = field(default=())
    # config the stage may read that changes how it runs, not what it makes (device, threads, eval batch):
    # readable through ctx.cfg, left out of the fingerprint, so moving to a GPU does not re-train the teacher
    runtime_config: tuple[str, ...] = ()
    data_files: tuple[str, ...] = ()  # project files read at run time (templates), hashed with the stage's code

    @property
    def readable(self) -> tuple[str, ...]:
        """Every config path the stage may read through ``ctx.cfg``."""
        return self.config + self.runtime_config

    def load(self) -> Callable:
        return importlib.import_module(self.module).run

    def output(self, name: str) -> str:
        """The relative path of the named output; a clear error for a name the stage does not declare."""
        from stages.lib.errors import PipelineError

        if name not in self.outputs:
            raise PipelineError(f"stage {self.name!r} has no output named {name!r}; "
                                f"its outputs are: {', '.join(self.outputs) or 'none'}")
        return self.outputs[name]

    def required_outputs(self, cfg: Any) -> dict[str, str]:
        """The outputs this config makes the stage write (``cfg``: the resolved PipelineConfig)."""
        out = {}
        for name, rel in self.outputs.items():
            if name in self.required_when:
                path, value = self.required_when[name]
                have = cfg.section(path)
                if not (value in have if isinstance(have, (list, tuple)) else have == value):
                    continue
            out[name] = rel
        return out

    def describe_outputs(self) -> str:
        """'model.pt, kd/model.pt (if baseline.methods has kd)': for `list` and the docs."""
        def cond(name: str) -> str:
            if name not in self.required_when:
                return ""
            path, value = self.required_when[name]
            return f" (if {path} has {value})" if isinstance(value, str) else f" (if {path} = {json.dumps(value)})"

        return ", ".join(rel + cond(n) for n, rel in self.outputs.items())


_TRAINING_RUNTIME = ("run.device", "run.threads", "data.eval_batch_size", "data.num_workers")

STAGES: tuple[StageSpec, ...] = (
    StageSpec("data", "stages.data", "load and describe the dataset (classes, sizes, mean/std, source hashes)",
              config=("data",), outputs={"dataset": "dataset.json"}, key_metrics=("train_size", "val_size")),
    StageSpec("teacher", "stages.teacher", "train the teacher with cross-entropy, or import a checkpoint",
              inputs=("data",), config=("teacher", "run.seed"), outputs={"model": "model.pt", "history": "history.csv"},
              required_when={"history": ("teacher.checkpoint", None)},  # an imported teacher has no history
              file_config=("teacher.checkpoint",),
              distributed=True, key_metrics=("top1", "top5"), runtime_config=_TRAINING_RUNTIME),
    StageSpec("baseline", "stages.baseline", "train the student alone (CE, optionally KD) with the distill budget",
              inputs=("data", "teacher"), config=("student", "baseline", "run.seed"),
              outputs={"ce": "ce/model.pt", "kd": "kd/model.pt", "ce_history": "ce/history.csv",
                       "kd_history": "kd/history.csv"},
              required_when={"ce": ("baseline.methods", "ce"), "kd": ("baseline.methods", "kd"),
                             "ce_history": ("baseline.methods", "ce"), "kd_history": ("baseline.methods", "kd")},
              distributed=True, key_metrics=("ce_top1", "kd_top1"),
              runtime_config=_TRAINING_RUNTIME),
    StageSpec("distill", "stages.distill", "train the NORM student (FT after the last stage, N-to-one matching)",
              inputs=("data", "teacher"), config=("student", "distill", "run.seed"),
              outputs={"norm_student": "norm_student.pt", "best": "best.pt", "history": "history.csv"},
              distributed=True, key_metrics=("top1", "best_top1"), runtime_config=_TRAINING_RUNTIME),
    StageSpec("merge", "stages.merge", "fold the FT into the student's FC layer: the vanilla architecture again",
              inputs=("distill",), config=("merge",), outputs={"model": "model.pt", "merge": "merge.json"},
              key_metrics=("params",)),
    StageSpec("verify", "stages.verify", "merged vs unmerged outputs (fp32 + fp64), top-1 agreement, params/FLOPs",
              inputs=("data", "distill", "merge"), config=("verify",), outputs={"verify": "verify.json"},
              key_metrics=("fp32_max_rel_diff", "top1_agreement"), runtime_config=("data.eval_batch_size",)),
    StageSpec("export", "stages.export", "ONNX export (dynamic batch), checker, onnxruntime parity, graph identity",
              inputs=("data", "teacher", "distill", "merge", "verify"), config=("export",),
              outputs={"model": "model.onnx", "vanilla": "vanilla.onnx", "unmerged": "unmerged.onnx", "teacher": "teacher.onnx",
                       "export": "export.json"},
              key_metrics=("ort_max_abs_diff", "graph_identical"), runtime_config=("data.eval_batch_size",)),
    StageSpec("quantize", "stages.quantize", "INT8 Q/DQ ONNX (static, per-channel), fp16/INT8 accuracy gates, CPU speed-up",
              inputs=("data", "export"), config=("quantize", "run.seed"),
              outputs={"int8": "model_int8.onnx", "fp16": "model_fp16.onnx", "quantize": "quantize.json"},
              key_metrics=("int8_drop_pts", "int8_speedup")),
    StageSpec("engine", "stages.engine", "TensorRT engines (fp32/fp16, int8 from the Q/DQ ONNX) + sidecar JSON, parity",
              inputs=("data", "export"), optional_inputs=("quantize",), config=("engine",),
              outputs={"fp32": "model_fp32.plan", "fp32_sidecar": "model_fp32.json", "engine": "engine.json"},
              required_when={"fp32": ("engine.precisions", "fp32"), "fp32_sidecar": ("engine.precisions", "fp32")},
              environment=True, key_metrics=("fp32_top1", "fp16_top1"),
              runtime_config=("data.eval_batch_size", "run.root")),  # run.root: where the shared timing cache lives
    StageSpec("benchmark", "stages.benchmark", "latency of vanilla / merged / unmerged / teacher on every backend",
              inputs=("data", "teacher", "distill", "merge", "export"), optional_inputs=("engine",),
              config=("benchmark", "run.seed"),
              outputs={"benchmark": "benchmark.json", "latency_md": "latency.md", "latency_png": "latency.png"},
              environment=True, key_metrics=("verdict", "merged_vs_vanilla_ratio", "aa_ratio", "verdict_reason")),
    StageSpec("bundle", "stages.bundle", "the edge team's folder + .tar.gz: ONNX, engines, manifest, runners",
              inputs=("data", "distill", "merge", "verify", "export"),
              optional_inputs=("engine", "benchmark", "teacher", "baseline", "quantize"),
              # the manifest's trtexec lines repeat the engine profile and the precisions gate on quantize.max_drop,
              # so those keys shape the bundle even when the engine stage was skipped (no TensorRT here)
              config=("bundle", "engine", "quantize.max_drop", "student.model", "teacher.model"),
              data_files=("stages/bundle_files",), outputs={"bundle": "bundle/", "tar": "bundle.tar.gz"},
              required_when={"tar": ("bundle.tarball", True)}, key_metrics=("files",)),
)

BY_NAME: dict[str, StageSpec] = {s.name: s for s in STAGES}
ORDER: list[str] = [s.name for s in STAGES]


def get(name: str) -> StageSpec:
    from stages.lib.errors import PipelineError

    if name not in BY_NAME:
        raise PipelineError(f"unknown stage {name!r}; stages are: {', '.join(ORDER)}")
    return BY_NAME[name]


def downstream(name: str) -> list[str]:
    """Stages that depend on ``name`` directly or indirectly, in order."""
    out: set[str] = {name}
    for s in STAGES:
        if set(s.inputs + s.optional_inputs) & out:
            out.add(s.name)
    return [n for n in ORDER if n in out and n != name]


def stage_module(name: str) -> ModuleType:
    """Stage ``name``'s module, imported by its path in the graph. Only the runner machinery reaches stage modules
    (``StageSpec.load``, and tests of a stage's ``run()`` through this function); code shared with anything else
    lives in ``stages/lib`` (enforced by tests/test_layering.py)."""
    return importlib.import_module(get(name).module)


def artifact_path(run_dir: Path | str, stage: str, name: str) -> Path:
    """Where the named output of ``stage`` lies in a run directory (``bundle/`` gives the folder)."""
    return Path(run_dir) / stage / get(stage).output(name).rstrip("/")
