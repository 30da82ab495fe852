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


def edge_args(ap: argparse.ArgumentParser) -> None:
    """--selftest / --report and the latency options (shared with run_trt.py)."""
    ap.add_argument("--selftest", action="store_true",
                    help="run golden.npz through the manifest's preprocessing and the model; compare with the pipeline's "
                         "logits; exit 1 with the reason on failure")
    ap.add_argument("--report", metavar="DEVICE_JSON", default=None,
                    help="write a device report (device facts, self-test, latency) for `norm-pipeline bundle ingest`")
    ap.add_argument("--batch-sizes", default=None, help="latency batch sizes for --report, e.g. 1,8,32 (default: 1 and "
                                                       "the manifest's opt batch)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed runs per batch size before timing (default 20)")
    ap.add_argument("--iters", type=int, default=200, help="timed runs per batch size (default 200)")


def default_batches(manifest: dict) -> list:
    opt = ((manifest.get("input") or {}).get("profile") or {}).get("opt") or [1]
    return sorted({1, int(opt[0])})


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


def edge_checks(args, manifest: dict, root: Path, infer, *, runner: str, backend: dict, artifact: Path,
                precision: str, source_onnx_sha256=None, extra_facts=None) -> int:
    """--selftest and --report for any runner: ``infer`` maps a float32 NCHW batch to logits."""
    import edgekit

    try:
        result = edgekit.selftest(infer, manifest, root, precision)
    except edgekit.SelfTestError as e:
        if args.report is None:
            edgekit.fail(f"self-test could not run: {e}")
        result = {"ok": None, "precision": precision, "reason": f"self-test could not run: {e}"}
    if args.report is None:
        if not result["ok"]:
            edgekit.fail(result["reason"])
        print(f"self-test passed: {precision} {artifact.name}, top-1 agrees on {result['agreeing']}/{result['samples']} "
              f"golden images, max abs diff {result['max_abs_diff']:.3g}")
        return 0
    try:
        batch_sizes = edgekit.parse_batches(args.batch_sizes) if args.batch_sizes else default_batches(manifest)
        x = edgekit.golden_inputs(manifest, root)
    except (ValueError, edgekit.SelfTestError) as e:
        edgekit.fail(str(e))
    latency = edgekit.measure_latency(infer, x, batch_sizes, warmup=max(0, args.warmup), iters=max(1, args.iters),
                                      progress=lambda r: print(f"batch {r['batch']}: p50 {r['p50_ms']:.3f} ms, p90 "
                                                               f"{r['p90_ms']:.3f}, p99 {r['p99_ms']:.3f}", file=sys.stderr))
    report = edgekit.build_report(runner=runner, backend=backend, artifact=artifact, precision=precision,
                                  manifest=manifest, manifest_path=args.manifest, selftest_result=result,
                                  latency=latency, facts=edgekit.device_facts(extra_facts),
                                  source_onnx_sha256=source_onnx_sha256)
    edgekit.write_json(args.report, report)
    print(f"device report: {args.report} (self-test {'passed' if result['ok'] else 'FAILED'})")
    if not result["ok"]:
        edgekit.fail(result["reason"])
    return 0


def main(argv=None) -> int:
    ap = common_args("Classify images with model.onnx (onnxruntime, CPU by default).", images_required=False)
    ap.add_argument("--model", default=None, help="ONNX file (default: the manifest's file for --precision)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8"),
                    help="which shipped ONNX to run (model.onnx, model_fp16.onnx, model_int8.onnx); default fp32")
    ap.add_argument("--providers", default="CPUExecutionProvider",
                    help="comma-separated onnxruntime providers, e.g. CUDAExecutionProvider,CPUExecutionProvider")
    edge_args(ap)
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
        return edge_checks(args, manifest, root, infer, runner="run_onnx.py", backend=backend, artifact=model,
                           precision=args.precision)
    files = list_images(args.images)
    results = []
    for chunk, x in batches(files, manifest["preprocessing"], args.batch):
        results += top_k(infer(x), manifest["classes"], args.top_k)
    report(files, results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
