"""Shared fixtures: a tiny generated Fashion-MNIST-format dataset and ready-made upstream artifacts."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


def write_idx(path: Path, array: np.ndarray) -> None:
    codes = {np.uint8: 0x08}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype.type], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def make_fashion_like(root: Path, n_train: int = 256, n_val: int = 128, seed: int = 0) -> Path:
    """IDX .gz files in Fashion-MNIST's layout: 10 classes, each a distinct bright bar pattern plus noise."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
        for i, lbl in enumerate(labels):
            images[i, 2 + 2 * lbl : 6 + 2 * lbl, 4:24] = 230  # class-specific horizontal bar
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    return make_fashion_like(tmp_path_factory.mktemp("fmnist"))


def randomize_bn(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so merges and exports are really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.25)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)


@pytest.fixture(scope="session")
def upstream(tmp_path_factory, tiny_data_root):
    """Finished `data`, `teacher`, `distill`, `merge` folders (random weights, non-trivial BN), with records.

    Returns dict: stage -> folder, plus "records": stage -> record dict, "cfg": a PipelineConfig for them.
    """
    from models.merge import merge_norm_student
    from models.norm import NormStudent
    from models.registry import create_model
    from pipeline.config import load_config
    from stages.lib.checkpoints import save_model, save_norm_student
    from stages.lib.dataset_describe import describe

    base = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [f"data.root={tiny_data_root}", "teacher.model=resnet14", "student.model=resnet8",
                             "distill.n=2", "export.max_batch=64", "engine.max_batch=64", "engine.opt_batch=8"])
    dirs = {s: base / s for s in ("data", "teacher", "distill", "merge")}
    for d in dirs.values():
        d.mkdir()
    meta = describe(dataset="fashion_mnist", root=tiny_data_root, download=False, train_limit=None, val_limit=None,
                    augment=True, crop_padding=2, hflip=True, image_size=28)
    (dirs["data"] / "dataset.json").write_text(json.dumps(meta))
    torch.manual_seed(0)
    teacher = create_model("resnet14", num_classes=10, in_chans=1)
    randomize_bn(teacher, 1)
    save_model(dirs["teacher"] / "model.pt", teacher.eval(), name="resnet14", num_classes=10, in_chans=1)
    ns = NormStudent(create_model("resnet8", num_classes=10, in_chans=1), teacher.num_features, n=2)
    randomize_bn(ns, 2)
    ns.eval()
    save_norm_student(dirs["distill"] / "norm_student.pt", ns, name="resnet8", num_classes=10, in_chans=1)
    merged = merge_norm_student(ns)
    save_model(dirs["merge"] / "model.pt", merged, name="resnet8", num_classes=10, in_chans=1)
    records = {s: {"stage": s, "status": "done", "metrics": {}, "fingerprint": s} for s in dirs}
    records["teacher"]["metrics"] = {"top1": 0.5, "top5": 0.9}
    records["distill"]["metrics"] = {"top1": 0.4, "best_top1": 0.45}
    return {**dirs, "records": records, "cfg": cfg, "base": base}


@pytest.fixture
def make_ctx(upstream, tmp_path):
    """make_ctx(stage, inputs=[...], **extra_inputs) -> StageContext writing into tmp_path/<stage>."""
    from stages.lib.context import StageContext

    def _make(stage: str, inputs: dict[str, Path] | None = None, records: dict | None = None, cfg=None):
        ins = {k: v for k, v in upstream.items() if k in ("data", "teacher", "distill", "merge")}
        ins.update(inputs or {})
        recs = dict(upstream["records"])
        recs.update(records or {})
        out = tmp_path / stage
        out.mkdir(exist_ok=True)
        return StageContext(name=stage, out_dir=out, run_dir=tmp_path, cfg=cfg or upstream["cfg"], inputs=ins,
                            input_records={k: recs[k] for k in ins if k in recs}, log=lambda m: None)

    return _make
