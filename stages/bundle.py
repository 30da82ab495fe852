"""Stage `bundle`: the edge team's folder and tarball: ONNX, engines, manifest, runners, README.

``bundle/`` holds model.onnx (and model_fp16.onnx for TensorRT 11 fp16 builds), the TensorRT engines
with their sidecars when the engine stage ran, run_onnx.py / run_trt.py (no PyTorch needed), README.md,
manifest.json (hashes, preprocessing, classes, accuracies, latency, versions) and SHA256SUMS
(``sha256sum -c SHA256SUMS``). ``bundle.tar.gz`` is the same folder as one file. ``verify_bundle``
(stages.lib.bundle_check) checks either form.
"""
from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from stages.lib.accuracy import manifest_accuracies
from stages.lib.bundle_check import UNLISTED, integrity_errors, verify_bundle
from stages.lib.context import StageContext
from stages.lib.dataset_meta import DatasetMeta
from stages.lib.edge import engine_gate, golden_spec, precision_rows, precisions_table, quantize_report
from stages.lib.errors import PipelineError
from stages.lib.io import atomic_write_text, sha256_file
from stages.lib.tarball import make_tarball

FORMAT = "norm-pipeline/bundle/1"
RUNNERS = ("run_onnx.py", "run_trt.py", "edgekit.py")


def bundle_file(name: str) -> str:
    """A file shipped in ``stages/bundle_files`` (package data)."""
    return resources.files("stages").joinpath("bundle_files", name).read_text(encoding="utf-8")


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def preprocessing(meta: dict) -> dict:
    """What run_onnx.py / run_trt.py do to an image: the data stage's validation transform."""
    h, w = meta["input_size"]
    pp = {"in_chans": meta["in_chans"], "color": "grayscale" if meta["in_chans"] == 1 else "RGB", "size": [h, w],
          "resize": "direct", "resize_shorter": None, "interpolation": "bilinear", "scale": 1.0 / 255.0,
          "mean": list(meta["mean"]), "std": list(meta["std"]), "layout": "NCHW",
          "formula": "x = (pixel * scale - mean[c]) / std[c]"}
    if meta["dataset"] == "imagefolder":
        pp.update(resize="shorter_side_center_crop", resize_shorter=int(round(h * 256 / 224)))
    return pp


def copy_engines(ctx: StageContext, bundle: Path) -> list[dict]:
    """Plans and sidecars from the engine stage, when it ran and bundle.include_engines is set."""
    if not ctx.cfg.bundle.include_engines or "engine" not in ctx.inputs:
        return []
    from stages.lib.trt_rules import load_sidecar

    engines = []
    for plan in sorted(Path(ctx.inputs["engine"]).glob("*.plan")):
        side_path = plan.with_suffix(".json")
        side = load_sidecar(side_path)
        if engine_gate(ctx, side.get("precision")):
            continue
        shutil.copyfile(plan, bundle / plan.name)
        shutil.copyfile(side_path, bundle / side_path.name)
        engines.append({"plan": plan.name, "sidecar": side_path.name, "precision": side.get("precision"),
                        "tensorrt_version": side.get("tensorrt_version"), "gpu_name": side.get("gpu_name"),
                        "compute_capability": side.get("compute_capability"),
                        "hardware_compatibility": side.get("hardware_compatibility"), "profile": side.get("profile")})
    return engines


def fp16_onnx(src: Path, dst: Path, x: np.ndarray) -> dict:
    """model_fp16.onnx for TensorRT 11 (strongly typed) and its agreement with the fp32 model in onnxruntime."""
    from stages.lib.onnx_fp16 import convert_onnx_to_fp16
    from stages.lib.onnx_utils import compare_outputs, ort_session, run_ort

    stats = convert_onnx_to_fp16(src, dst)
    a, b = run_ort(ort_session(dst), x), run_ort(ort_session(src), x)
    diff = compare_outputs(a, b, atol=5e-2, rtol=5e-2)
    return {"file": dst.name, "converted_initializers": stats["initializers"], "clipped_values": stats["clipped_values"],
            "samples": int(len(x)), "max_abs_diff_vs_fp32": diff["max_abs_diff"],
            "top1_agreement_vs_fp32": float((a.argmax(1) == b.argmax(1)).mean())}


