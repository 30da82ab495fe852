#!/usr/bin/env python3
"""Classify images with model.onnx through onnxruntime (norm-pipeline edge bundle).

Needs only onnxruntime, numpy and Pillow (no PyTorch). Preprocessing, class names and the input
name come from manifest.json next to this script, so the numbers match the training pipeline.

    python run_onnx.py photo.png                 # one image
    python run_onnx.py images/ --top-k 3         # every image in a folder
    python run_onnx.py images/ --json            # machine-readable output
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def load_manifest(path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot read {path}: {e}")


def list_images(target) -> list:
    target = Path(target)
    if target.is_dir():
        files = sorted(p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            sys.exit(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {target}")
        return files
    if not target.is_file():
        sys.exit(f"error: {target} is neither an image file nor a folder")
    return [target]


def preprocess(path, pp: dict) -> np.ndarray:
    """One image -> float32 CHW, exactly as the manifest says (grayscale/RGB, resize, scale, mean/std)."""
    from PIL import Image

    bilinear = getattr(Image, "Resampling", Image).BILINEAR
    with Image.open(path) as img:
        img = img.convert("L" if pp["in_chans"] == 1 else "RGB")
        h, w = pp["size"]
        if pp["resize"] == "shorter_side_center_crop":  # torchvision Resize(s) + CenterCrop(size)
            s = int(pp["resize_shorter"])
            iw, ih = img.size
            nw, nh = (s, int(s * ih / iw)) if iw <= ih else (int(s * iw / ih), s)
            img = img.resize((nw, nh), bilinear)
            top, left = int(round((nh - h) / 2.0)), int(round((nw - w) / 2.0))
            img = img.crop((left, top, left + w, top + h))
        elif img.size != (w, h):
            img = img.resize((w, h), bilinear)
        arr = np.asarray(img, dtype=np.float32) * np.float32(pp["scale"])
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    mean = np.asarray(pp["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(pp["std"], dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((arr - mean) / std, dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_k(logits: np.ndarray, classes: list, k: int) -> list:
    probs = softmax(logits.astype(np.float64))
    out = []
    for row in probs:
        idx = np.argsort(-row, kind="stable")[:k]
        out.append([{"index": int(i), "class": str(classes[i]) if i < len(classes) else str(i), "prob": float(row[i])}
                    for i in idx])
    return out


def report(files: list, results: list, as_json: bool) -> None:
    if as_json:
        print(json.dumps([{"file": str(f), "top_k": r} for f, r in zip(files, results)], indent=2))
        return
    for f, r in zip(files, results):
        print(f"{f}")
        for rank, item in enumerate(r, 1):
            print(f"  {rank}. {item['class']:<24s} {item['prob']:.4f}  (class {item['index']})")


def common_args(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("images", help="an image file or a folder of images (searched recursively)")
    ap.add_argument("--manifest", default=str(HERE / "manifest.json"), help="bundle manifest (default: next to this script)")
    ap.add_argument("--top-k", type=int, default=5, help="classes to print per image (default 5)")
    ap.add_argument("--batch", type=int, default=32, help="images per inference call (default 32)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    return ap


def batches(files: list, pp: dict, size: int):
    for i in range(0, len(files), max(1, size)):
        chunk = files[i : i + size]
        yield chunk, np.stack([preprocess(f, pp) for f in chunk])


def main(argv=None) -> int:
    ap = common_args("Classify images with model.onnx (onnxruntime, CPU by default).")
    ap.add_argument("--model", default=None, help="ONNX file (default: the manifest's model.onnx)")
    ap.add_argument("--providers", default="CPUExecutionProvider",
                    help="comma-separated onnxruntime providers, e.g. CUDAExecutionProvider,CPUExecutionProvider")
    args = ap.parse_args(argv)
    manifest = load_manifest(args.manifest)
    try:
        import onnxruntime as ort
    except ImportError:
        sys.exit("error: onnxruntime is not installed: pip install onnxruntime")
    model = Path(args.model) if args.model else Path(args.manifest).parent / manifest["model"]["onnx"]
    session = ort.InferenceSession(str(model), providers=args.providers.split(","))
    inp, out = manifest["input"]["name"], manifest["output"]["name"]
    files = list_images(args.images)
    results = []
    for chunk, x in batches(files, manifest["preprocessing"], args.batch):
        results += top_k(session.run([out], {inp: x})[0], manifest["classes"], args.top_k)
    report(files, results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
