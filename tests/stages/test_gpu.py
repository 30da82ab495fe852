"""CUDA paths: AMP + channels_last training, the merge of a GPU-trained student, verify on the GPU."""
from __future__ import annotations

import csv

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA")]


@pytest.mark.parametrize("amp, channels_last", [("none", False), ("bf16", True), ("fp16", True)])
def test_norm_training_on_cuda_then_exact_merge(tmp_path, amp, channels_last):
    from models.distillers import NORM
    from models.merge import merge_norm_student
    from models.norm import NormStudent
    from models.registry import create_model
    from stages.lib.datasets import TensorSplit
    from stages.lib.training import TrainSpec, autocast_dtype, evaluate, fit

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (256, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    split = dict(mean=torch.tensor([0.3]), std=torch.tensor([0.35]), device="cuda")
    train = TensorSplit(x.cuda(), y.cuda(), batch_size=64, shuffle=True, augment=True, padding=2, hflip=True, **split)
    val = TensorSplit(x.cuda(), y.cuda(), batch_size=128, **split)
    teacher = create_model("resnet14", num_classes=10, in_chans=1).cuda().eval().requires_grad_(False)
    distiller = NORM(create_model("resnet8", num_classes=10, in_chans=1), teacher, epochs=2, n=2)
    ns = distiller.trainable
    assert isinstance(ns, NormStudent)

    spec = TrainSpec(epochs=2, lr=0.05, schedule="cosine", amp=amp, channels_last=channels_last)
    m = fit(distiller=distiller, train=train, val=val, spec=spec, out_dir=tmp_path, device="cuda",
            label="gpu", log=lambda s: None)
    assert m["epochs"] == 2
    # the reported accuracy is the last epoch's, of this very model: history.csv and a fresh evaluation agree
    with open(tmp_path / "history.csv", newline="") as f:
        hist = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in hist] == [1, 2] and m["top1"] == pytest.approx(float(hist[-1]["val_top1"]), abs=1e-6)
    again = evaluate(lambda xb: ns(xb)[0], val, device="cuda", amp_dtype=autocast_dtype(amp, "cuda"),
                     channels_last=channels_last)
    assert abs(again["top1"] - m["top1"]) <= 2 / 256, (again, m)  # cuDNN may break a near-tie the other way
    ns = ns.float().cpu().eval()
    merged = merge_norm_student(ns)
    xb = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        ref, out = ns(xb)[0], merged(xb)
    assert (ref - out).abs().max().item() / ref.abs().max().item() < 1e-4


def test_verify_stage_on_cuda(make_ctx):
    from pipeline.graph import stage_module

    verify_stage = stage_module("verify")

    ctx = make_ctx("verify", inputs={})
    ctx.device = "cuda"
    metrics = verify_stage.run(ctx)
    assert metrics["top1_agreement"] == 1.0
    assert metrics["fp64_max_rel_diff"] < 1e-9
