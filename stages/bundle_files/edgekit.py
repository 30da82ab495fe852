"""The runners' shared kit (norm-pipeline edge bundle): golden self-test, device latency, device facts.

Needs only numpy (Pillow only when an image must be resized), so run_onnx.py and run_trt.py can both use
it on a device without PyTorch. What it checks and measures:

- ``selftest``: the raw uint8 pixels in golden.npz go through the manifest's preprocessing and the model,
  and the logits are compared with the pipeline's fp32 logits for the same images, with the tolerance the
  manifest gives for the precision that ran (fp32 tight, fp16 looser, int8 by top-1 agreement only). A
  preprocessing mismatch (wrong mean/std, channel order, scale) fails it.
- ``measure_latency``: warm-up, then per batch size p50/p90/p99, throughput and a bootstrap 95% CI of the
  median.
- ``device_facts``: CPU, GPU, driver/CUDA/TensorRT versions, Jetson L4T/JetPack release and nvpmodel mode,
  whichever are readable.
- ``build_report`` / ``write_json``: the device report that ``norm-pipeline bundle ingest`` takes back.
- ``edge_args`` / ``edge_checks``: ``--selftest`` and ``--report`` for any runner. A runner adds them with
  ``edge_args(parser)`` and calls ``edge_checks(args, manifest, folder, infer, runner=..., backend=...,
  artifact=..., precision=...)``; a TensorRT runner also passes ``source_onnx_sha256`` (the sidecar's
  ``onnx_sha256``, so an engine built on the device is accepted by ``bundle ingest``) and ``extra_facts``
  (``tensorrt_version``, CUDA/driver versions, ``gpu_name``, ``compute_capability``, ``engine_sha256``,
  ``buffer_backend``), as run_trt.py does.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPORT_FORMAT = "norm-pipeline/device-report/1"
GOLDEN_FORMAT = "norm-pipeline/golden/1"


class SelfTestError(Exception):
    """The golden self-test could not run (missing or corrupt golden.npz, unknown precision)."""


# ----------------------------------------------------------------------------- files
def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path, obj) -> Path:
    """Write JSON through a temporary file and a rename: never a half-written report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------- preprocessing
def _resize_one(img: np.ndarray, pp: dict) -> np.ndarray:
    """One HWC or HW uint8 image resized/cropped as the manifest says (Pillow, bilinear), back as HWC."""
    from PIL import Image

    bilinear = getattr(Image, "Resampling", Image).BILINEAR
    pil = Image.fromarray(img[..., 0] if img.ndim == 3 and img.shape[2] == 1 else img)
    h, w = pp["size"]
    if pp["resize"] == "shorter_side_center_crop":
        s = int(pp["resize_shorter"])
        iw, ih = pil.size
        nw, nh = (s, int(s * ih / iw)) if iw <= ih else (int(s * iw / ih), s)
        pil = pil.resize((nw, nh), bilinear)
        top, left = int(round((nh - h) / 2.0)), int(round((nw - w) / 2.0))
        pil = pil.crop((left, top, left + w, top + h))
    else:
        pil = pil.resize((w, h), bilinear)
    out = np.asarray(pil)
    return out[..., None] if out.ndim == 2 else out


def preprocess_raw(raw: np.ndarray, pp: dict) -> np.ndarray:
    """uint8 pixels (N, C, H, W) -> the float32 NCHW batch the model takes, following ``pp`` (the manifest's
    ``preprocessing``): resize if needed, then ``x = (pixel * scale - mean[c]) / std[c]``."""
    raw = np.asarray(raw)
    if raw.ndim != 4:
        raise SelfTestError(f"golden images must be (N, C, H, W) uint8; got shape {raw.shape}")
    h, w = pp["size"]
    if raw.shape[2:] != (h, w) or pp["resize"] != "direct":
        raw = np.stack([_resize_one(img.transpose(1, 2, 0), pp).transpose(2, 0, 1) for img in raw])
    if raw.shape[1] != int(pp["in_chans"]):
        raise SelfTestError(f"golden images have {raw.shape[1]} channels; the manifest's preprocessing expects {pp['in_chans']}")
    mean = np.asarray(pp["mean"], dtype=np.float32)[None, :, None, None]
    std = np.asarray(pp["std"], dtype=np.float32)[None, :, None, None]
    x = raw.astype(np.float32) * np.float32(pp["scale"])
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


