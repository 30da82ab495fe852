"""TensorRT rules without TensorRT: versions, platform, build settings, the trtexec command, sidecars, and
whether a plan may load here. Pure Python (no GPU, no tensorrt import), so every rule is tested on CPU.

The rules follow NVIDIA's engine-compatibility documentation (see docs/tensorrt.md): a plan loads only on
the TensorRT version that built it (major.minor.patch, and build where both sides know it), on the same
OS and CPU architecture, on the same JetPack/L4T release on Jetson, and on a GPU of the same compute
capability unless it was built hardware-compatible (Ampere+, or same compute capability from 10.9; neither
on JetPack). Version-compatible plans are not produced by this pipeline.
"""
from __future__ import annotations

import json
import platform
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from stages.lib.errors import PipelineError
from stages.lib.io import sha256_file

SIDECAR_FORMAT = "norm-pipeline/trt-engine/1"
PRECISIONS = ("fp32", "fp16", "int8")
HW_LEVELS = {"none": "NONE", "ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}
TRTEXEC_HW = {"ampere_plus": "ampere+", "same_compute_capability": "sameComputeCapability"}
INSTALL_HINT = ("pip install 'norm-pipeline[tensorrt-cu12]' (NVIDIA driver >= 525) or '[tensorrt-cu13]' (driver >= 580) "
                "on a machine with an NVIDIA GPU; on Jetson, TensorRT comes with JetPack (apt)")


# ----------------------------------------------------------------------------- versions
def parse_version(v: str) -> tuple[int, ...]:
    """'10.3.0.26' -> (10, 3, 0, 26); trailing non-numeric parts ('11.4.1.post1') are ignored."""
    out = []
    for part in str(v).split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
    if not out:
        raise ValueError(f"not a version string: {v!r}")
    return tuple(out)


def parse_cc(cc: str | tuple | list) -> tuple[int, int]:
    """Compute capability '8.6' or (8, 6) -> (8, 6)."""
    parts = parse_version(cc) if isinstance(cc, str) else tuple(int(c) for c in cc)
    return (parts[0], parts[1] if len(parts) > 1 else 0)


def same_tensorrt(built: str, here: str) -> bool:
    """TensorRT's own rule for plans: major.minor.patch equal, and the build number too when both know it."""
    b, h = parse_version(built), parse_version(here)
    n = max(3, min(len(b), len(h)))
    pad = lambda v: v + (0,) * (n - len(v))  # noqa: E731 - '10.3' means 10.3.0
    return pad(b)[:n] == pad(h)[:n]


# ----------------------------------------------------------------------------- platform
def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def l4t_release(root: Path | str = "/") -> Optional[str]:
    """Jetson's L4T release ('36.4.3', from /etc/nv_tegra_release), or None off Jetson. JetPack maps 1:1 to it."""
    text = _read(Path(root) / "etc/nv_tegra_release")
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text or "")
    return f"{m.group(1)}.{m.group(2)}" if m else None


def nvidia_driver(root: Path | str = "/") -> Optional[str]:
    """The NVIDIA kernel driver version ('550.54.15') from /proc/driver/nvidia/version, or None."""
    m = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?([\d.]+)", _read(Path(root) / "proc/driver/nvidia/version") or "")
    return m.group(1) if m else None


def cuda_version_string(v: Any) -> Optional[str]:
    """CUDA's integer version (12040) -> '12.4'."""
    try:
        v = int(v)
    except (TypeError, ValueError):
        return None
    return f"{v // 1000}.{v % 1000 // 10}" if v > 0 else None


def platform_info(cuda: Optional[dict] = None, root: Path | str = "/") -> dict:
    """OS, CPU architecture, NVIDIA driver, CUDA versions and (Jetson) L4T release of this machine."""
    cuda = cuda or {}
    return {"os": platform.system(), "arch": platform.machine(), "driver": nvidia_driver(root),
            "cuda_driver": cuda.get("cuda_driver"), "cuda_runtime": cuda.get("cuda_runtime"), "l4t": l4t_release(root)}


