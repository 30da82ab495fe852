"""The one typed schema that holds every default; YAML files and ``--set`` only override it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages.lib.errors import PipelineError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunCfg(Section):
    name: str = "default"
    root: Path = Path("runs")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    seed: int = 0
    threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads (None: torch's default)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda", "mps") and not v.startswith("cuda:"):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v


class DataCfg(Section):
    dataset: Literal["fashion_mnist", "cifar10", "cifar100", "imagefolder"] = "fashion_mnist"
    root: Optional[Path] = Field(None, description="dataset folder; None = the dataset's standard place")
    download: bool = Field(False, description="CIFAR only: download into root when missing (needs internet)")
    train_limit: Optional[int] = Field(None, ge=1, description="use only this many training images")
    val_limit: Optional[int] = Field(None, ge=1, description="use only this many validation images")
    augment: bool = True
    crop_padding: int = Field(2, ge=0)
    hflip: bool = True
    image_size: int = Field(224, ge=8, description="imagefolder only: training crop / eval size")
    eval_batch_size: int = Field(256, ge=1)
    num_workers: int = Field(0, ge=0, description="DataLoader workers for image folders")


class TrainCfg(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = False
    schedule: Literal["step", "cosine"] = "step"
    milestones: list[float] = Field(
        default_factory=lambda: [0.625, 0.75, 0.875],
        description="step schedule: fractions of the epochs where lr is multiplied by lr_decay (150/180/210 of 240)",
    )
    lr_decay: float = Field(0.1, gt=0, le=1)
    warmup_epochs: int = Field(0, ge=0)
    amp: Literal["auto", "none", "bf16", "fp16"] = Field(
        "auto", description="autocast precision; auto = bf16 on CPUs with AVX512-BF16/AMX (faster there), else fp32")
    channels_last: Union[Literal["auto"], bool] = Field(
        "auto", description="NHWC convolutions; auto = on for CPUs (faster with oneDNN) and for CUDA with bf16/fp16, else off")
    compile: bool = False
    val_every: int = Field(1, ge=0, description="evaluate on the validation set after every N-th epoch and always after "
                           "the last; 0 = after the last epoch only (no per-epoch curve, best.pt = the last epoch)")
    logit_standardize: bool = Field(False, description="layer-norm the logits (x logit_scale) before CE/KD")
    logit_scale: float = Field(2.5, gt=0)

    @field_validator("milestones")
    @classmethod
    def _milestones(cls, v: list[float]) -> list[float]:
        if any(not 0 < m < 1 for m in v) or v != sorted(v):
            raise ValueError("must be increasing fractions of the run in (0, 1)")
        return v


class TeacherCfg(TrainCfg):
    model: str = "resnet20"
    checkpoint: Optional[Path] = Field(None, description="import this state_dict instead of training")


class StudentCfg(Section):
    model: str = "resnet8"
    seed: Optional[int] = Field(None, ge=0, description="seed of the student side (baseline and distill: initial weights, "
                                "data order); unset = run.seed. `run --seeds` and `sweep --seeds` vary it while the "
                                "teacher keeps run.seed and is trained once")


class BaselineCfg(TrainCfg):
    methods: list[Literal["ce", "kd"]] = Field(default=["ce"])  # pydantic copies list defaults per instance
    kd_weight: float = Field(0.9, ge=0, description="KD baseline: weight of the KD term (CE gets 1 - this)")
    temperature: float = Field(4.0, gt=0)


class DistillCfg(TrainCfg):
    n: int = Field(8, ge=1, description="N: groups of teacher-sized channels in the expanded feature")
    residual: bool = Field(True, description="default FT (x + contract(expand(x))); false = plain FT")
    alpha: float = Field(1.0, ge=0, description="weight of the NORM loss")
    beta: float = Field(0.0, ge=0, description="weight of vanilla KD (NORM+KD when > 0)")
    gamma: float = Field(1.0, ge=0, description="weight of cross-entropy")
    temperature: float = Field(4.0, gt=0)
    norm_schedule: list[tuple[float, float]] = Field(
        default_factory=lambda: [(10 / 240, 0.1), (20 / 240, 0.5), (180 / 240, 1.0), (210 / 240, 0.5), (1.0, 0.1)],
        description="(end fraction of the run, NORM weight multiplier) pieces; the authors' 240-epoch schedule",
    )


class MergeCfg(Section):
    pass


class VerifyCfg(Section):
    fp32_rel_tol: float = Field(1e-4, gt=0, description="max |merged-unmerged| / max |logit|, float32")
    fp64_rel_tol: float = Field(1e-9, gt=0, description="the same in float64")
    fp64_samples: int = Field(256, ge=1)
    min_top1_agreement: float = Field(0.999, ge=0, le=1)


class ExportCfg(Section):
    opset: int = Field(18, ge=18)
    max_batch: int = Field(256, ge=2)
    atol: float = Field(1e-4, ge=0)
    rtol: float = Field(1e-3, ge=0)
    parity_samples: int = Field(1024, ge=1)
    exporter: Literal["auto", "torchscript"] = Field(
        "auto", description="auto: torch.export (dynamo), TorchScript when that fails; torchscript: TorchScript only "
        "(seconds faster per model, for quick runs such as configs/tiny.yaml)")


class QuantizeCfg(Section):
    enabled: bool = Field(True, description="false: skip the quantize stage (no INT8 model, no fp16 accuracy gate)")
    calibration_samples: int = Field(256, ge=1, description="training images (fixed seeded slice) for INT8 calibration")
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    max_drop: float = Field(1.0, ge=0, description="top-1 points an INT8/fp16 model may lose vs fp32 and still ship")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], description="INT8 vs fp32 CPU benchmark batches")
    warmup: int = Field(5, ge=0)
    blocks: int = Field(12, ge=2, description="ABBA rounds of the paired INT8 vs fp32 benchmark")
    block_runs: int = Field(5, ge=1)
    threads: int = Field(1, ge=1, description="onnxruntime intra-op threads for the benchmark")
    bootstrap: int = Field(2000, ge=100)


class EngineCfg(Section):
    precisions: list[Literal["fp32", "fp16", "int8"]] = Field(
        default=["fp32", "fp16", "int8"],
        description="int8 is built from quantize/model_int8.onnx (Q/DQ) when the quantize stage shipped it")
    min_batch: int = Field(1, ge=1)
    opt_batch: int = Field(32, ge=1)
    max_batch: int = Field(256, ge=1)
    workspace_mb: int = Field(1024, ge=16)
    optimization_level: int = Field(3, ge=0, le=5)
    hardware_compatibility: Literal["none", "ampere_plus", "same_compute_capability"] = "none"
    timing_cache: Optional[Path] = Field(None, description="shared timing cache file; None = <run root>/.trt_timing_cache")
    fp32_atol: float = Field(1e-3, ge=0)
    fp32_rtol: float = Field(1e-3, ge=0)
    fp16_atol: float = Field(5e-2, ge=0)
    fp16_rtol: float = Field(5e-2, ge=0)

    @model_validator(mode="after")
    def _profile(self) -> "EngineCfg":
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need min_batch <= opt_batch <= max_batch (got {self.min_batch}, {self.opt_batch}, {self.max_batch})")
        return self


class BenchmarkCfg(Section):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32])
    backends: list[Literal["torch", "onnxruntime", "tensorrt"]] = Field(default=["torch", "onnxruntime", "tensorrt"])
    include_teacher: bool = True
    warmup: int = Field(5, ge=0)
    blocks: int = Field(12, ge=2, description="rounds per cell (each runs one block of every model); the verdict "
                        "cell's minimum")
    block_runs: int = Field(5, ge=1, description="timed runs in one block")
    threads: int = Field(1, ge=1, description="intra-op threads for the verdict (single-threaded is least noisy)")
    band: float = Field(0.02, gt=0, lt=1, description="verdict 'yes': merged/vanilla CI inside 1 +- band; 'no': CI "
                        "entirely beyond one edge; else 'inconclusive'")
    max_seconds: float = Field(25.0, gt=0, description="time budget of the verdict cell's adaptive rounds (vanilla, "
                               "vanilla_b, merged, unmerged): rounds are added until the merged/vanilla CI half-width is "
                               "<= band/2 and the A/A CI inside 1 +- band/2, or this is spent")
    bootstrap: int = Field(2000, ge=100)
    multithreaded: bool = Field(True, description="also time onnxruntime with torch's default thread count (informational)")
    verdict_clock: Literal["cpu", "wall"] = Field(
        "cpu", description="clock of the verdict: cpu = CPU time of the single inference thread (other processes on a "
        "shared machine cannot stretch it), wall = wall clock; both are always reported")


class BundleCfg(Section):
    tarball: bool = True
    include_engines: bool = True
    fp16_onnx: bool = Field(True, description="also ship model_fp16.onnx (fp16 weights, fp32 I/O) for TensorRT 11 fp16 builds")
    golden_samples: int = Field(64, ge=1, description="validation images in golden.npz for the on-device self-test")


class PipelineConfig(Section):
    run: RunCfg = Field(default_factory=RunCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    teacher: TeacherCfg = Field(default_factory=TeacherCfg)
    student: StudentCfg = Field(default_factory=StudentCfg)
    baseline: BaselineCfg = Field(default_factory=BaselineCfg)
    distill: DistillCfg = Field(default_factory=DistillCfg)
    merge: MergeCfg = Field(default_factory=MergeCfg)
    verify: VerifyCfg = Field(default_factory=VerifyCfg)
    export: ExportCfg = Field(default_factory=ExportCfg)
    quantize: QuantizeCfg = Field(default_factory=QuantizeCfg)
    engine: EngineCfg = Field(default_factory=EngineCfg)
    benchmark: BenchmarkCfg = Field(default_factory=BenchmarkCfg)
    bundle: BundleCfg = Field(default_factory=BundleCfg)

    @model_validator(mode="after")
    def _student_seed(self) -> "PipelineConfig":
        """Resolve the student's seed here, so records and fingerprints always hold the seed that was used."""
        if self.student.seed is None:
            self.student.seed = self.run.seed
        return self

    def section(self, path: str) -> Any:
        """Value at a dotted path ("distill" or "run.seed"), as plain JSON-able data."""
        obj: Any = self
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj


