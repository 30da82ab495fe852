"""CIFAR-10/100 in the torchvision layout (python pickles), read without running any code from the files."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from stages.lib.errors import PipelineError


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles: allow numpy arrays and builtins only, never arbitrary code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise PipelineError(f"corrupt CIFAR batch {path}: {e}") from None


def load_cifar(root: Path, num_classes: int, download: bool = False, splits: tuple[str, ...] = ("train", "val")) -> dict:
    folder = Path(root) / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
    if not folder.is_dir() and download:
        from torchvision.datasets import CIFAR10, CIFAR100

        (CIFAR10 if num_classes == 10 else CIFAR100)(str(root), train=True, download=True)
    if not folder.is_dir():
        raise PipelineError(f"CIFAR-{num_classes} not found: expected {folder} (torchvision layout); "
                            "set data.root, or data.download=true on a machine with internet")
    if num_classes == 10:
        train_files, val_files, meta_file, label_key, names_key = (
            [folder / f"data_batch_{i}" for i in range(1, 6)], [folder / "test_batch"], folder / "batches.meta", "labels", "label_names")
    else:
        train_files, val_files, meta_file, label_key, names_key = (
            [folder / "train"], [folder / "test"], folder / "meta", "fine_labels", "fine_label_names")
    out: dict = {"classes": list(_unpickle(meta_file)[names_key])}
    for split, files in (("train", train_files), ("val", val_files)):
        if split not in splits:
            continue
        xs, ys = [], []
        for f in files:
            d = _unpickle(f)
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        out[split] = (torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))
        out[f"{split}_files"] = files
    return out