# ----------------------------------------------------------------------------- golden self-test
def load_golden(manifest: dict, root) -> dict:
    """golden.npz as named by the manifest, checked against the manifest's sha256 when listed."""
    spec = manifest.get("selftest") or {}
    name = spec.get("golden")
    if not name:
        raise SelfTestError("this bundle has no golden self-test (manifest.json has no selftest.golden)")
    path = Path(root) / name
    if not path.is_file():
        raise SelfTestError(f"{name} not found next to manifest.json")
    want = (manifest.get("files") or {}).get(name, {}).get("sha256")
    if want and sha256(path) != want:
        raise SelfTestError(f"{name} does not match its sha256 in manifest.json (corrupt copy?)")
    try:
        with np.load(path, allow_pickle=False) as z:
            g = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise SelfTestError(f"{name} is not a readable .npz file ({e})") from None
    missing = {"images", "labels", "logits"} - set(g)
    if missing:
        raise SelfTestError(f"{name} lacks {', '.join(sorted(missing))}")
    return g


def tolerance_for(manifest: dict, precision: str) -> dict:
    tols = (manifest.get("selftest") or {}).get("tolerances") or {}
    if precision not in tols:
        raise SelfTestError(f"the manifest has no self-test tolerance for precision {precision!r} "
                            f"(known: {', '.join(sorted(tols)) or 'none'})")
    return tols[precision]


def compare_golden(logits: np.ndarray, golden: dict, tol: dict, precision: str) -> dict:
    """Top-1 agreement and max abs diff against the golden fp32 logits; ``ok`` and a one-line ``reason``.

    ``tol``: ``min_top1_agreement`` always; ``atol``/``rtol`` (an element fails when |a-b| > atol and
    |a-b| > rtol*|b|, Polygraphy's rule) unless null, as for int8 where only the decisions are compared.
    """
    a = np.asarray(logits, dtype=np.float64)
    b = np.asarray(golden["logits"], dtype=np.float64)
    if a.shape != b.shape:
        return {"ok": False, "precision": precision, "samples": int(len(b)),
                "reason": f"{precision} self-test failed: output shape {list(a.shape)} differs from the golden {list(b.shape)}"}
    n = len(b)
    agree = int((a.argmax(1) == b.argmax(1)).sum())
    diff = np.abs(a - b)
    atol, rtol = tol.get("atol"), tol.get("rtol")
    failed = 0
    if atol is not None:
        bad = (diff > atol) & (diff > (rtol or 0.0) * np.abs(b))
        failed = int((bad | ~np.isfinite(a)).sum())
    need = float(tol.get("min_top1_agreement", 1.0))
    labels = np.asarray(golden["labels"])
    out = {"precision": precision, "samples": n, "top1_agreement": agree / n if n else 0.0, "agreeing": agree,
           "max_abs_diff": float(diff.max(initial=0.0)), "failed_elements": failed, "tolerance": dict(tol),
           "label_top1": float((a.argmax(1) == labels).mean()) if n else 0.0}
    problems = []
    if agree / max(n, 1) < need:
        problems.append(f"top-1 agrees on {agree}/{n} golden images (needs >= {need:.0%})")
    if failed:
        problems.append(f"{failed} logits off by more than atol {atol}/rtol {rtol} (max abs diff {out['max_abs_diff']:.3g})")
    if not np.isfinite(a).all():
        problems.append("non-finite outputs")
    out["ok"] = not problems and n > 0
    if not out["ok"]:
        out["reason"] = (f"{precision} self-test failed: " + "; ".join(problems or ["no golden images"])
                         + ": check the preprocessing against manifest.json (mean/std, channel order, scale) and the model file")
    return out