#: keys that existed once, with what to do instead (a clearer line than "unknown key")
REMOVED_KEYS = {
    "teacher.pretrained": "removed: no stage ever applied it; to start from existing weights set "
                          "teacher.checkpoint to a state_dict file",
}


def _format_validation_error(e: ValidationError, source: str) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = REMOVED_KEYS.get(loc, "unknown key (check the spelling; `norm-pipeline config --defaults` lists every key)")
        parts.append(f"{loc}: {msg}")
    return f"invalid config ({source}): " + "; ".join(parts)


def _set_path(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise PipelineError(f"--set {dotted}: {k!r} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``section.key=value`` -> (path, YAML-typed value)."""
    if "=" not in item:
        raise PipelineError(f"--set {item!r}: expected section.key=value, e.g. --set distill.epochs=3")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or "." not in key:
        raise PipelineError(f"--set {item!r}: the key must name a section and a field, e.g. distill.epochs")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: Path | str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Defaults <- YAML file <- ``--set`` overrides, validated; user errors raise ``PipelineError``."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise PipelineError(f"config file not found: {path} (pass -c with an existing YAML file)")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise PipelineError(f"invalid YAML in {path}{where}: {getattr(e, 'problem', None) or e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise PipelineError(f"invalid config ({path}): the top level must be a mapping of sections")
        data = loaded
    for item in overrides:
        key, value = parse_override(item)
        _set_path(data, key, value)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise PipelineError(_format_validation_error(e, source + (" + --set" if overrides else ""))) from None


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
