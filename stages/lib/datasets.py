"""Datasets: Fashion-MNIST (IDX), CIFAR-10/100 (torchvision layout), ImageFolder.

Small datasets live in memory as uint8 tensors with batched augmentation (one crop/flip kernel for
the whole batch instead of per-image PIL work); image folders go through a DataLoader.
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from stages.lib.cifar import load_cifar  # noqa: F401  (datasets.load_cifar: kept importable from here)
from stages.lib.errors import PipelineError

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ----------------------------------------------------------------------------- raw readers
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally .gz); a clear error for anything truncated or malformed."""
    path = Path(path)
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise PipelineError(f"corrupt IDX file {path}: {e}; reinstall the dataset (apt-get install --reinstall dataset-fashion-mnist)") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise PipelineError(f"corrupt IDX file {path}: bad magic number; reinstall the dataset")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise PipelineError(f"corrupt IDX file {path}: truncated header; reinstall the dataset")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise PipelineError(f"corrupt IDX file {path}: {len(raw) - header} data bytes, expected {expected} for shape {dims} "
                            "(truncated?); reinstall the dataset")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise PipelineError(f"dataset file {stem}[.gz] not found in {root}; set data.root to the Fashion-MNIST folder "
                        "or install it: apt-get install dataset-fashion-mnist")


