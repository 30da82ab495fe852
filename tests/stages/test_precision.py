"""amp: auto resolved from the hardware's capabilities (never from timing), and the training loop using it."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from stages.lib import precision
from stages.lib.errors import PipelineError
from stages.lib.precision import resolve_amp

AVX2 = {"architecture": "x86_64", "avx2": True}
AVX512 = {"architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bw": True}
AVX512_BF16 = {**AVX512, "avx512_bf16": True}
AMX = {**AVX512, "amx_tile": True, "amx_bf16": True}


@pytest.mark.parametrize("caps, name, words", [
    (AVX2, "fp32", "AVX2 only"),
    (AVX512, "fp32", "AVX-512 without AVX512-BF16"),
    (AVX512_BF16, "bf16", "AVX512-BF16"),
    (AMX, "bf16", "AMX-BF16"),
    ({}, "fp32", "unknown"),
])
def test_auto_on_cpu_follows_native_bf16(caps, name, words):
    choice = resolve_amp("auto", "cpu", caps=caps)
    assert choice.name == name
    assert words in choice.reason
    assert choice.metrics() == {"amp": name, "amp_requested": "auto", "amp_reason": choice.reason}


def test_auto_is_a_function_of_this_machines_capabilities():
    caps = dict(torch.cpu.get_capabilities())
    assert resolve_amp("auto", "cpu") == resolve_amp("auto", "cpu", caps=caps)
    if not (caps.get("avx512_bf16") or caps.get("amx_bf16")):  # e.g. this project's AVX2 machines
        assert resolve_amp("auto", "cpu").name == "fp32"


def test_auto_on_gpu_is_fp32_and_explicit_choices_are_kept():
    assert resolve_amp("auto", "cuda:0").dtype is None
    assert resolve_amp("auto", "mps").dtype is None
    assert resolve_amp("none", "cpu", caps=AMX).dtype is None
    assert resolve_amp("bf16", "cpu", caps=AVX2).dtype == torch.bfloat16
    assert "emulates" in resolve_amp("bf16", "cpu", caps=AVX2).reason
    assert resolve_amp("fp16", "cuda").dtype == torch.float16
    with pytest.raises(PipelineError, match="amp=fp16 is for GPUs"):
        resolve_amp("fp16", "cpu")


def test_schema_default_is_auto_for_every_training_stage():
    from pipeline.config import load_config

    cfg = load_config(None)
    assert (cfg.teacher.amp, cfg.baseline.amp, cfg.distill.amp) == ("auto", "auto", "auto")


class _Split:
    """A minimal in-memory split with the interface fit() uses."""

    def __init__(self, n: int = 32, batch: int = 16):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
        self.batch, self.num_samples = batch, n

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch)

    def __iter__(self):
        for i in range(0, len(self.y), self.batch):
            yield self.x[i : i + self.batch], self.y[i : i + self.batch]


@pytest.mark.parametrize("caps, expect", [(AVX2, None), (AVX512_BF16, torch.bfloat16)])
def test_fit_trains_under_the_resolved_precision_and_records_it(tmp_path, monkeypatch, caps, expect):
    from models.distillers import CE
    from stages.lib import training

    monkeypatch.setattr(precision, "cpu_capabilities", lambda: dict(caps))
    seen = []

    class Spy(CE):
        def forward_train(self, x, y, epoch):
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            logits = self.student(x)
            return logits, {"ce": nn.functional.cross_entropy(logits.float(), y)}

    logs: list[str] = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    metrics = training.fit(distiller=Spy(model), train=_Split(), val=_Split(),
                           spec=training.TrainSpec(epochs=1, lr=0.1, amp="auto"), out_dir=tmp_path, device="cpu",
                           label="tiny", log=logs.append)
    assert seen and set(seen) == {expect}
    choice = resolve_amp("auto", "cpu", caps=caps)
    assert (metrics["amp"], metrics["amp_reason"], metrics["amp_requested"]) == (choice.name, choice.reason, "auto")
    assert any(choice.reason in line for line in logs)


@pytest.mark.parametrize("value, device, amp_dtype, expect", [
    ("auto", "cpu", None, True),
    ("auto", "cpu", torch.bfloat16, True),
    ("auto", "cuda:0", None, False),
    ("auto", "cuda", torch.bfloat16, True),
    ("auto", "cuda", torch.float16, True),
    ("auto", "mps", None, False),
    (True, "cuda", None, True),
    (False, "cpu", None, False),
])
def test_channels_last_choice(value, device, amp_dtype, expect):
    choice = precision.resolve_channels_last(value, device, amp_dtype)
    assert choice.channels_last is expect
    assert choice.metrics()["channels_last"] is expect and choice.reason
    with pytest.raises(PipelineError, match="unknown channels_last"):
        precision.resolve_channels_last("yes", device)


def test_schema_default_channels_last_is_auto_and_booleans_still_parse():
    from pipeline.config import load_config

    cfg = load_config(None)
    assert (cfg.teacher.channels_last, cfg.baseline.channels_last, cfg.distill.channels_last) == ("auto",) * 3
    assert load_config(None, ["distill.channels_last=false"]).distill.channels_last is False


@pytest.mark.parametrize("value, expect", [("auto", True), (False, False)])
def test_fit_trains_in_the_resolved_memory_format_and_records_it(tmp_path, value, expect):
    from models.distillers import CE
    from stages.lib import training

    seen = []

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

        def forward(self, x):
            if self.training:
                seen.append((x.is_contiguous(memory_format=torch.channels_last),
                             self.conv.weight.is_contiguous(memory_format=torch.channels_last)))
            return self.fc(self.conv(x).mean((2, 3)))

    split = _Split()
    split.x = torch.randn(32, 3, 8, 8)  # 3 channels: with one, NCHW and NHWC strides coincide
    logs: list[str] = []
    metrics = training.fit(distiller=CE(Conv()), train=split, val=split,
                           spec=training.TrainSpec(epochs=1, lr=0.1, channels_last=value), out_dir=tmp_path,
                           device="cpu", label="tiny", log=logs.append)
    assert seen and set(seen) == {(expect, expect)}
    assert metrics["channels_last"] is expect and metrics["channels_last_requested"] == str(value).lower()
    assert any("channels_last" in line or "NCHW" in line for line in logs)