def latency_table(ctx: StageContext) -> Any:
    """benchmark.json when the benchmark stage ran (its summary metrics if the file is large)."""
    if "benchmark" not in ctx.inputs:
        return None
    path = ctx.artifact("benchmark", "benchmark")
    if path.is_file() and path.stat().st_size < 256_000:
        return json.loads(path.read_text())
    return ctx.input_metrics("benchmark") or None


def first_images(meta: dict, n: int) -> np.ndarray:
    from stages.lib.datasets import val_batches

    for x, _ in val_batches(meta, batch_size=n, device="cpu"):
        return x.numpy()
    raise PipelineError("the validation set is empty (check data.val_limit)")


def build_manifest(ctx: StageContext, meta: dict, props: dict, inp: dict, out: dict, engines: list, fp16: dict | None) -> dict:
    from stages.lib.trt_env import tensorrt_version
    from stages.lib.trt_rules import profile_shapes, trtexec_commands

    e = ctx.cfg.engine
    shapes = profile_shapes(inp["shape"], e.min_batch, e.opt_batch, e.max_batch)
    versions = {"python": ".".join(map(str, __import__("sys").version_info[:3])), "torch": _version("torch"),
                "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime"), "numpy": _version("numpy"),
                "tensorrt": tensorrt_version(), "norm-pipeline": _pipeline_version()}
    return {
        "format": FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "norm_pipeline_version": versions["norm-pipeline"], "dataset": meta["dataset"],
        "model": {"name": props.get("model") or ctx.cfg.student.model, "teacher": ctx.cfg.teacher.model,
                  "kind": "NORM student merged into the vanilla architecture", "onnx": "model.onnx",
                  "fp16_onnx": fp16["file"] if fp16 else None, "num_classes": meta["num_classes"]},
        "input": {"name": inp["name"], "shape": ["batch", *inp["shape"][1:]], "dtype": inp["dtype"], "layout": "NCHW",
                  "profile": shapes},
        "output": {"name": out["name"], "shape": ["batch", *out["shape"][1:]], "dtype": out["dtype"],
                   "meaning": "logits (softmax gives class probabilities)"},
        "preprocessing": preprocessing(meta), "classes": list(meta["classes"]), "accuracy": manifest_accuracies(ctx.input_metrics),
        "fp16_onnx_check": fp16, "latency": latency_table(ctx), "engines": engines,
        "gpu": {"name": engines[0]["gpu_name"], "compute_capability": engines[0]["compute_capability"]} if engines else None,
        "versions": versions,
        "trtexec": trtexec_commands(e, inp, int8=(ctx.out_dir / "bundle" / "model_int8.onnx").is_file()),
    }


def _pipeline_version() -> str:
    try:
        from pipeline import __version__

        return str(__version__)
    except ImportError:
        return _version("norm-pipeline") or "unknown"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"
    return str(v)