def selftest(infer, manifest: dict, root, precision: str, batch: int = 64) -> dict:
    """Run ``infer`` (float32 NCHW -> logits) on golden.npz preprocessed per the manifest; compare."""
    golden = load_golden(manifest, root)
    tol = tolerance_for(manifest, precision)
    x = preprocess_raw(golden["images"], manifest["preprocessing"])
    outs = [np.asarray(infer(x[i : i + batch]), dtype=np.float32) for i in range(0, len(x), max(1, batch))]
    return compare_golden(np.concatenate(outs) if outs else np.zeros((0, 0)), golden, tol, precision)


def golden_inputs(manifest: dict, root) -> np.ndarray:
    """The golden images preprocessed: real inputs for latency measurements."""
    return preprocess_raw(load_golden(manifest, root)["images"], manifest["preprocessing"])


# ----------------------------------------------------------------------------- latency
def bootstrap_median_ci(samples, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> list:
    """Percentile-bootstrap CI of the median (resampling single runs)."""
    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no samples")
    rng = np.random.default_rng(seed)
    meds = np.median(a[rng.integers(0, a.size, size=(n_boot, a.size))], axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(meds, [tail, 100 - tail])
    return [float(lo), float(hi)]


def summarize_latency(ms, batch: int, n_boot: int = 2000) -> dict:
    a = np.asarray(ms, dtype=np.float64)
    med = float(np.median(a))
    return {"batch": batch, "runs": int(a.size), "p50_ms": med, "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "min_ms": float(a.min()),
            "median_ci95_ms": bootstrap_median_ci(a, n_boot), "throughput_per_s": batch * 1e3 / med if med > 0 else None}


def measure_latency(run_once, inputs: np.ndarray, batch_sizes, *, warmup: int = 20, iters: int = 200,
                    timer=time.perf_counter, progress=None) -> list:
    """Per batch size: ``warmup`` untimed calls, then ``iters`` timed ones of ``run_once(x)``.

    ``run_once`` must return only when the result is ready (host arrays out), so wall time is the latency
    an application sees. Inputs are real golden images, tiled up to the batch size.
    """
    rows = []
    for b in batch_sizes:
        x = np.ascontiguousarray(np.resize(inputs, (int(b), *inputs.shape[1:])), dtype=np.float32)
        for _ in range(warmup):
            run_once(x)
        ms = []
        for _ in range(iters):
            t0 = timer()
            run_once(x)
            ms.append((timer() - t0) * 1e3)
        rows.append({**summarize_latency(ms, int(b)), "warmup": warmup})
        if progress:
            progress(rows[-1])
    return rows


def parse_batches(text: str) -> list:
    try:
        out = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise ValueError(f"batch sizes must be positive integers separated by commas (got {text!r})")
    return out


# ----------------------------------------------------------------------------- device facts
def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").replace("\x00", "").strip() or None
    except OSError:
        return None


def _cmd(args: list, timeout: float = 10) -> str | None:
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else None


def _cpu_name() -> str | None:
    text = _read("/proc/cpuinfo") or ""
    for key in ("model name", "Hardware", "Model", "cpu model"):
        for line in text.splitlines():
            if line.startswith(key) and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def jetson_facts() -> dict:
    """L4T release (/etc/nv_tegra_release), JetPack (dpkg), board model, nvpmodel mode; {} off Jetson."""
    tegra = _read("/etc/nv_tegra_release")
    if not tegra:
        return {}
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", tegra)
    out = {"l4t": f"{m.group(1)}.{m.group(2)}" if m else tegra.splitlines()[0][:80],
           "board": _read("/proc/device-tree/model"),
           "jetpack": _cmd(["dpkg-query", "--showformat=${Version}", "--show", "nvidia-jetpack"])}
    q = _cmd(["nvpmodel", "-q"])
    if q:
        mode = re.search(r"NV Power Mode:\s*(.+)", q)
        num = re.findall(r"^\s*(\d+)\s*$", q, re.M)
        out["nvpmodel"] = (mode.group(1).strip() if mode else q.splitlines()[0]) + (f" (mode {num[-1]})" if num else "")
    return out


def nvidia_smi_facts() -> dict:
    """GPU name, compute capability, driver and the driver's CUDA version from nvidia-smi, when present."""
    out = {}
    q = _cmd(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"])
    if q:
        parts = [p.strip() for p in q.splitlines()[0].split(",")]
        if len(parts) == 3:
            out.update(gpu_name=parts[0], compute_capability=parts[1], driver_version=parts[2])
    head = _cmd(["nvidia-smi"])
    m = re.search(r"CUDA Version:\s*([\d.]+)", head or "")
    if m:
        out["cuda_driver_version"] = m.group(1)
    return out


def device_facts(extra: dict | None = None) -> dict:
    """What was measured on: CPU/OS always; GPU, driver, CUDA, TensorRT, Jetson facts where readable."""
    facts = {"machine": platform.machine(), "system": platform.system(), "platform": platform.platform(),
             "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
             "numpy": np.__version__}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-cu12", "cuda-python", "pycuda"):
        try:
            facts.setdefault("packages", {})[dist] = version(dist)
        except PackageNotFoundError:
            pass
    facts.update(nvidia_smi_facts())
    jet = jetson_facts()
    if jet:
        facts["jetson"] = jet
    facts.update({k: v for k, v in (extra or {}).items() if v is not None})
    return facts


# ----------------------------------------------------------------------------- the report
def build_report(*, runner: str, backend: dict, artifact, precision: str, manifest: dict, manifest_path,
                 selftest_result: dict | None, latency: list, facts: dict, source_onnx_sha256: str | None = None) -> dict:
    """The device report: which bundle and file ran, on what, the self-test and the latency."""
    files = manifest.get("files") or {}
    onnx_name = (manifest.get("model") or {}).get("onnx", "model.onnx")
    artifact = Path(artifact)
    return {"format": REPORT_FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "runner": runner, "backend": backend,
            "bundle": {"model": (manifest.get("model") or {}).get("name"), "created": manifest.get("created"),
                       "model_onnx_sha256": (files.get(onnx_name) or {}).get("sha256"),
                       "manifest_sha256": sha256(manifest_path)},
            "artifact": {"file": artifact.name, "sha256": sha256(artifact), "bytes": artifact.stat().st_size,
                         "precision": precision, "source_onnx_sha256": source_onnx_sha256},
            "device": facts, "selftest": selftest_result, "latency": latency}


# ----------------------------------------------------------------------------- runner glue (any runtime)
def edge_args(ap) -> None:
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


def edge_checks(args, manifest: dict, root: Path, infer, *, runner: str, backend: dict, artifact: Path,
                precision: str, source_onnx_sha256=None, extra_facts=None) -> int:
    """--selftest and --report for any runner: ``infer`` maps a float32 NCHW batch to logits."""
    try:
        result = selftest(infer, manifest, root, precision)
    except SelfTestError as e:
        if args.report is None:
            fail(f"self-test could not run: {e}")
        result = {"ok": None, "precision": precision, "reason": f"self-test could not run: {e}"}
    if args.report is None:
        if not result["ok"]:
            fail(result["reason"])
        print(f"self-test passed: {precision} {artifact.name}, top-1 agrees on {result['agreeing']}/{result['samples']} "
              f"golden images, max abs diff {result['max_abs_diff']:.3g}")
        return 0
    try:
        batch_sizes = parse_batches(args.batch_sizes) if args.batch_sizes else default_batches(manifest)
        x = golden_inputs(manifest, root)
    except (ValueError, SelfTestError) as e:
        fail(str(e))
    latency = measure_latency(infer, x, batch_sizes, warmup=max(0, args.warmup), iters=max(1, args.iters),
                              progress=lambda r: print(f"batch {r['batch']}: p50 {r['p50_ms']:.3f} ms, p90 "
                                                       f"{r['p90_ms']:.3f}, p99 {r['p99_ms']:.3f}", file=sys.stderr))
    report = build_report(runner=runner, backend=backend, artifact=artifact, precision=precision, manifest=manifest,
                          manifest_path=args.manifest, selftest_result=result, latency=latency,
                          facts=device_facts(extra_facts), source_onnx_sha256=source_onnx_sha256)
    write_json(args.report, report)
    print(f"device report: {args.report} (self-test {'passed' if result['ok'] else 'FAILED'})")
    if not result["ok"]:
        fail(result["reason"])
    return 0


def fail(msg: str, code: int = 1):
    """One line on stderr and a non-zero exit: what the device operator sees."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)
