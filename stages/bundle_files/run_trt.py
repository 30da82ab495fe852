#!/usr/bin/env python3
"""Classify images with a TensorRT engine from this bundle (norm-pipeline edge bundle).

Needs tensorrt, numpy, Pillow and pycuda or cuda-python (no PyTorch). Before loading, it reads the
engine's sidecar JSON and refuses, with the reason, when this machine's TensorRT version or GPU compute
capability differ from the ones the engine was built for: rebuild the engine from model.onnx with the
trtexec command in README.md, then pass it with --engine.

    python run_trt.py photo.png
    python run_trt.py images/ --engine model_fp16.plan --top-k 3
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
from run_onnx import batches, common_args, list_images, load_manifest, report, top_k  # noqa: E402


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


def compatibility_problem(side: dict, trt_version, gpu) -> str | None:
    """Why this engine cannot load here (same rules as the pipeline), or None."""
    plan, built = side.get("plan", "engine"), side.get("tensorrt_version")
    fix = "rebuild it from model.onnx with the trtexec command in README.md"
    if not trt_version:
        return f"{plan} needs TensorRT {built}, which is not installed"
    bv, hv = parse_version(built), parse_version(trt_version)
    if side.get("version_compatible"):
        if hv < bv:
            return f"{plan} (version-compatible) needs TensorRT >= {built}; this machine has {trt_version}: {fix}"
    elif bv[:2] != hv[:2]:
        return f"{plan} was built with TensorRT {built} but this machine has TensorRT {trt_version}: {fix}"
    if gpu is None:
        return f"{plan} needs an NVIDIA GPU but no CUDA device is visible"
    name, cc = gpu
    if side.get("hardware_compatibility", "none") == "ampere_plus":
        if parse_version(cc)[:2] < (8, 0):
            return f"{plan} needs an Ampere or newer GPU (compute capability >= 8.0); {name} has {cc}: {fix}"
    elif parse_version(side.get("compute_capability"))[:2] != parse_version(cc)[:2]:
        return (f"{plan} was built for compute capability {side.get('compute_capability')} ({side.get('gpu_name')}) "
                f"but this GPU ({name}) has {cc}: {fix}")
    return None


class Buffers:
    """Device memory and a stream through pycuda if installed, else cuda-python."""

    def __init__(self):
        try:
            import pycuda.driver as cuda

            try:
                import pycuda.autoprimaryctx  # noqa: F401
            except ImportError:
                import pycuda.autoinit  # noqa: F401
            self.cuda, self.rt = cuda, None
            self.stream = cuda.Stream()
            self.handle = int(self.stream.handle)
        except ImportError:
            try:
                from cuda.bindings import runtime as rt
            except ImportError:
                from cuda import cudart as rt
            self.cuda, self.rt = None, rt
            self.stream = self._ok(rt.cudaStreamCreate())
            self.handle = int(self.stream)
        self.keep = []

    def _ok(self, result):
        if result[0] != self.rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA error: {result[0]}")
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
    def __init__(self, plan: Path):
        import tensorrt as trt

        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            sys.exit(f"error: TensorRT could not load {plan} (see the log above); rebuild it with trtexec (README.md)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inp = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.out = "logits" if "logits" in names else next(n for n in names if n != self.inp)
        pmin, _, pmax = self.engine.get_tensor_profile_shape(self.inp, 0)
        self.min_batch, self.max_batch = int(pmin[0]), int(pmax[0])
        self.bufs = Buffers()
        self.context.set_input_shape(self.inp, tuple(pmax))
        self.ptr = {}
        for n in (self.inp, self.out):
            itemsize = np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))).itemsize
            nbytes = int(np.prod(tuple(self.context.get_tensor_shape(n)))) * itemsize
            self.ptr[n] = self.bufs.alloc(nbytes)
            self.context.set_tensor_address(n, self.ptr[n])
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.out)))

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Any batch size: split to the profile's maximum, zero-pad up to its minimum."""
        outs = []
        for i in range(0, len(x), self.max_batch):
            xb = x[i : i + self.max_batch]
            n = len(xb)
            if n < self.min_batch:
                xb = np.concatenate([xb, np.zeros((self.min_batch - n, *xb.shape[1:]), xb.dtype)])
            xb = np.ascontiguousarray(xb, dtype=np.float32)
            self.context.set_input_shape(self.inp, xb.shape)
            self.bufs.copy(self.ptr[self.inp], xb, True)
            if not self.context.execute_async_v3(self.bufs.handle):
                sys.exit("error: TensorRT execution failed (see the log above)")
            out = np.empty(tuple(self.context.get_tensor_shape(self.out)), dtype=self.out_dtype)
            self.bufs.copy(out, self.ptr[self.out], False)
            self.bufs.sync()
            outs.append(out[:n].astype(np.float32))
        return np.concatenate(outs)


def main(argv=None) -> int:
    ap = common_args("Classify images with a TensorRT engine from this bundle.")
    ap.add_argument("--engine", default=None, help="plan file (default: the first engine listed in the manifest)")
    ap.add_argument("--sidecar", default=None, help="engine sidecar JSON (default: the plan's name with .json)")
    args = ap.parse_args(argv)
    manifest = load_manifest(args.manifest)
    root = Path(args.manifest).parent
    if args.engine is None and not manifest.get("engines"):
        sys.exit("error: this bundle has no TensorRT engine; build one from model.onnx with trtexec (README.md), "
                 "then pass it with --engine")
    plan = Path(args.engine) if args.engine else root / manifest["engines"][0]["plan"]
    sidecar = Path(args.sidecar) if args.sidecar else plan.with_suffix(".json")
    try:
        import tensorrt as trt

        trt_version = trt.__version__
    except ImportError:
        trt_version = None
    if not plan.is_file():
        sys.exit(f"error: engine {plan} not found")
    side = json.loads(sidecar.read_text()) if sidecar.is_file() else None
    if side is not None and side.get("plan_sha256") not in (None, sha256(plan)):
        print(f"note: {sidecar.name} describes another build of {plan.name}; not using it", file=sys.stderr)
        side = None
    if side is not None:
        problem = compatibility_problem(side, trt_version, gpu_info())
        if problem:
            sys.exit(f"error: refusing to load the engine: {problem}")
    elif trt_version is None:
        sys.exit("error: tensorrt is not installed (JetPack ships it; elsewhere: pip install tensorrt)")
    else:
        print(f"note: no sidecar for {plan.name}; assuming it was built on this machine", file=sys.stderr)
    engine = Engine(plan)
    files = list_images(args.images)
    results = []
    for chunk, x in batches(files, manifest["preprocessing"], args.batch):
        results += top_k(engine.infer(x), manifest["classes"], args.top_k)
    report(files, results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
