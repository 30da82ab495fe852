"""Which autocast precision a training stage uses: ``amp: auto`` resolved from the hardware, with its reason.

The choice is a pure function of the hardware's reported capabilities (no timing at run start), so the
same machine always trains the same way, and the stage record says what was used and why:

- CPU: bf16 only where the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16 instructions): there bf16
  autocast made the default run's NORM training 1.57x and the baseline 1.25x faster with accuracies within
  seed noise. On CPUs without them (AVX2, or AVX-512 without BF16) bf16 is emulated by conversions and is
  no faster, so ``auto`` keeps fp32.
- CUDA: fp32. bf16 autocast measured no faster for this project's networks (H200: 0.83x for resnet32x4 ->
  resnet8x4 on 32 px CIFAR images, batch 64: the step is kernel-launch bound). Large models/inputs
  (ImageNet) do gain on GPUs with bf16 tensor cores: set ``amp: bf16`` there.
- MPS and anything else: fp32.

``amp: none | bf16 | fp16`` are used as given (fp16 is for GPUs only).

The memory format (``channels_last: auto | true | false``) is chosen the same way:

- CPU: NHWC (channels_last). oneDNN computes convolutions in a channels-last layout; NCHW tensors are
  reordered on every call. Measured on a 2-core AVX2 EPYC, batch 128 of 28 px images: resnet20 training
  step 1.3x, resnet8 1.4-1.5x, the NORM step (resnet20 -> resnet8, N=8) 1.15-1.3x, evaluation 1.4-1.6x
  (benchmarks/train_speed.py runs the comparison on any machine). The same network: only float rounding differs.
- CUDA: NHWC with fp16/bf16 autocast (tensor-core convolutions want channels-last, NVIDIA's "Convolutional
  Layers User's Guide"), NCHW in fp32, where cuDNN gains nothing from it.
- anything else: NCHW.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from stages.lib.errors import PipelineError

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # torch.cpu.get_capabilities() keys (x86)


@dataclass(frozen=True)
class AmpChoice:
    """The resolved precision: ``dtype`` for autocast (None = fp32), its name and the reason it was chosen."""

    requested: str
    dtype: Optional[torch.dtype]
    reason: str

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def metrics(self) -> dict[str, str]:
        """What the stage record keeps: ``amp`` (fp32/bf16/fp16), what was asked for, and why."""
        return {"amp": self.name, "amp_requested": self.requested, "amp_reason": self.reason}

    def describe(self) -> str:
        return f"precision {self.name} (amp: {self.requested}; {self.reason})"


def cpu_capabilities() -> dict[str, Any]:
    """The CPU's instruction-set flags as torch's cpuinfo reports them ({} where torch cannot tell)."""
    try:
        return dict(torch.cpu.get_capabilities())
    except Exception:  # noqa: BLE001 - capability probe: an old torch or an exotic CPU means "unknown"
        return {}


def _isa(caps: Mapping[str, Any]) -> str:
    """The CPU's best vector ISA in words, for the reason string."""
    if caps.get("amx_tile"):
        return "AMX (no AMX-BF16)"
    if caps.get("avx512_f"):
        return "AVX-512 without AVX512-BF16"
    if caps.get("avx2"):
        return "AVX2 only"
    return str(caps.get("architecture") or "unknown ISA")


def cpu_native_bf16(caps: Optional[Mapping[str, Any]] = None) -> tuple[bool, str]:
    """(True, which flags) when the CPU has bf16 dot-product instructions, else (False, its ISA)."""
    caps = cpu_capabilities() if caps is None else caps
    have = [f for f in NATIVE_BF16_FLAGS if caps.get(f)]
    if have and torch.backends.mkldnn.is_available():
        return True, "+".join(f.upper().replace("_", "-") for f in have)
    return False, _isa(caps)


def resolve_amp(amp: str, device: str, *, caps: Optional[Mapping[str, Any]] = None) -> AmpChoice:
    """The autocast choice for ``amp`` on ``device``; ``caps`` overrides the CPU probe (tests)."""
    kind = device.split(":")[0]
    if amp == "none":
        return AmpChoice(amp, None, "fp32 as configured")
    if amp == "fp16":
        if kind == "cpu":
            raise PipelineError("amp=fp16 is for GPUs; use amp=bf16 (or auto) on CPU")
        return AmpChoice(amp, torch.float16, "fp16 autocast as configured")
    if amp == "bf16":
        if kind == "cpu":
            native, what = cpu_native_bf16(caps)
            note = f"native bf16 ({what})" if native else f"this CPU emulates bf16 ({what}): expect it slower than fp32"
            return AmpChoice(amp, torch.bfloat16, f"bf16 autocast as configured; {note}")
        return AmpChoice(amp, torch.bfloat16, "bf16 autocast as configured")
    if amp != "auto":
        raise PipelineError(f"unknown amp {amp!r}: use auto, none, bf16 or fp16")
    if kind == "cpu":
        native, what = cpu_native_bf16(caps)
        if native:
            return AmpChoice(amp, torch.bfloat16, f"CPU computes bf16 natively ({what}): bf16 autocast trains faster")
        return AmpChoice(amp, None, f"CPU has no AVX512-BF16/AMX-BF16 ({what}): bf16 would be emulated, no faster than fp32")
    if kind == "cuda":
        return AmpChoice(amp, None, "bf16 autocast measured no faster on GPUs for small networks (kernel-launch bound); "
                                    "set amp: bf16 for large models or inputs")
    return AmpChoice(amp, None, f"no measured autocast gain on {kind}")


@dataclass(frozen=True)
class LayoutChoice:
    """The resolved memory format: ``channels_last`` on or off, what was asked for, and why."""

    requested: str
    channels_last: bool
    reason: str

    def metrics(self) -> dict[str, Any]:
        return {"channels_last": self.channels_last, "channels_last_requested": self.requested,
                "channels_last_reason": self.reason}

    def describe(self) -> str:
        return f"memory format {'channels_last' if self.channels_last else 'NCHW'} (channels_last: {self.requested}; {self.reason})"


def resolve_channels_last(value: Any, device: str, amp_dtype: Optional[torch.dtype] = None) -> LayoutChoice:
    """``channels_last: auto | true | false`` on ``device`` (with the autocast dtype already resolved)."""
    if isinstance(value, bool):
        return LayoutChoice(str(value).lower(), value, "as configured")
    if value != "auto":
        raise PipelineError(f"unknown channels_last {value!r}: use auto, true or false")
    kind = device.split(":")[0]
    if kind == "cpu":
        return LayoutChoice("auto", True, "CPU: oneDNN convolutions run channels-last without per-call reorders "
                                          "(1.15-1.5x faster training measured on a 2-core AVX2 CPU)")
    if kind == "cuda":
        if amp_dtype in (torch.float16, torch.bfloat16):
            return LayoutChoice("auto", True, "CUDA with 16-bit autocast: tensor-core convolutions want channels-last")
        return LayoutChoice("auto", False, "CUDA in fp32: no gain from channels-last")
    return LayoutChoice("auto", False, f"no measured channels-last gain on {kind}")


def bf16_supported(device: str) -> bool:
    """Whether oneDNN/CUDA run bf16 autocast at all on ``device`` (natively or emulated): benchmarks' variants."""
    kind = device.split(":")[0]
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except Exception:  # noqa: BLE001 - capability probe
            return False
    return False
