"""golden.npz for the bundle's self-test, and the fixed image slices the quantize stage calibrates on.

The golden set is real validation images, stratified over classes, kept as the raw uint8 pixels read from
the dataset, with their labels and the pipeline's fp32 logits (model.onnx in onnxruntime on the pipeline's
own preprocessing). On the device the runners preprocess the raw pixels with the manifest's recipe and must
reproduce those logits: a wrong mean/std, channel order or scale shows up at once.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from stages.lib.errors import PipelineError
from stages.lib.io import atomic_write_bytes

GOLDEN_FORMAT = "norm-pipeline/golden/1"  # the same string as edgekit.GOLDEN_FORMAT


def split_indices(meta: dict, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 images NCHW, labels, original indices) of a split as the pipeline uses it (after *_limit)."""
    import torch

    from stages.lib.datasets import load_raw

    if meta["dataset"] == "imagefolder":
        raise PipelineError("the golden self-test and INT8 calibration support the in-memory datasets "
                            "(fashion_mnist, cifar10, cifar100) only; image folders are not supported yet")
    x, y = load_raw(meta["dataset"], meta.get("root"), splits=(split,))[split]
    limit = meta.get(f"{split}_limit")
    idx = torch.arange(len(y))
    if limit is not None and limit < len(y):  # the same fixed shuffle as stages.lib.datasets._subset
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(12345))[:limit]
    return x[idx].numpy(), y[idx].numpy(), idx.numpy()


def stratified(labels: np.ndarray, n: int) -> np.ndarray:
    """Positions of ``n`` images taking classes in turn (first images of each class, in order)."""
    by_class = {c: list(np.flatnonzero(labels == c)) for c in np.unique(labels)}
    out: list[int] = []
    while len(out) < min(n, len(labels)):
        for c in sorted(by_class):
            if by_class[c] and len(out) < n:
                out.append(int(by_class[c].pop(0)))
    return np.asarray(sorted(out), dtype=np.int64)


def normalise(raw: np.ndarray, meta: dict) -> np.ndarray:
    """The pipeline's own preprocessing (stages.lib.datasets.normalize) of uint8 NCHW pixels."""
    import torch

    from stages.lib.datasets import normalize

    return normalize(torch.from_numpy(np.ascontiguousarray(raw)), torch.tensor(meta["mean"]),
                     torch.tensor(meta["std"])).numpy()


def pixels_sha256(raw: np.ndarray, indices: np.ndarray) -> str:
    """Identity of an image slice: its indices and pixels."""
    h = hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(raw, dtype=np.uint8).tobytes())
    return h.hexdigest()


def make_golden(meta: dict, onnx_path: Path, dest: Path, n: int) -> dict:
    """Write golden.npz (images, labels, logits, indices) atomically; returns what the manifest records."""
    from stages.lib.onnx_utils import ort_session, run_ort

    raw, labels, idx = split_indices(meta, "val")
    if len(labels) == 0:
        raise PipelineError("the validation set is empty: no golden images (check data.val_limit)")
    pick = stratified(labels, n)
    images, labels, idx = raw[pick], labels[pick], idx[pick]
    session = ort_session(onnx_path)
    x = normalise(images, meta)
    logits = np.concatenate([run_ort(session, x[i : i + 64]) for i in range(0, len(x), 64)]).astype(np.float32)
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images.astype(np.uint8), labels=labels.astype(np.int64), logits=logits,
                        indices=idx.astype(np.int64), format=np.array(GOLDEN_FORMAT))
    atomic_write_bytes(dest, buf.getvalue())
    return {"golden": dest.name, "samples": int(len(labels)), "split": "val", "indices": idx.tolist(),
            "classes_covered": int(len(np.unique(labels))), "pixels_sha256": pixels_sha256(images, idx),
            "reference": f"{onnx_path.name} in onnxruntime (CPU, fp32) on the pipeline's own preprocessing"}


def tolerances(*, fp32_atol: float, fp32_rtol: float, fp16_atol: float, fp16_rtol: float) -> dict:
    """Per-precision self-test rules written into the manifest (fp32 tight, fp16 looser, int8 by decisions)."""
    return {"fp32": {"atol": fp32_atol, "rtol": fp32_rtol, "min_top1_agreement": 1.0},
            "fp16": {"atol": fp16_atol, "rtol": fp16_rtol, "min_top1_agreement": 0.95},
            "int8": {"atol": None, "rtol": None, "min_top1_agreement": 0.9}}


def calibration_slice(meta: dict, n: int, seed: int) -> tuple[np.ndarray, dict]:
    """A fixed slice of the training split (seeded choice, no augmentation), normalised; and its record."""
    raw, labels, idx = split_indices(meta, "train")
    if len(labels) == 0:
        raise PipelineError("the training set is empty: nothing to calibrate INT8 on (check data.train_limit)")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.permutation(len(labels))[: min(n, len(labels))])
    images, chosen = raw[pick], idx[pick]
    return normalise(images, meta), {"split": "train", "samples": int(len(pick)), "seed": seed,
                                     "indices": chosen.tolist(), "sha256": pixels_sha256(images, chosen),
                                     "augmentation": "none (the validation transform)"}
