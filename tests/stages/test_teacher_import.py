"""Importing teachers trained elsewhere: every accepted checkpoint format, the stage path, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from models.registry import create_model
from pipeline.config import load_config
from stages.lib.checkpoints import import_teacher, load_model, save_model
from stages.lib.errors import PipelineError
from tests.conftest import randomize_bn

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _source(name: str, seed: int = 1, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = create_model(name, num_classes=10, **kw)
    randomize_bn(m, seed)
    return m.eval()


def _import(tmp_path, obj, name: str, **kw) -> torch.nn.Module:
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    torch.manual_seed(99)  # a different init: only the import can make the outputs match
    return import_teacher(path, create_model(name, num_classes=10, **kw), name)


# --- the authors' (RepDistiller / NORM) key names, written out from their module layout -----------------
def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def authors_resnet_keys(sd: dict) -> list[str]:
    """Their CIFAR ResNet: conv1, bn1, layerN.i.{conv1,bn1,conv2,bn2,downsample.0/1}, then ``fc``."""
    return [k.replace("head.fc.", "fc.") for k in sd]


def authors_resnet50_keys(sd: dict) -> list[str]:
    """Their CIFAR ResNet50 (resnetv2.py): Bottlenecks with a ``shortcut`` Sequential, then ``linear``."""
    return [k.replace(".downsample.", ".shortcut.").replace("head.fc.", "linear.") for k in sd]


def authors_wrn_keys(depth: int, widen: int) -> list[str]:
    """Their WRN: conv1; blockN.layer.i.{bn1, conv1, bn2, conv2, convShortcut}; bn1; fc."""
    n, widths, keys, in_planes = (depth - 4) // 6, (16 * widen, 32 * widen, 64 * widen), ["conv1.weight"], 16
    for b, planes in enumerate(widths, start=1):
        for i in range(n):
            p = f"block{b}.layer.{i}"
            keys += _bn(f"{p}.bn1") + [f"{p}.conv1.weight"] + _bn(f"{p}.bn2") + [f"{p}.conv2.weight"]
            if i == 0 and in_planes != planes:
                keys.append(f"{p}.convShortcut.weight")
            in_planes = planes
    return keys + _bn("bn1") + ["fc.weight", "fc.bias"]


def authors_vgg8_keys() -> list[str]:
    """Their VGG-8-BN: block0..block4, each one conv (with bias) + BN, then ``classifier``."""
    keys = []
    for b in range(5):
        keys += [f"block{b}.0.weight", f"block{b}.0.bias"] + _bn(f"block{b}.1")
    return keys + ["classifier.weight", "classifier.bias"]


@pytest.mark.parametrize("name, keys", [
    ("resnet8", authors_resnet_keys), ("resnet50_cifar", authors_resnet50_keys),
    ("wrn_16_1", lambda sd: authors_wrn_keys(16, 1)), ("vgg8", lambda sd: authors_vgg8_keys()),
])
def test_authors_cifar_checkpoint_maps_onto_our_names(tmp_path, name, keys):
    src = _source(name)
    sd = src.state_dict()
    names = keys(sd)
    assert len(names) == len(sd) and names != list(sd), "the authors' names must differ from ours"
    authors = dict(zip(names, sd.values(), strict=True))
    state = {"epoch": 240, "model": authors, "best_acc": torch.tensor(79.4), "optimizer": {"state": {}, "param_groups": []}}
    model = _import(tmp_path, state, name)
    assert torch.equal(model(X), src(X))


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module_prefix", "ours"])
def test_each_format_loads_and_gives_identical_outputs(tmp_path, wrap):
    src = _source("resnet8")
    sd = src.state_dict()
    if wrap == "ours":
        save_model(tmp_path / "ckpt.pth", src, name="resnet8", num_classes=10, in_chans=3)
        model = import_teacher(tmp_path / "ckpt.pth", create_model("resnet8", num_classes=10), "resnet8")
    else:
        obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3},
               "module_prefix": {"model": {f"module.{k}": v for k, v in sd.items()}}}[wrap]
        model = _import(tmp_path, obj, "resnet8")
    assert not model.training
    assert torch.equal(model(X), src(X))


def test_torchvision_state_dict_for_tv_models(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(3)
    tv = resnet18(num_classes=10)
    randomize_bn(tv, 3)
    tv.eval()
    model = _import(tmp_path, tv.state_dict(), "tv_resnet18")
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model(x), tv(x))


def test_other_architecture_names_teacher_model(tmp_path):
    with pytest.raises(PipelineError, match=r"does not fit teacher.model='resnet20'.*set teacher.model") as e:
        _import(tmp_path, {"model": _source("resnet8").state_dict()}, "resnet20")
    assert "\n" not in str(e.value)
    with pytest.raises(PipelineError, match=r"teacher.model='tv_resnet34'") as e:
        _import(tmp_path, _source("tv_resnet18").state_dict(), "tv_resnet34")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content, needle", [
    ("truncated", "not a readable PyTorch checkpoint"),
    ("text", "not a readable PyTorch checkpoint"),
    ("no_tensors", "holds no state_dict of tensors"),
    ("missing", "teacher checkpoint not found"),
])
def test_unusable_files_give_one_line_errors(tmp_path, content, needle):
    path = tmp_path / "ckpt.pth"
    if content == "truncated":
        torch.save(_source("resnet8").state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == "text":
        path.write_text("these are not the weights you are looking for\n")
    elif content == "no_tensors":
        torch.save({"model": {"epochs": 240, "lr": 0.05}}, path)
    with pytest.raises(PipelineError, match=needle) as e:
        import_teacher(path, create_model("resnet8", num_classes=10), "resnet8")
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_teacher_stage_imports_and_evaluates_instead_of_training(tmp_path, make_ctx, upstream, monkeypatch):
    from pipeline.graph import stage_module
    from stages.lib import training

    teacher_stage = stage_module("teacher")
    from stages.lib.datasets import val_batches

    src = _source("resnet8", in_chans=1)
    ckpt = tmp_path / "resnet8_best.pth"
    torch.save({"epoch": 240, "model": {k.replace("head.fc.", "fc."): v for k, v in src.state_dict().items()}}, ckpt)
    monkeypatch.setattr(training, "fit", lambda **kw: pytest.fail("an imported teacher must not be trained"))
    cfg = load_config(None, [f"data.root={upstream['cfg'].data.root}", "teacher.model=resnet8",
                             f"teacher.checkpoint={ckpt}", "run.device=cpu"])
    ctx = make_ctx("teacher", cfg=cfg)
    metrics = teacher_stage.run(ctx)
    assert metrics["imported"] is True and sorted(ctx.out_dir.iterdir()) == [ctx.out_dir / "model.pt"]
    model, meta = load_model(ctx.out_dir / "model.pt")
    assert meta["model"] == "resnet8" and meta["source"] == str(ckpt)
    meta_ds = json.loads((upstream["data"] / "dataset.json").read_text())
    correct = total = 0
    with torch.no_grad():
        for x, y in val_batches(meta_ds, batch_size=64):
            assert torch.equal(model(x), src(x))
            correct += int((src(x).argmax(1) == y).sum())
            total += len(y)
    assert metrics["top1"] == pytest.approx(correct / total)