def load_fashion_mnist(root: Path, splits: tuple[str, ...] = ("train", "val")) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"dataset root {root} does not exist; install it (apt-get install dataset-fashion-mnist) or set data.root")
    out = {}
    for split, prefix in (("train", "train"), ("val", "t10k")):
        if split not in splits:
            continue
        img_path, lbl_path = _find(root, f"{prefix}-images-idx3-ubyte"), _find(root, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise PipelineError(f"corrupt IDX pair {img_path.name}/{lbl_path.name}: shapes {images.shape} and {labels.shape} do not match")
        out[split] = (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
        out[f"{split}_files"] = [img_path, lbl_path]
    out["classes"] = list(FASHION_MNIST_CLASSES)
    return out


def check_image_folder(root: Path) -> list[str]:
    """train/ and val/ with the same non-empty class folders; returns the class names."""
    root = Path(root)
    classes = {}
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir():
            raise PipelineError(f"image folder {root} has no {split}/ folder; expected {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg")
        names = sorted(p.name for p in d.iterdir() if p.is_dir())
        if not names:
            raise PipelineError(f"{d} has no class folders")
        for n in names:
            if not any(f.is_file() for f in (d / n).iterdir()):
                raise PipelineError(f"class folder {d / n} is empty; remove it or add images")
        classes[split] = names
    if classes["train"] != classes["val"]:
        only_t = sorted(set(classes["train"]) - set(classes["val"]))
        only_v = sorted(set(classes["val"]) - set(classes["train"]))
        raise PipelineError(f"train/val class folders differ in {root}: only in train {only_t}, only in val {only_v}; "
                            "give train/ and val/ the same class folders")
    return classes["train"]


# ----------------------------------------------------------------------------- iteration
def normalize(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x_uint8.float().div_(255.0) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def random_crop_flip(x: torch.Tensor, padding: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Batched augmentation on uint8 NCHW: zero-pad, random crop back to size, random horizontal flip."""
    b, c, h, w = x.shape
    dev = x.device
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding,) * 4)
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(dev)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(dev)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        x = padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None], rows, cols]
    if hflip:
        flip = (torch.rand(b, generator=gen) < 0.5).to(dev)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


@dataclass
class TensorSplit:
    """An in-memory split: uint8 images + labels, iterated as normalised float batches."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    batch_size: int
    shuffle: bool = False
    augment: bool = False
    padding: int = 0
    hflip: bool = False
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    epoch: int = 0
    drop_last: bool = False
    even_shards: bool = True  # training: pad so every rank takes the same number of steps; eval: no duplicates

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        if self.world_size > 1:
            if self.even_shards:  # DistributedSampler's rule: pad to a multiple of world_size, then stride
                idx = torch.cat([idx, idx[: -n % self.world_size]])
            idx = idx[self.rank :: self.world_size]
        return idx

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices()
        gen = torch.Generator().manual_seed(self.seed * 7919 + self.epoch * 31 + self.rank)
        mean, std = self.mean.to(self.device), self.std.to(self.device)
        for start in range(0, len(idx), self.batch_size):
            sel = idx[start : start + self.batch_size]
            if self.drop_last and len(sel) < self.batch_size:
                break
            x = self.images[sel].to(self.device, non_blocking=True)
            if self.augment:
                x = random_crop_flip(x, self.padding, self.hflip, gen)
            yield normalize(x, mean, std), self.labels[sel].to(self.device, non_blocking=True)


class ImageTooLarge(PipelineError):
    """An image over Pillow's decompression-bomb limit; the message names the file (also from a worker)."""


def load_image(path: str):
    """ImageFolder's loader (RGB), with the file named when Pillow refuses a decompression bomb.

    Pillow raises ``DecompressionBombError`` for images over twice ``Image.MAX_IMAGE_PIXELS`` without saying
    which file it was; in a dataset of a million files that name is the whole point of the message.
    """
    import re

    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+) pixels", str(e))
        size = f"{int(found.group(1)):,} pixels, over" if found else "over"
        limit = int(found.group(2)) if found else 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise ImageTooLarge(f"image {path} is too large to decode safely ({size} Pillow's decompression-bomb limit "
                            f"of {limit:,} pixels); remove or downscale that file") from None


class LoaderSplit:
    """An image-folder split through a DataLoader (DistributedSampler under torchrun)."""

    def __init__(self, dataset, batch_size: int, shuffle: bool, num_workers: int, device: str,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        from torch.utils.data import DataLoader, DistributedSampler

        self.sampler = DistributedSampler(dataset, world_size, rank, shuffle=shuffle, seed=seed) \
            if world_size > 1 and shuffle else None
        # evaluation shards: a plain stride, no padded duplicates (no per-batch collectives to keep in step)
        shard = range(rank, len(dataset), world_size) if world_size > 1 and not shuffle else None
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and self.sampler is None,
                                 sampler=self.sampler if self.sampler is not None else shard, num_workers=num_workers,
                                 pin_memory=device.startswith("cuda"), persistent_workers=num_workers > 0)
        self.device = device
        self.num_samples = len(dataset)

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        try:
            for x, y in self.loader:
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        except ImageTooLarge as e:  # from a worker, the message carries the worker's traceback: keep the last line
            raise ImageTooLarge(str(e).strip().splitlines()[-1].split("ImageTooLarge: ", 1)[-1]) from None
        except OSError as e:  # PIL's UnidentifiedImageError / truncated image, also re-raised from a worker
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise PipelineError(f"cannot read an image of the dataset: {reason[:240]}; remove or replace that file") from None


def _subset(x: torch.Tensor, y: torch.Tensor, limit: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` images of a fixed shuffle (deterministic, class-balanced in expectation)."""
    if limit is None or limit >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(12345))[:limit]
    return x[idx], y[idx]


# ----------------------------------------------------------------------------- the data stage's meta
def load_raw(dataset: str, root: Optional[Path], download: bool = False, splits: tuple[str, ...] = ("train", "val")) -> dict:
    """In-memory datasets as {"train": (x, y), "val": (x, y), "classes", "*_files"}; ``splits``: the ones to read
    (``("val",)`` never opens the training files).

    One process runs several stages that each need the dataset (data, teacher, baseline, distill, verify,
    export): the decoded tensors are kept and handed out again while the source files are unchanged (same
    sha256), instead of decompressing and parsing them for every stage. Callers never modify them.
    """
    if dataset == "fashion_mnist":
        root = Path(root) if root else FASHION_MNIST_ROOT
        return _cached(("fashion_mnist", str(root)), splits, lambda: load_fashion_mnist(root, splits))
    if dataset in ("cifar10", "cifar100"):
        if root is None:
            raise PipelineError(f"{dataset} needs data.root (the folder that holds the torchvision-layout CIFAR files)")
        n = 10 if dataset == "cifar10" else 100
        return _cached((dataset, str(root)), splits, lambda: load_cifar(Path(root), n, download, splits))
    raise PipelineError(f"dataset {dataset!r} is not an in-memory dataset")


_RAW_CACHE: dict[tuple, tuple[tuple, dict]] = {}


def _stamp(files: list) -> tuple:
    """The files' contents (sha256): a file rewritten in place, even within one mtime tick, is a new dataset."""
    from stages.lib.io import sha256_file

    return tuple((str(f), sha256_file(f)) for f in files)


def _files(raw: dict) -> list:
    return raw.get("train_files", []) + raw.get("val_files", [])


def _cached(key: tuple, splits: tuple[str, ...], load) -> dict:
    """The last decoded copy of ``key`` (holding ``splits``) while its files' contents are unchanged, else a fresh load."""
    hit = _RAW_CACHE.get(key)
    if hit is not None:
        stamp, raw = hit
        try:
            if all(s in raw for s in splits) and _stamp(_files(raw)) == stamp:
                return dict(raw)
        except OSError:
            pass
    raw = load()
    _RAW_CACHE.clear()  # keep one dataset: the 60k Fashion-MNIST images are 47 MB
    _RAW_CACHE[key] = (_stamp(_files(raw)), raw)
    return dict(raw)


def channel_stats(x_uint8: torch.Tensor) -> tuple[list[float], list[float]]:
    x = x_uint8.float().div_(255.0)
    dims = [0, 2, 3]
    return x.mean(dims).tolist(), x.std(dims).tolist()


def make_splits(meta: dict, *, batch_size: int, eval_batch_size: int, device: str = "cpu", rank: int = 0,
                world_size: int = 1, seed: int = 0, num_workers: int = 0, shard_val: bool = False, val_only: bool = False):
    """(train, val) splits from the data stage's ``dataset.json``; train shuffles and augments.
    ``val_only``: (None, val), without reading (or listing) a single training file."""
    if meta["dataset"] == "imagefolder":
        return _image_folder_splits(meta, batch_size, eval_batch_size, device, rank, world_size, seed, num_workers,
                                    shard_val, val_only)
    raw = load_raw(meta["dataset"], meta.get("root"), splits=("val",) if val_only else ("train", "val"))
    mean, std = torch.tensor(meta["mean"]), torch.tensor(meta["std"])
    xv, yv = _subset(*raw["val"], meta.get("val_limit"))
    if device.startswith("cuda"):  # device-resident data: no per-batch host->device copies
        xv, yv = xv.to(device), yv.to(device)
    common = dict(mean=mean, std=std, seed=seed, device=device)
    train = None
    if not val_only:
        xt, yt = _subset(*raw["train"], meta.get("train_limit"))
        if device.startswith("cuda"):
            xt, yt = xt.to(device), yt.to(device)
        train = TensorSplit(xt, yt, batch_size=batch_size, shuffle=True, augment=meta.get("augment", True),
                            padding=meta.get("crop_padding", 0), hflip=meta.get("hflip", False),
                            rank=rank, world_size=world_size, drop_last=False, **common)
    val = TensorSplit(xv, yv, batch_size=eval_batch_size, rank=rank if shard_val else 0,
                      world_size=world_size if shard_val else 1, even_shards=False, **common)
    return train, val


def image_folder_transforms(size: int, mean: list[float], std: list[float]):
    from torchvision import transforms

    train = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(mean, std)])
    val = transforms.Compose([transforms.Resize(int(round(size * 256 / 224))), transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(mean, std)])
    return train, val


def _image_folder_splits(meta, batch_size, eval_batch_size, device, rank, world_size, seed, num_workers, shard_val,
                         val_only=False):
    from torch.utils.data import Subset
    from torchvision.datasets import ImageFolder

    t_train, t_val = image_folder_transforms(meta["input_size"][0], meta["mean"], meta["std"])
    root = Path(meta["root"])

    def limited(split: str, transform):  # the first *_limit images of a fixed shuffle
        ds = ImageFolder(str(root / split), transform, loader=load_image)
        limit = meta.get(f"{split}_limit")
        if limit and limit < len(ds):
            ds = Subset(ds, torch.randperm(len(ds), generator=torch.Generator().manual_seed(12345))[:limit].tolist())
        return ds

    ds_val = limited("val", t_val)
    train = None if val_only else LoaderSplit(limited("train", t_train), batch_size, True, num_workers, device, rank,
                                              world_size, seed)
    val = LoaderSplit(ds_val, eval_batch_size, False, num_workers, device,
                      rank if shard_val else 0, world_size if shard_val else 1, seed)
    return train, val


def val_batches(meta: dict, batch_size: int = 256, device: str = "cpu"):
    """The validation split alone, unshuffled, for evaluation/verification/parity stages (no training file is read)."""
    return make_splits(meta, batch_size=1, eval_batch_size=batch_size, device=device, val_only=True)[1]