# ----------------------------------------------------------------------------- build settings and trtexec
@dataclass(frozen=True)
class BuildSettings:
    """Everything that decides how an engine is built: ``build_engine`` applies it, ``trtexec_command`` spells
    it for trtexec, so the shipped command and the pipeline's build cannot drift apart."""

    precision: str
    input_name: str
    min_shape: tuple
    opt_shape: tuple
    max_shape: tuple
    workspace_mb: int = 1024
    optimization_level: int = 3
    hardware_compatibility: str = "none"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise PipelineError(f"unsupported engine precision {self.precision!r}; use one of {', '.join(PRECISIONS)} "
                                "(int8 is built from a Q/DQ ONNX, the quantize stage's model_int8.onnx)")
        if self.hardware_compatibility not in HW_LEVELS:
            raise PipelineError(f"engine.hardware_compatibility={self.hardware_compatibility!r}; use one of {', '.join(HW_LEVELS)}")

    @property
    def tf32(self) -> bool:
        """fp32 means fp32: TF32 would loosen parity (TensorRT and trtexec enable it by default). int8 clears it too:
        the layers its Q/DQ nodes leave in fp32 stay exact, as in the Q/DQ reference that gated it."""
        return self.precision == "fp16"

    @property
    def strongly_typed(self) -> bool:
        """int8 is explicit quantization: a strongly typed network whose Q/DQ nodes decide where int8 runs, with no
        precision flag (TensorRT 11 has none; on 10.x they are not allowed with strong typing)."""
        return self.precision == "int8"

    @property
    def shapes(self) -> dict[str, list[int]]:
        return {"min": list(self.min_shape), "opt": list(self.opt_shape), "max": list(self.max_shape)}

    def as_dict(self) -> dict:
        return {**asdict(self), "min_shape": list(self.min_shape), "opt_shape": list(self.opt_shape),
                "max_shape": list(self.max_shape), "tf32": self.tf32, "strongly_typed": self.strongly_typed}


def check_profile(min_batch: int, opt_batch: int, max_batch: int) -> None:
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise PipelineError(f"invalid TensorRT batch profile min={min_batch} opt={opt_batch} max={max_batch}: "
                            "need 1 <= engine.min_batch <= engine.opt_batch <= engine.max_batch")


def profile_shapes(input_shape: list, min_batch: int, opt_batch: int, max_batch: int) -> dict[str, list[int]]:
    """min/opt/max shapes for an NCHW input whose only dynamic axis is the batch (axis 0)."""
    check_profile(min_batch, opt_batch, max_batch)
    rest = list(input_shape[1:])
    if any(not isinstance(d, int) or d <= 0 for d in rest):
        raise PipelineError(f"the ONNX input shape {input_shape} has dynamic axes besides the batch; "
                            "re-export with a fixed input size")
    return {"min": [min_batch, *rest], "opt": [opt_batch, *rest], "max": [max_batch, *rest]}


def build_settings(*, precision: str, input_name: str, input_shape: list, min_batch: int, opt_batch: int, max_batch: int,
                   workspace_mb: int = 1024, optimization_level: int = 3, hardware_compatibility: str = "none") -> BuildSettings:
    """BuildSettings from the engine config's values and the ONNX input (name, shape with a dynamic batch)."""
    s = profile_shapes(input_shape, min_batch, opt_batch, max_batch)
    return BuildSettings(precision=precision, input_name=input_name, min_shape=tuple(s["min"]), opt_shape=tuple(s["opt"]),
                         max_shape=tuple(s["max"]), workspace_mb=int(workspace_mb), optimization_level=int(optimization_level),
                         hardware_compatibility=hardware_compatibility)


def trtexec_args(settings: BuildSettings, onnx: str, plan: str, *, fp16_mode: str = "builder_flag") -> list[str]:
    """trtexec's arguments for ``settings``; ``fp16_mode`` 'builder_flag' (TensorRT 10: --fp16) or 'fp16_onnx'
    (TensorRT 11: strongly typed, the fp16 ONNX carries the precision)."""
    spec = lambda s: f"{settings.input_name}:{'x'.join(str(d) for d in s)}"  # noqa: E731
    args = [f"--onnx={onnx}", f"--saveEngine={plan}", f"--minShapes={spec(settings.min_shape)}",
            f"--optShapes={spec(settings.opt_shape)}", f"--maxShapes={spec(settings.max_shape)}",
            f"--memPoolSize=workspace:{settings.workspace_mb}M", f"--builderOptimizationLevel={settings.optimization_level}"]
    if not settings.tf32:
        args.append("--noTF32")
    if settings.strongly_typed:
        args.append("--stronglyTyped")
    if settings.precision == "fp16" and fp16_mode == "builder_flag":
        args.append("--fp16")
    if settings.hardware_compatibility != "none":
        args.append(f"--hardwareCompatibilityLevel={TRTEXEC_HW[settings.hardware_compatibility]}")
    return args


