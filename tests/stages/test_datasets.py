"""Dataset readers and iteration: IDX, CIFAR pickles (safely), image folders, batched augmentation, sharding."""
from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from stages.lib import datasets as ds
from stages.lib.errors import PipelineError
from tests.conftest import write_idx


# ----------------------------------------------------------------------------- IDX
def test_idx_reader_good_truncated_and_bad_magic(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "good-idx3-ubyte.gz"
    write_idx(good, arr)
    assert np.array_equal(ds.read_idx(good), arr)
    raw = gzip.decompress(good.read_bytes())
    plain = tmp_path / "plain-idx3-ubyte"
    plain.write_bytes(raw)
    assert np.array_equal(ds.read_idx(plain), arr)

    cases = {"truncated": raw[:-5], "bad_magic": b"\x08\x00" + raw[2:], "short_header": raw[:9],
             "not_gzip": b"garbage, not gzip"}
    for name, data in cases.items():
        p = tmp_path / (f"{name}.gz" if name == "not_gzip" else name)
        p.write_bytes(data)
        with pytest.raises(PipelineError, match="corrupt IDX") as e:
            ds.read_idx(p)
        assert str(p) in str(e.value) and "\n" not in str(e.value), name


# ----------------------------------------------------------------------------- CIFAR
def _cifar10_folder(root, n_per_batch: int = 6, seed: int = 0):
    """torchvision's cifar-10-batches-py layout: 5 train batches, test_batch, batches.meta (pickles)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels, "filenames": ["x.png"] * n_per_batch}, f,
                        protocol=2)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_vis": 3072, "num_cases_per_batch": n_per_batch}, f, protocol=2)
    return folder, batches, names


def test_cifar_loader_reads_torchvision_layout(tmp_path):
    _, batches, names = _cifar10_folder(tmp_path)
    out = ds.load_cifar(tmp_path, 10)
    x, y = out["train"]
    assert out["classes"] == names
    assert x.shape == (30, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    data, labels = batches["data_batch_2"]
    i = 3  # image 3 of batch 2 is training image 6 + 3; pixel (c, row, col) = data[i, c*1024 + row*32 + col]
    assert x[6 + i, 2, 5, 7] == data[i, 2 * 1024 + 5 * 32 + 7] and y[6 + i] == labels[i]
    xv, yv = out["val"]
    assert torch.equal(xv.reshape(6, -1), torch.from_numpy(batches["test_batch"][0]))
    assert yv.tolist() == batches["test_batch"][1]
    with pytest.raises(PipelineError, match="CIFAR-100 not found"):
        ds.load_cifar(tmp_path, 100)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_unpickler_refuses_code(tmp_path):
    folder, _, _ = _cifar10_folder(tmp_path)
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({"data": _Evil(marker), "labels": [0]}, f, protocol=2)
    with pytest.raises(PipelineError, match=r"corrupt CIFAR batch .*data_batch_3.*refusing to load .*system"):
        ds.load_cifar(tmp_path, 10)
    assert not marker.exists(), "the pickle's payload ran"


# ----------------------------------------------------------------------------- image folders
def _folder(root, layout: dict[str, dict[str, int]]):
    for split, classes in layout.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (root / split / cls / f"{i}.jpg").write_bytes(b"\xff\xd8")


def test_image_folder_checks(tmp_path):
    good = tmp_path / "good"
    _folder(good, {"train": {"cat": 2, "dog": 1}, "val": {"cat": 1, "dog": 1}})
    assert ds.check_image_folder(good) == ["cat", "dog"]

    empty = tmp_path / "empty"
    _folder(empty, {"train": {"cat": 2, "dog": 0}, "val": {"cat": 1, "dog": 1}})
    with pytest.raises(PipelineError, match=r"class folder .*train/dog is empty"):
        ds.check_image_folder(empty)

    mismatch = tmp_path / "mismatch"
    _folder(mismatch, {"train": {"cat": 1, "dog": 1}, "val": {"cat": 1, "emu": 1}})
    with pytest.raises(PipelineError, match=r"only in train \['dog'\], only in val \['emu'\]"):
        ds.check_image_folder(mismatch)

    no_val = tmp_path / "no_val"
    _folder(no_val, {"train": {"cat": 1}})
    with pytest.raises(PipelineError, match="has no val/ folder"):
        ds.check_image_folder(no_val)


# ----------------------------------------------------------------------------- augmentation
def _distinct_images(b: int, c: int = 2, h: int = 6, w: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, 256, (b, c, h, w), generator=g, dtype=torch.uint8)  # no zeros: padding is visible


def test_random_crop_comes_from_the_padded_image():
    x, pad = _distinct_images(24), 2
    out = ds.random_crop_flip(x, pad, hflip=True, gen=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    h, w = x.shape[2:]
    offsets = set()
    for i in range(len(x)):
        windows = [(oy, ox, f) for oy in range(2 * pad + 1) for ox in range(2 * pad + 1) for f in (False, True)
                   if torch.equal(out[i], (lambda v: v.flip(-1) if f else v)(padded[i, :, oy:oy + h, ox:ox + w]))]
        assert windows, f"image {i} is not a (flipped) crop of its padded input"
        offsets.add(windows[0][:2])
    assert len(offsets) > 3, "crops should move around"


def test_hflip_flips_about_half_and_nothing_else():
    x = _distinct_images(64)
    out = ds.random_crop_flip(x, 0, hflip=True, gen=torch.Generator().manual_seed(2))
    flipped = [bool(torch.equal(o, i.flip(-1))) for o, i in zip(out, x, strict=True)]
    kept = [bool(torch.equal(o, i)) for o, i in zip(out, x, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 16 < sum(flipped) < 48
    assert torch.equal(ds.random_crop_flip(x, 0, hflip=False, gen=torch.Generator()), x)


# ----------------------------------------------------------------------------- sharding
MEAN, STD = torch.tensor([0.2, 0.6]), torch.tensor([0.5, 0.25])


def _split(n: int, **kw) -> ds.TensorSplit:
    """Image i is filled with the value 10*i (channel 0) and 10*i + 1 (channel 1); its label is i."""
    images = (10 * torch.arange(n)).view(n, 1, 1, 1).expand(n, 2, 2, 2).clone()
    images[:, 1] += 1
    return ds.TensorSplit(images.to(torch.uint8), torch.arange(n), mean=MEAN, std=STD, batch_size=3, **kw)


def _seen(split: ds.TensorSplit) -> list[int]:
    """Labels in iteration order, after checking every image arrived normalised and with its own label."""
    out = []
    for x, y in split:
        raw = torch.stack([10 * y, 10 * y + 1], 1).float().view(-1, 2, 1, 1).expand_as(x) / 255
        assert torch.allclose(x, (raw - MEAN.view(1, 2, 1, 1)) / STD.view(1, 2, 1, 1), atol=1e-6)
        out += [int(v) for v in y]
    return out


def test_batches_are_normalised_per_channel():
    x, y = next(iter(_split(4)))
    assert x.dtype == torch.float32 and x.shape == (3, 2, 2, 2) and y.tolist() == [0, 1, 2]
    assert x[2, 0, 0, 0].item() == pytest.approx((20 / 255 - 0.2) / 0.5)
    assert x[2, 1, 1, 1].item() == pytest.approx((21 / 255 - 0.6) / 0.25)


def test_channel_stats_are_per_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.full((6, 5, 5), 51), torch.randint(0, 256, (6, 5, 5), generator=g), torch.full((6, 5, 5), 255)], 1)
    mean, std = ds.channel_stats(x.to(torch.uint8))
    f = x.float() / 255
    assert mean == pytest.approx([0.2, f[:, 1].mean().item(), 1.0]) and std == pytest.approx([0.0, f[:, 1].std().item(), 0.0], abs=1e-6)


def test_make_splits_normalise_with_the_data_stages_statistics(tiny_data_root):
    from stages.lib.dataset_describe import describe

    meta = describe(dataset="fashion_mnist", root=tiny_data_root, download=False, train_limit=None, val_limit=None,
                    augment=True, crop_padding=2, hflip=True, image_size=28)
    raw = ds.load_fashion_mnist(tiny_data_root)
    mean, std = ds.channel_stats(raw["train"][0])
    assert meta["mean"] == pytest.approx(mean) and meta["std"] == pytest.approx(std)
    assert 0.05 < mean[0] < 0.9 and 0.05 < std[0] < 0.9  # a real normalisation, not the identity
    train, val = ds.make_splits(meta, batch_size=32, eval_batch_size=50)
    xs = torch.cat([x for x, _ in val])
    assert torch.equal(torch.cat([y for _, y in val]), raw["val"][1])  # validation: every image once, in order
    expected = (raw["val"][0].float() / 255 - mean[0]) / std[0]
    assert torch.allclose(xs, expected, atol=1e-5)
    xt = torch.cat([x for x, _ in train])
    assert abs(xt.mean().item()) < 0.25 and 0.7 < xt.std().item() < 1.3  # augmented, but about standardised


@pytest.mark.parametrize("world", [2, 3])
def test_tensor_split_shards_like_distributed_sampler(world):
    n = 10
    for epoch in (0, 1):
        shards = []
        for rank in range(world):
            s = _split(n, shuffle=True, seed=5, rank=rank, world_size=world)
            s.set_epoch(epoch)
            shards.append(_seen(s))
        assert len({len(sh) for sh in shards}) == 1, "every rank must take the same number of steps"
        flat = [v for sh in shards for v in sh]
        assert sorted(set(flat)) == list(range(n)) and len(flat) == n + (-n % world)  # pad = a few repeats
        if epoch == 0:
            first = shards
    assert first != shards, "per-epoch seeding reshuffles"
    # evaluation: disjoint shards that cover the data exactly once (no padded duplicates)
    evals = [_seen(_split(n, rank=r, world_size=world, even_shards=False)) for r in range(world)]
    assert sorted(v for sh in evals for v in sh) == list(range(n))
    # one process sees everything, in a seeded order that differs between epochs
    single = _split(n, shuffle=True, seed=5)
    order0 = _seen(single)
    single.set_epoch(1)
    assert sorted(order0) == list(range(n)) and _seen(single) != order0


def test_loader_split_eval_shards_are_disjoint():
    data = torch.utils.data.TensorDataset(torch.zeros(7, 1), torch.arange(7))
    shards = [[int(v) for _, y in ds.LoaderSplit(data, 2, False, 0, "cpu", rank=r, world_size=2) for v in y]
              for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(7)) and not set(shards[0]) & set(shards[1])
