#!/usr/bin/env python3
"""Classify images with model.onnx through onnxruntime (norm-pipeline edge bundle).

Needs only onnxruntime, numpy and Pillow (no PyTorch). Preprocessing, class names and the input
name come from manifest.json next to this script, so the numbers match the training pipeline.

    python run_onnx.py photo.png                 # one image
    python run_onnx.py images/ --top-k 3         # every image in a folder
    python run_onnx.py images/ --json            # machine-readable output
    python run_onnx.py --selftest                # golden images vs the pipeline's logits (exit 1 on failure)
    python run_onnx.py --selftest --precision int8
    python run_onnx.py --report device.json      # self-test + device facts + latency, for `norm-pipeline bundle ingest`
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # edgekit.py ships next to this script
import edgekit  # noqa: E402

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
    """One image -> float32 CHW, exactly as the manifest says (grayscale/RGB, resize, scale, mean/std): the same
    recipe as the golden self-test (edgekit.preprocess_raw), so a file and its golden copy preprocess alike."""
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img.convert("L" if pp["in_chans"] == 1 else "RGB"))
    chw = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return edgekit.preprocess_raw(chw[None], pp)[0]


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


def common_args(description: str, images_required: bool = True) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("images", nargs=None if images_required else "?",
                    help="an image file or a folder of images (searched recursively)")
    ap.add_argument("--manifest", default=str(HERE / "manifest.json"), help="bundle manifest (default: next to this script)")
    ap.add_argument("--top-k", type=int, default=5, help="classes to print per image (default 5)")
    ap.add_argument("--batch", type=int, default=32, help="images per inference call (default 32)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    return ap


def batches(files: list, pp: dict, size: int):
    for i in range(0, len(files), max(1, size)):
        chunk = files[i : i + size]
        yield chunk, np.stack([preprocess(f, pp) for f in chunk])


def model_for(manifest: dict, root: Path, precision: str) -> Path:
    """The ONNX file the manifest lists for ``precision`` (only shipped precisions are listed)."""
    listed = {p["precision"]: p for p in manifest.get("precisions") or [] if p.get("file")}
    if not listed:  # bundles made before precisions were listed
        listed = {"fp32": {"file": manifest["model"]["onnx"]}}
        if manifest["model"].get("fp16_onnx"):
            listed["fp16"] = {"file": manifest["model"]["fp16_onnx"]}
    if precision not in listed:
        sys.exit(f"error: this bundle ships no {precision} ONNX model (shipped: {', '.join(sorted(listed))})")
    return root / listed[precision]["file"]


def main(argv=None) -> int:
    ap = common_args("Classify images with model.onnx (onnxruntime, CPU by default).", images_required=False)
    ap.add_argument("--model", default=None, help="ONNX file (default: the manifest's file for --precision)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8"),
                    help="which shipped ONNX to run (model.onnx, model_fp16.onnx, model_int8.onnx); default fp32")
    ap.add_argument("--providers", default="CPUExecutionProvider",
                    help="comma-separated onnxruntime providers, e.g. CUDAExecutionProvider,CPUExecutionProvider")
    edgekit.edge_args(ap)
    args = ap.parse_args(argv)
    if args.images is None and not (args.selftest or args.report):
        ap.error("give an image or a folder, or --selftest / --report")
    manifest = load_manifest(args.manifest)
    try:
        import onnxruntime as ort
    except ImportError:
        sys.exit("error: onnxruntime is not installed: pip install onnxruntime")
    root = Path(args.manifest).resolve().parent
    if not (root / manifest["model"]["onnx"]).is_file():  # a manifest copied elsewhere: the files are here
        root = HERE
    model = Path(args.model) if args.model else model_for(manifest, root, args.precision)
    if not model.is_file():
        sys.exit(f"error: model file {model} not found")
    session = ort.InferenceSession(str(model), providers=args.providers.split(","))
    inp, out = manifest["input"]["name"], manifest["output"]["name"]

    def infer(x):
        return session.run([out], {inp: x})[0]

    if args.selftest or args.report:
        backend = {"name": "onnxruntime", "version": ort.__version__, "providers": session.get_providers()}
        return edgekit.edge_checks(args, manifest, root, infer, runner="run_onnx.py", backend=backend, artifact=model,
                           precision=args.precision)
    files = list_images(args.images)
    results = []
    for _chunk, x in batches(files, manifest["preprocessing"], args.batch):
        results += top_k(infer(x), manifest["classes"], args.top_k)
    report(files, results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