def trtexec_command(settings: BuildSettings, onnx: str, plan: str, *, fp16_mode: str = "builder_flag") -> str:
    """The shell line (continued over lines) that rebuilds an engine exactly as the pipeline built it."""
    return " \\\n    ".join(["trtexec", *trtexec_args(settings, onnx, plan, fp16_mode=fp16_mode)])


def trtexec_commands(e: Any, inp: dict, int8: bool = False) -> dict[str, str | None]:
    """The trtexec lines that rebuild the engines on the device, from the same BuildSettings the engine stage
    builds with, so both agree on profile, workspace, level, TF32 and compatibility."""
    def settings(precision: str):
        return build_settings(precision=precision, input_name=inp["name"], input_shape=inp["shape"], min_batch=e.min_batch,
                              opt_batch=e.opt_batch, max_batch=e.max_batch, workspace_mb=e.workspace_mb,
                              optimization_level=e.optimization_level, hardware_compatibility=e.hardware_compatibility)

    return {"fp32": trtexec_command(settings("fp32"), "model.onnx", "device_fp32.plan"),
            "fp16_trt10": trtexec_command(settings("fp16"), "model.onnx", "device_fp16.plan", fp16_mode="builder_flag"),
            "fp16_trt11": trtexec_command(settings("fp16"), "model_fp16.onnx", "device_fp16.plan", fp16_mode="fp16_onnx"),
            # explicit quantization: the Q/DQ ONNX carries the precision, the network is strongly typed
            "int8": trtexec_command(settings("int8"), "model_int8.onnx", "device_int8.plan") if int8 else None}


# ----------------------------------------------------------------------------- sidecars
def make_sidecar(*, plan_path: Path, onnx_path: Path, precision: str, fp16_mode: Optional[str], tensorrt_version: str,
                 gpu: dict, profile: dict, hardware_compatibility: str, inputs: list[dict], outputs: list[dict],
                 build_seconds: float, optimization_level: int, workspace_mb: int, platform: Optional[dict] = None,
                 trtexec: Optional[str] = None) -> dict:
    """What the engine needs next to it: the plan itself stays byte-for-byte TensorRT's (trtexec loads it)."""
    return {
        "format": SIDECAR_FORMAT, "plan": Path(plan_path).name, "plan_sha256": sha256_file(plan_path),
        "plan_bytes": Path(plan_path).stat().st_size, "onnx": Path(onnx_path).name, "onnx_sha256": sha256_file(onnx_path),
        "precision": precision, "fp16_mode": fp16_mode, "tensorrt_version": tensorrt_version,
        "gpu_name": gpu.get("name"), "compute_capability": gpu.get("compute_capability"),
        "hardware_compatibility": hardware_compatibility, "platform": platform,
        "profile": profile, "inputs": inputs, "outputs": outputs, "build_seconds": round(build_seconds, 3),
        "builder_optimization_level": optimization_level, "workspace_mb": workspace_mb, "trtexec": trtexec,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def sidecar_path_for(plan_path: Path | str) -> Path:
    return Path(plan_path).with_suffix(".json")


def load_sidecar(path: Path | str) -> dict:
    path = Path(path)
    try:
        side = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"engine sidecar {path} not found: it records the TensorRT version and GPU the engine was built for; "
                            "rebuild the engine with `norm-pipeline stage engine`") from None
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(f"engine sidecar {path} is not readable JSON ({e})") from None
    if not isinstance(side, dict) or side.get("format") != SIDECAR_FORMAT:
        raise PipelineError(f"{path} is not a norm-pipeline engine sidecar (no {SIDECAR_FORMAT!r} format tag)")
    return side


# ----------------------------------------------------------------------------- may this plan load here?
def rebuild_hint(side: dict) -> str:
    """'rebuild with trtexec on the device' and the exact command when the sidecar has it."""
    cmd = " ".join(side["trtexec"].replace("\\\n", " ").split()) if side.get("trtexec") else None
    how = f": {cmd}" if cmd else " (the bundle README has the command)"
    return f"rebuild the engine with trtexec on the device from {side.get('onnx', 'model.onnx')}{how}"