def render_readme(manifest: dict, names: list[str]) -> str:
    """README.md from the template: files, accuracy, input, runners, trtexec commands."""
    pp, acc, engines = manifest["preprocessing"], manifest["accuracy"], manifest["engines"]
    what = {"model.onnx": "the model: fp32, dynamic batch; build engines from this",
            "model_fp16.onnx": "the same model with fp16 weights and compute, fp32 input/output (TensorRT 11 fp16 builds)",
            "run_onnx.py": "classify images with onnxruntime", "run_trt.py": "classify images with a TensorRT engine",
            "README.md": "this file", "edgekit.py": "self-test, latency and device-report code shared by the runners",
            "golden.npz": "validation images (raw pixels), labels and the pipeline's logits for the self-test",
            "model_int8.onnx": "INT8 model with Q/DQ nodes (static, per-channel; onnxruntime, or TensorRT INT8 builds)", "manifest.json": "input, preprocessing, classes, accuracies, versions, file hashes",
            "SHA256SUMS": "`sha256sum -c SHA256SUMS`"}
    for e in engines:
        what[e["plan"]] = (f"TensorRT {e['precision']} engine (TensorRT {e['tensorrt_version']}, {e['gpu_name']}, "
                           f"compute capability {e['compute_capability']}): loads only there")
        what[e["sidecar"]] = f"what {e['plan']} was built with and for (checked by run_trt.py)"
    rows = [("teacher top-1", acc.get("teacher_top1")), ("student trained alone (CE) top-1", acc.get("baseline_ce_top1")),
            ("NORM student top-1", acc.get("distill_top1"))]
    rows += [(f"verify: {k}", v) for k, v in (acc.get("verify") or {}).items() if k in ("top1_agreement", "fp32_max_rel_diff")]
    rows += [(f"TensorRT {k}", v) for k, v in (acc.get("engine") or {}).items() if k.endswith(("top1", "agreement"))]
    rows += [("onnxruntime vs PyTorch max abs diff", (acc.get("export") or {}).get("ort_max_abs_diff"))]
    shape = manifest["input"]["shape"][1:]
    resize = (f"resize the shorter side to {pp['resize_shorter']} then center-crop {pp['size'][0]}x{pp['size'][1]}"
              if pp["resize"] == "shorter_side_center_crop" else f"resize to {pp['size'][0]}x{pp['size'][1]} (H x W)")
    fp16_note = ("`model_fp16.onnx` in this bundle is that model (fp16 weights and compute, fp32 input/output); NVIDIA's "
                 "ModelOpt AutoCast (`python -m modelopt.onnx.autocast --onnx_path model.onnx`) makes an equivalent one."
                 if manifest["model"]["fp16_onnx"] else
                 "Make one with NVIDIA ModelOpt AutoCast: "
                 "`python -m modelopt.onnx.autocast --onnx_path model.onnx --output_path model_fp16.onnx`.")
    engine_text = ("Engines in this bundle (built by the pipeline; rebuild on your device if run_trt.py refuses them):\n\n"
                   + "\n".join(f"- `{e['plan']}`: {e['precision']}, TensorRT {e['tensorrt_version']}, {e['gpu_name']} "
                                f"(compute capability {e['compute_capability']})" for e in engines)
                   if engines else "This bundle has no prebuilt engine (no GPU/TensorRT where it was made): build one "
                                   "with trtexec as below, then `python run_trt.py images/ --engine device_fp32.plan`.")
    profile = manifest["input"]["profile"]
    values = {
        "MODEL": manifest["model"]["name"], "TEACHER": manifest["model"]["teacher"], "DATASET": manifest["dataset"],
        "NUM_CLASSES": str(manifest["model"]["num_classes"]), "PIPELINE_VERSION": manifest["norm_pipeline_version"],
        "CREATED": manifest["created"], "INPUT_NAME": manifest["input"]["name"], "OUTPUT_NAME": manifest["output"]["name"],
        "INPUT_CHW": ", ".join(str(d) for d in shape),
        "FILES_TABLE": "\n".join(f"| `{n}` | {what.get(n, '')} |" for n in names),
        "ACCURACY_TABLE": "| figure | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None),
        "PREPROCESS": (f"convert to {pp['color']}, {resize} with bilinear interpolation, scale pixels by 1/255, subtract "
                       f"mean {[round(m, 4) for m in pp['mean']]} and divide by std {[round(s, 4) for s in pp['std']]} per channel"),
        "ENGINES": engine_text, "MIN_BATCH": str(profile["min"][0]), "OPT_BATCH": str(profile["opt"][0]),
        "MAX_BATCH": str(profile["max"][0]), "TRTEXEC_FP32": manifest["trtexec"]["fp32"],
        "TRTEXEC_FP16_TRT10": manifest["trtexec"]["fp16_trt10"], "TRTEXEC_FP16_TRT11": manifest["trtexec"]["fp16_trt11"],
        "FP16_ONNX_NOTE": fp16_note,
        "INT8_SECTION": ("\n\nINT8 (TensorRT 10.x and 11.x): `model_int8.onnx` carries Q/DQ nodes (explicit quantization), so "
                         "TensorRT builds it as a strongly typed network without calibration (TensorRT 11 has no calibrators; "
                         "on 11 `--stronglyTyped` is the default and may be dropped):\n\n```bash\n"
                         + manifest["trtexec"]["int8"] + "\npython run_trt.py --selftest --engine device_int8.plan --precision int8"
                         "\n```") if manifest["trtexec"].get("int8") else "", "PRECISIONS_TABLE": precisions_table(manifest.get("precisions") or []),
        "GOLDEN_N": str((manifest.get("selftest") or {}).get("samples") or 0),
        "DATA_NOTE": ("\n- Fashion-MNIST images are light objects on a black background: invert ordinary photos "
                      "(dark object on a light background) before classifying them."
                      if manifest["dataset"] == "fashion_mnist" else ""),
    }
    text = bundle_file("README.md.tmpl")
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        raise PipelineError("README template has an unfilled placeholder: " + text[text.index("{{"):][:40])
    return text


