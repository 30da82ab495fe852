#!/usr/bin/env python3
"""Classify images with a TensorRT engine from this bundle (norm-pipeline edge bundle).

Needs tensorrt, numpy, Pillow and pycuda or cuda-python (no PyTorch). Before loading, it reads the
engine's sidecar JSON and refuses, with the reason, when this machine's TensorRT version (major.minor.patch),
OS, CPU architecture, JetPack release or GPU compute capability differ from the ones the engine was built
for: rebuild the engine on the device with the trtexec command in README.md, then pass it with --engine.
Input and output types are read from the engine (an fp16-I/O engine gets fp16 input).

    python run_trt.py photo.png
    python run_trt.py images/ --engine model_fp16.plan --top-k 3
    python run_trt.py --selftest                   # golden images vs the pipeline's logits (exit 1 on failure)
    python run_trt.py --selftest --engine device_int8.plan --precision int8
    python run_trt.py --report device.json         # self-test + device facts + latency, for `norm-pipeline bundle ingest`
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import edgekit  # noqa: E402 - ships next to this script
from run_onnx import batches, common_args, list_images, load_manifest, model_for, report, top_k  # noqa: E402


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_version(v) -> tuple:
    out = []
    for part in str(v).split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
    return tuple(out)


def same_tensorrt(built, here) -> bool:
    """TensorRT loads a plan only on the version that built it: major.minor.patch, and build when both know it."""
    b, h = parse_version(built), parse_version(here)
    n = max(3, min(len(b), len(h)))
    return (b + (0,) * n)[:n] == (h + (0,) * n)[:n]


def _read(path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def platform_info(root="/") -> dict:
    """OS, CPU architecture, NVIDIA driver and (Jetson) L4T release, as the pipeline records them."""
    import platform

    l4t = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", _read(Path(root) / "etc/nv_tegra_release"))
    drv = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?([\d.]+)", _read(Path(root) / "proc/driver/nvidia/version"))
    return {"os": platform.system(), "arch": platform.machine(), "driver": drv.group(1) if drv else None,
            "l4t": f"{l4t.group(1)}.{l4t.group(2)}" if l4t else None}


def gpu_info():
    """(name, "major.minor") of CUDA device 0 through cuda-python or pycuda, or None."""
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        err, props = cudart.cudaGetDeviceProperties(0)
        if err == cudart.cudaError_t.cudaSuccess:
            name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
            return name.split("\x00")[0].strip(), f"{props.major}.{props.minor}"
    except Exception:  # noqa: BLE001 - try pycuda next
        pass
    try:
        import pycuda.driver as cuda

        cuda.init()
        dev = cuda.Device(0)
        return dev.name(), "{}.{}".format(*dev.compute_capability())
    except Exception:  # noqa: BLE001
        return None


def rebuild_hint(side: dict) -> str:
    cmd = side.get("trtexec")
    cmd = " ".join(cmd.replace("\\\n", " ").split()) if cmd else None
    return ("rebuild it with trtexec on this device" + (f": {cmd}" if cmd else " (README.md has the command)")
            + ", then pass it with --engine")


def compatibility_problem(side: dict, trt_version, gpu, plat=None) -> str | None:
    """Why this engine cannot load here (same rules as the pipeline), or None."""
    plan, built = side.get("plan", "engine"), side.get("tensorrt_version")
    fix = rebuild_hint(side)
    if not trt_version:
        return f"{plan} needs TensorRT {built}, which is not installed"
    if not same_tensorrt(built, trt_version):
        return f"{plan} was built with TensorRT {built} but this machine has TensorRT {trt_version} (plans load only there): {fix}"
    bp, hp = side.get("platform") or {}, plat or {}
    for key in ("os", "arch"):
        if bp.get(key) and hp.get(key) and bp[key] != hp[key]:
            return f"{plan} was built on {bp[key]} but this machine is {hp[key]} (plans are not portable across platforms): {fix}"
    if bp and hp and bp.get("l4t") != hp.get("l4t"):
        where = lambda p: f"JetPack (L4T {p['l4t']})" if p.get("l4t") else "a non-Jetson host"  # noqa: E731
        return f"{plan} was built on {where(bp)} but this machine is {where(hp)}: {fix}"
    if gpu is None:
        return f"{plan} needs an NVIDIA GPU but no CUDA device is visible"
    name, cc = gpu
    level = side.get("hardware_compatibility", "none")
    if level != "none" and hp.get("l4t"):
        return f"{plan} was built hardware-compatible ({level}), which JetPack does not support: {fix}"
    if level == "ampere_plus":
        if parse_version(cc)[:2] < (8, 0):
            return f"{plan} needs an Ampere or newer GPU (compute capability >= 8.0); {name} has {cc}: {fix}"
    elif parse_version(side.get("compute_capability"))[:2] != parse_version(cc)[:2]:
        return (f"{plan} was built for compute capability {side.get('compute_capability')} ({side.get('gpu_name')}) "
                f"but this GPU ({name}) has {cc}: {fix}")
    return None


class Buffers:
    """Device memory and a stream through pycuda when it really starts, else cuda-python; ``name`` says which."""

    def __init__(self):
        self.keep, self.note = [], ""
        try:
            import pycuda.driver as cuda

            try:
                import pycuda.autoprimaryctx  # noqa: F401
            except ImportError:
                import pycuda.autoinit  # noqa: F401
            self.cuda, self.rt, self.name = cuda, None, "pycuda"
            self.stream = cuda.Stream()
            self.handle = int(self.stream.handle)
            return
        except Exception as e:  # noqa: BLE001 - not installed, or installed but CUDA will not start: use cuda-python
            self.note = f"pycuda unusable ({type(e).__name__}: {' '.join(str(e).split())[:100]})"
        try:
            try:
                from cuda.bindings import runtime as rt
            except ImportError:
                from cuda import cudart as rt
        except ImportError:
            sys.exit(f"error: no CUDA buffer backend: {self.note}; pip install cuda-python (or pycuda)")
        self.cuda, self.rt, self.name = None, rt, "cuda-python"
        self.stream = self._ok(rt.cudaStreamCreate())
        self.handle = int(self.stream)

    def _ok(self, result):
        if result[0] != self.rt.cudaError_t.cudaSuccess:
            sys.exit(f"error: CUDA call failed: {result[0]}")
        return result[1] if len(result) > 1 else None

    def alloc(self, nbytes: int) -> int:
        if self.cuda:
            mem = self.cuda.mem_alloc(nbytes)
            self.keep.append(mem)
            return int(mem)
        return int(self._ok(self.rt.cudaMalloc(nbytes)))

    def copy(self, dst, src, to_device: bool) -> None:
        if self.cuda:
            (self.cuda.memcpy_htod_async if to_device else self.cuda.memcpy_dtoh_async)(dst, src, self.stream)
            return
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice if to_device else self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        d, s = (dst, src.ctypes.data) if to_device else (dst.ctypes.data, src)
        self._ok(self.rt.cudaMemcpyAsync(d, s, (src if to_device else dst).nbytes, kind, self.stream))

    def sync(self) -> None:
        if self.cuda:
            self.stream.synchronize()
        else:
            self._ok(self.rt.cudaStreamSynchronize(self.stream))


class Engine:
    """One engine: I/O dtypes from the engine itself, buffers sized for the profile's largest batch."""

    def __init__(self, plan: Path, side: dict | None = None):
        import tensorrt as trt

        fix = rebuild_hint(side or {})
        self.logger = trt.Logger(trt.Logger.WARNING)
        try:
            self.runtime = trt.Runtime(self.logger)
        except TypeError as e:  # pybind11 "factory function returned nullptr": CUDA did not start
            sys.exit(f"error: TensorRT {trt.__version__} could not start CUDA ({e}): NVIDIA driver too old for this "
                     "TensorRT's CUDA, or no usable GPU")
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            sys.exit(f"error: TensorRT {trt.__version__} could not load {plan} (see the log above): {fix}")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            sys.exit("error: TensorRT could not create an execution context (out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inp = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.out = "logits" if "logits" in names else next(n for n in names if n != self.inp)
        pmin, _, pmax = self.engine.get_tensor_profile_shape(self.inp, 0)
        self.min_shape, self.max_shape = tuple(pmin), tuple(pmax)
        self.min_batch, self.max_batch = int(pmin[0]), int(pmax[0])
        self.dtype = {}
        for n in (self.inp, self.out):
            try:
                self.dtype[n] = np.dtype(trt.nptype(self.engine.get_tensor_dtype(n)))
            except (TypeError, KeyError, ValueError):
                sys.exit(f"error: tensor {n} of {plan.name} has type {self.engine.get_tensor_dtype(n)}, which numpy cannot hold")
        self.bufs = Buffers()
        self.set_shape(self.max_shape)
        self.ptr, self.capacity = {}, {}
        for n in (self.inp, self.out):
            shape = tuple(self.context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                sys.exit(f"error: TensorRT left {n} with unknown dimensions {shape} at input shape {self.max_shape}")
            self.capacity[n] = int(np.prod(shape)) * self.dtype[n].itemsize
            self.ptr[n] = self.bufs.alloc(self.capacity[n])
            self.context.set_tensor_address(n, self.ptr[n])

    def set_shape(self, shape) -> None:
        if not self.context.set_input_shape(self.inp, tuple(shape)):
            sys.exit(f"error: TensorRT rejected input shape {tuple(shape)} (the engine's profile is "
                     f"{self.min_shape} .. {self.max_shape})")

    def run_batch(self, xb: np.ndarray) -> np.ndarray:
        """One batch within the profile, converted to the engine's input type; output as float32."""
        if not self.min_batch <= len(xb) <= self.max_batch:
            sys.exit(f"error: batch of {len(xb)} is outside the engine's profile ({self.min_batch} .. {self.max_batch})")
        xb = np.ascontiguousarray(xb, dtype=self.dtype[self.inp])
        if xb.nbytes > self.capacity[self.inp]:
            sys.exit(f"error: input {xb.shape} does not fit the engine's input buffer (profile max {self.max_shape})")
        self.set_shape(xb.shape)
        self.bufs.copy(self.ptr[self.inp], xb, True)
        if not self.context.execute_async_v3(self.bufs.handle):
            sys.exit("error: TensorRT execution failed (see the log above)")
        out = np.empty(tuple(self.context.get_tensor_shape(self.out)), dtype=self.dtype[self.out])
        self.bufs.copy(out, self.ptr[self.out], False)
        self.bufs.sync()
        return out.astype(np.float32)

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Any batch size: split to the profile's maximum, zero-pad up to its minimum."""
        outs = []
        for i in range(0, len(x), self.max_batch):
            xb = x[i : i + self.max_batch]
            n = len(xb)
            if n < self.min_batch:
                xb = np.concatenate([xb, np.zeros((self.min_batch - n, *xb.shape[1:]), xb.dtype)])
            outs.append(self.run_batch(xb)[:n])
        return np.concatenate(outs)


def cuda_versions() -> dict:
    """The CUDA driver API and runtime versions ('12.4') through cuda-python, where it is installed."""
    out = {}
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        for key, fn in (("cuda_driver_version", "cudaDriverGetVersion"), ("cuda_runtime_version", "cudaRuntimeGetVersion")):
            err, v = getattr(cudart, fn)()
            if err == cudart.cudaError_t.cudaSuccess and int(v) > 0:
                out[key] = f"{int(v) // 1000}.{int(v) % 1000 // 10}"
    except Exception:  # noqa: BLE001 - absent or broken: the versions stay unknown
        pass
    return out


def engine_precision(args, manifest: dict, plan: Path, side: dict | None) -> str:
    """The engine's precision (its self-test tolerance): --precision, else the sidecar's, else the manifest's entry."""
    listed = {Path(e.get("plan", "")).name: e.get("precision") for e in manifest.get("engines") or []}
    known = args.precision or (side or {}).get("precision") or listed.get(plan.name)
    if known is None:
        sys.exit(f"error: the precision of {plan.name} is unknown (no sidecar): pass --precision fp32, fp16 or int8")
    if side and args.precision and side.get("precision") not in (None, args.precision):
        sys.exit(f"error: --precision {args.precision} but {plan.name}'s sidecar says {side['precision']}")
    return known


def source_onnx(manifest: dict, root: Path, side: dict | None, precision: str) -> tuple:
    """(sha256, how known) of the ONNX the engine was built from: the sidecar's record, else the bundle's ONNX for the
    precision (the trtexec commands in README.md build device_<precision>.plan from it)."""
    if side and side.get("onnx_sha256"):
        return side["onnx_sha256"], f"sidecar ({side.get('onnx')})"
    onnx = model_for(manifest, root, precision)
    if not onnx.is_file():
        return None, "unknown"
    return sha256(onnx), f"assumed: {onnx.name} (no sidecar; the README's trtexec command for {precision})"


def edge_run(args, manifest: dict, root: Path, plan: Path, side: dict | None, engine: "Engine", trt_version) -> int:
    """--selftest / --report with the shared kit: precision tolerances from the manifest, TensorRT facts in the report."""
    precision = engine_precision(args, manifest, plan, side)
    onnx_sha, onnx_how = source_onnx(manifest, root, side, precision)
    gpu, plat = gpu_info(), platform_info()
    facts = {"tensorrt_version": trt_version, "gpu_name": gpu[0] if gpu else None,
             "compute_capability": gpu[1] if gpu else None, "driver_version": plat.get("driver"),
             "engine_sha256": sha256(plan), "buffer_backend": engine.bufs.name, **cuda_versions()}
    backend = {"name": "tensorrt", "version": trt_version, "buffers": engine.bufs.name,
               "buffers_note": engine.bufs.note or None, "engine_precision": precision, "source_onnx": onnx_how,
               "profile": {"min": list(engine.min_shape), "max": list(engine.max_shape)}}
    return edgekit.edge_checks(args, manifest, root, engine.infer, runner="run_trt.py", backend=backend, artifact=plan,
                               precision=precision, source_onnx_sha256=onnx_sha, extra_facts=facts)


def main(argv=None) -> int:
    ap = common_args("Classify images with a TensorRT engine from this bundle.", images_required=False)
    ap.add_argument("--engine", default=None, help="plan file (default: the first engine listed in the manifest)")
    ap.add_argument("--sidecar", default=None, help="engine sidecar JSON (default: the plan's name with .json)")
    ap.add_argument("--precision", default=None, choices=("fp32", "fp16", "int8"),
                    help="the engine's precision, for the self-test tolerance (default: from its sidecar or the manifest)")
    edgekit.edge_args(ap)
    args = ap.parse_args(argv)
    if args.images is None and not (args.selftest or args.report):
        ap.error("give an image or a folder, or --selftest / --report")
    manifest = load_manifest(args.manifest)
    root = Path(args.manifest).resolve().parent
    if not (root / manifest["model"]["onnx"]).is_file():  # a manifest copied elsewhere: the files are here
        root = HERE
    if args.engine is None and not manifest.get("engines"):
        sys.exit("error: this bundle has no TensorRT engine; build one from model.onnx with trtexec (README.md), "
                 "then pass it with --engine")
    plan = Path(args.engine) if args.engine else root / manifest["engines"][0]["plan"]
    sidecar = Path(args.sidecar) if args.sidecar else plan.with_suffix(".json")
    try:
        import tensorrt as trt

        trt_version = trt.__version__
    except Exception:  # noqa: BLE001 - absent, or a broken install (missing libnvinfer): the same answer
        trt_version = None
    if not plan.is_file():
        sys.exit(f"error: engine {plan} not found")
    try:
        side = json.loads(sidecar.read_text()) if sidecar.is_file() else None
    except (OSError, ValueError) as e:
        sys.exit(f"error: engine sidecar {sidecar} is not readable JSON ({e}); pass --sidecar or remove it")
    if side is not None and side.get("plan_sha256") not in (None, sha256(plan)):
        print(f"note: {sidecar.name} describes another build of {plan.name}; not using it", file=sys.stderr)
        side = None
    if side is not None:
        problem = compatibility_problem(side, trt_version, gpu_info(), platform_info())
        if problem:
            sys.exit(f"error: refusing to load the engine: {problem}")
    elif trt_version is None:
        sys.exit("error: tensorrt is not installed (JetPack ships it; elsewhere: pip install tensorrt-cu12, or "
                 "tensorrt-cu13 with NVIDIA driver >= 580)")
    else:
        print(f"note: no sidecar for {plan.name}; assuming it was built on this machine", file=sys.stderr)
    engine = Engine(plan, side)
    if engine.bufs.note:
        print(f"note: {engine.bufs.note}; using {engine.bufs.name}", file=sys.stderr)
    if args.selftest or args.report:
        return edge_run(args, manifest, root, plan, side, engine, trt_version)
    files = list_images(args.images)
    results = []
    for _chunk, x in batches(files, manifest["preprocessing"], args.batch):
        results += top_k(engine.infer(x), manifest["classes"], args.top_k)
    report(files, results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