def check_compatibility(sidecar: dict, runtime_info: dict) -> None:
    """Refuse, with the reason and the rebuild command, a plan that TensorRT would not load here."""
    plan, fix = sidecar.get("plan", "engine"), rebuild_hint(sidecar)
    built, here = sidecar.get("tensorrt_version"), runtime_info.get("tensorrt_version")
    if not here:
        raise PipelineError(f"{plan} needs TensorRT {built}, which is not installed here; {INSTALL_HINT}")
    if not same_tensorrt(built, here):
        raise PipelineError(f"{plan} was built with TensorRT {built} but this machine has TensorRT {here}: TensorRT loads a plan "
                            f"only on the exact version that built it; {fix}")
    bp, hp = sidecar.get("platform") or {}, runtime_info.get("platform") or {}
    for key, what in (("os", "operating system"), ("arch", "CPU architecture")):
        if bp.get(key) and hp.get(key) and bp[key] != hp[key]:
            raise PipelineError(f"{plan} was built on {bp[key]} but this machine is {hp[key]} ({what}): TensorRT plans are "
                                f"not portable across platforms; {fix}")
    if bp and hp and bp.get("l4t") != hp.get("l4t"):
        where = lambda p: f"JetPack (L4T {p['l4t']})" if p.get("l4t") else "a non-Jetson host"  # noqa: E731
        raise PipelineError(f"{plan} was built on {where(bp)} but this machine is {where(hp)}: plans do not move between "
                            f"JetPack releases or between Jetson and other hosts; {fix}")
    built_cc, here_cc = sidecar.get("compute_capability"), runtime_info.get("compute_capability")
    if not here_cc:
        raise PipelineError(f"{plan} needs an NVIDIA GPU but no CUDA device is visible here")
    level = sidecar.get("hardware_compatibility", "none")
    if level != "none" and hp.get("l4t"):
        raise PipelineError(f"{plan} was built hardware-compatible ({level}), which JetPack does not support; {fix}")
    if level == "ampere_plus":
        if parse_cc(here_cc) < (8, 0):
            raise PipelineError(f"{plan} was built hardware-compatible for Ampere and newer (compute capability >= 8.0); "
                                f"this GPU ({runtime_info.get('gpu_name')}) has {here_cc}: {fix}")
    elif parse_cc(built_cc) != parse_cc(here_cc):
        raise PipelineError(f"{plan} was built for compute capability {built_cc} ({sidecar.get('gpu_name')}) but this GPU "
                            f"({runtime_info.get('gpu_name')}) has {here_cc}: {fix}, or build with "
                            "engine.hardware_compatibility=ampere_plus for a portable engine")


def compatibility_notes(sidecar: dict, runtime_info: dict) -> list[str]:
    """Differences that do not stop loading but are worth a line in the log."""
    notes = []
    built, here = sidecar.get("tensorrt_version"), runtime_info.get("tensorrt_version")
    if built and here and len(parse_version(built)) != len(parse_version(here)):
        notes.append(f"engine built with TensorRT {built}, running on {here}: the build number could not be compared")
    if sidecar.get("version_compatible"):
        notes.append("the sidecar says version-compatible, but this pipeline checks such plans like any other (exact version)")
    bp, hp = sidecar.get("platform"), runtime_info.get("platform") or {}
    if not bp:
        notes.append("the sidecar records no platform (OS, CPU, driver): built by an older norm-pipeline, not checked")
    else:
        for key, what in (("driver", "NVIDIA driver"), ("cuda_driver", "CUDA driver API"), ("cuda_runtime", "CUDA runtime")):
            if bp.get(key) and hp.get(key) and bp[key] != hp[key]:
                notes.append(f"engine built with {what} {bp[key]}, running with {hp[key]}")
    if sidecar.get("hardware_compatibility", "none") == "none" and sidecar.get("gpu_name") != runtime_info.get("gpu_name"):
        notes.append(f"engine built on {sidecar.get('gpu_name')}, running on {runtime_info.get('gpu_name')} "
                     "(same compute capability; TensorRT advises rebuilding per GPU model)")
    return notes