def run(ctx: StageContext) -> dict:
    from stages.lib.onnx_utils import read_metadata
    from stages.lib.trt_build import onnx_io

    src = ctx.artifact("export", "model")
    if not src.is_file():
        raise PipelineError(f"{src} not found; re-run `norm-pipeline stage export`")
    meta = DatasetMeta.load(ctx.artifact("data", "dataset")).to_dict()
    quant = quantize_report(ctx)
    bundle = ctx.out_dir / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    bundle.mkdir(parents=True)
    shutil.copyfile(src, bundle / "model.onnx")
    inputs, outputs = onnx_io(src)
    ship16 = ctx.cfg.bundle.fp16_onnx and (quant is None or quant["precisions"]["fp16"]["shipped"])
    fp16 = fp16_onnx(bundle / "model.onnx", bundle / "model_fp16.onnx", first_images(meta, 64)) if ship16 else None
    if quant is not None and quant["precisions"]["int8"]["shipped"]:
        shutil.copyfile(ctx.artifact("quantize", "int8"), bundle / "model_int8.onnx")
    engines = copy_engines(ctx, bundle)
    for name in RUNNERS:
        (bundle / name).write_text(bundle_file(name), encoding="utf-8")
    selftest = golden_spec(ctx, meta, bundle)
    manifest = build_manifest(ctx, meta, read_metadata(src), inputs[0], outputs[0], engines, fp16)
    manifest.update(selftest=selftest, precisions=precision_rows(quant, fp16),
                    calibration=(quant or {}).get("calibration"))
    names = sorted([p.name for p in bundle.iterdir()] + ["README.md", *UNLISTED])
    (bundle / "README.md").write_text(render_readme(manifest, names), encoding="utf-8")
    manifest["files"] = {p.relative_to(bundle).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                         for p in sorted(bundle.rglob("*")) if p.is_file() and p.name not in UNLISTED}
    atomic_write_text(bundle / "manifest.json", json.dumps(manifest, indent=2))
    sums = {**{n: e["sha256"] for n, e in manifest["files"].items()}, "manifest.json": sha256_file(bundle / "manifest.json")}
    atomic_write_text(bundle / "SHA256SUMS", "".join(f"{h}  {n}\n" for n, h in sorted(sums.items())))
    errors = integrity_errors(verify_bundle(bundle))
    if errors:
        raise PipelineError(f"the bundle failed its own check: {errors[0]}")
    metrics = {"files": len(sums) + 1, "bundle_bytes": sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()),
               "engines": len(engines), "tar_sha256": None, "tar_bytes": None}
    if fp16:
        metrics["fp16_onnx_max_abs_diff"] = fp16["max_abs_diff_vs_fp32"]
    if ctx.cfg.bundle.tarball:
        tar_path = make_tarball(bundle, ctx.out_dir / "bundle.tar.gz")
        metrics.update(tar_sha256=sha256_file(tar_path), tar_bytes=tar_path.stat().st_size)
    ctx.log(f"bundle: {metrics['files']} files, {metrics['bundle_bytes'] / 1e6:.2f} MB, {len(engines)} engine(s)")
    return metrics
