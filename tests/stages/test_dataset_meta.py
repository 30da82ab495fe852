"""dataset.json as DatasetMeta, and validation-only loading that never reads a training file."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from stages.lib import datasets as ds
from stages.lib.dataset_meta import DatasetMeta
from stages.lib.errors import PipelineError


def _describe(dataset, root, **kw):
    from stages.lib.dataset_describe import describe

    args = dict(download=False, train_limit=None, val_limit=None, augment=True, crop_padding=2, hflip=True, image_size=28)
    return describe(dataset=dataset, root=root, **{**args, **kw})


# ----------------------------------------------------------------------------- DatasetMeta
def test_meta_reads_the_data_stages_file_and_gives_it_back_unchanged(tmp_path, tiny_data_root):
    meta = _describe("fashion_mnist", tiny_data_root, val_limit=50)
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(meta, indent=2, sort_keys=True))  # as ctx.write_json writes it
    m = DatasetMeta.load(path)
    assert (m.dataset, m.num_classes, m.in_chans, m.input_size) == ("fashion_mnist", 10, 1, [28, 28])
    assert (m.train_size, m.val_size, m.val_limit, m.classes[0]) == (256, 50, 50, "T-shirt/top")
    assert m.mean == meta["mean"] and m.root == str(tiny_data_root.resolve()) and m.sources == meta["sources"]
    assert m.to_dict() == json.loads(path.read_text())
    assert list(m.to_dict()) == list(json.loads(path.read_text()))  # the same keys, in the file's order


def test_meta_keeps_keys_it_does_not_know(tmp_path, tiny_data_root):
    meta = {**_describe("fashion_mnist", tiny_data_root), "future_key": {"a": 1}}
    m = DatasetMeta.from_dict(meta)
    assert m.extra == {"future_key": {"a": 1}} and m.to_dict() == dict(sorted(meta.items()))


def test_meta_errors_are_one_clear_line(tmp_path, tiny_data_root):
    path = tmp_path / "dataset.json"
    with pytest.raises(PipelineError, match=r"dataset\.json is missing; re-run `norm-pipeline stage data`$"):
        DatasetMeta.load(path)
    path.write_text('{"dataset": "fashion_mnist", ')
    with pytest.raises(PipelineError, match=r"dataset\.json is corrupt \(not JSON: .* at line 1\); re-run"):
        DatasetMeta.load(path)
    meta = _describe("fashion_mnist", tiny_data_root)
    path.write_text(json.dumps({k: v for k, v in meta.items() if k != "num_classes"}))
    with pytest.raises(PipelineError, match=r"dataset\.json is corrupt \(no 'num_classes'\); re-run"):
        DatasetMeta.load(path)
    path.write_text(json.dumps({**meta, "in_chans": "1"}))
    with pytest.raises(PipelineError, match=r"corrupt \('in_chans' is '1'\)"):
        DatasetMeta.load(path)
    path.write_text("[]")
    with pytest.raises(PipelineError, match=r"corrupt \(a JSON object was expected, got list\)"):
        DatasetMeta.load(path)


# ----------------------------------------------------------------------------- validation-only loading
def _batches(split) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*split, strict=True)
    return torch.cat(xs), torch.cat(ys)


def _break(path) -> None:
    path.write_bytes(b"not a dataset file")


def test_val_batches_never_read_the_fashion_mnist_training_files(tmp_path, tiny_data_root):
    root = tmp_path / "fm"
    shutil.copytree(tiny_data_root, root)
    meta = _describe("fashion_mnist", root, val_limit=100)
    ds._RAW_CACHE.clear()
    ref_x, ref_y = _batches(ds.make_splits(meta, batch_size=32, eval_batch_size=40)[1])  # val of the full splits
    _break(root / "train-images-idx3-ubyte.gz")
    (root / "train-labels-idx1-ubyte.gz").unlink()
    ds._RAW_CACHE.clear()
    with pytest.raises(PipelineError):  # the training files really are unusable now
        ds.make_splits(meta, batch_size=32, eval_batch_size=40)
    x, y = _batches(ds.val_batches(meta, batch_size=40))
    assert torch.equal(x, ref_x) and torch.equal(y, ref_y) and len(y) == 100

    from stages.lib.golden import split_indices  # the bundle's golden images: validation only as well

    images, labels, _ = split_indices(meta, "val")
    assert np.array_equal(labels, ref_y.numpy())


def test_val_batches_never_read_the_cifar_training_batches(tmp_path):
    from tests.stages.test_datasets import _cifar10_folder

    folder, _, _ = _cifar10_folder(tmp_path)
    meta = _describe("cifar10", tmp_path, image_size=32)
    ds._RAW_CACHE.clear()
    ref_x, ref_y = _batches(ds.val_batches(meta, batch_size=4))
    for i in range(1, 6):
        _break(folder / f"data_batch_{i}")
    ds._RAW_CACHE.clear()
    with pytest.raises(PipelineError, match="corrupt CIFAR batch"):
        ds.make_splits(meta, batch_size=4, eval_batch_size=4)
    x, y = _batches(ds.val_batches(meta, batch_size=4))
    assert torch.equal(x, ref_x) and torch.equal(y, ref_y) and len(y) == 6


def test_val_batches_never_list_the_image_folder_training_tree(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    meta = _describe("imagefolder", tmp_path, image_size=8)
    ref_x, ref_y = _batches(ds.val_batches(meta, batch_size=3))
    shutil.rmtree(tmp_path / "train")
    with pytest.raises(FileNotFoundError):  # ImageFolder cannot list a training tree that is gone
        ds.make_splits(meta, batch_size=3, eval_batch_size=3)
    x, y = _batches(ds.val_batches(meta, batch_size=3))
    assert torch.equal(x, ref_x) and torch.equal(y, ref_y) and y.tolist() == [0, 0, 1, 1]
