"""TensorRT and CUDA on this machine: versions, GPU, whether engines can be built and run here.

Shared by the build (stages.lib.trt_build) and the runner (stages.lib.trt_runtime): the one logger per
process, the Builder probe, the errors for a CUDA that does not start. ``environment_fingerprint`` is what
the engine stage's cache key covers (pipeline/runner.py). ``tensorrt``, ``pycuda`` and ``cuda-python`` are
imported only inside the functions that need them; the tests drive this module with a strict fake TensorRT
(tests/fakes/fake_tensorrt.py).
"""
from __future__ import annotations

import sys
from typing import Any, Optional

from stages.lib import trt_rules
from stages.lib.errors import PipelineError
from stages.lib.trt_buffers import _import_cudart, _make_buffers
from stages.lib.trt_rules import INSTALL_HINT, cuda_version_string

_LOGGER: list = []


def tensorrt_version() -> Optional[str]:
    try:
        import tensorrt as trt
    except Exception:  # noqa: BLE001 - broken installs count as absent
        return None
    return str(trt.__version__)


def gpu_info(device: int = 0) -> Optional[dict]:
    """{"name", "compute_capability": "8.6", "source"} of a CUDA device, or None; no torch import needed."""
    try:
        cudart = _import_cudart()
        err, count = cudart.cudaGetDeviceCount()
        if err == cudart.cudaError_t.cudaSuccess and count > device:
            err, p = cudart.cudaGetDeviceProperties(device)
            if err == cudart.cudaError_t.cudaSuccess:
                name = p.name.decode(errors="replace") if isinstance(p.name, bytes) else str(p.name)
                return {"name": name.split("\x00")[0].strip(), "compute_capability": f"{p.major}.{p.minor}", "source": "cuda-python"}
    except Exception:  # noqa: BLE001 - missing package or driver: try the next source
        pass
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() > device:
            dev = cuda.Device(device)
            major, minor = dev.compute_capability()
            return {"name": dev.name(), "compute_capability": f"{major}.{minor}", "source": "pycuda"}
    except Exception:  # noqa: BLE001
        pass
    torch = sys.modules.get("torch")  # only when already imported: importing torch is not cheap
    if torch is not None and torch.cuda.is_available() and torch.cuda.device_count() > device:
        major, minor = torch.cuda.get_device_capability(device)
        return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}", "source": "torch"}
    return None


def cuda_versions() -> dict:
    """{"cuda_driver": "12.4", "cuda_runtime": "12.6"} through cuda-python (None where unknown)."""
    out: dict = {"cuda_driver": None, "cuda_runtime": None}
    try:
        cudart = _import_cudart()
        for key, fn in (("cuda_driver", "cudaDriverGetVersion"), ("cuda_runtime", "cudaRuntimeGetVersion")):
            err, v = getattr(cudart, fn)()
            if err == cudart.cudaError_t.cudaSuccess:
                out[key] = cuda_version_string(v)
    except Exception:  # noqa: BLE001 - cuda-python absent or broken: versions stay unknown
        pass
    return out


def runtime_info() -> dict:
    """TensorRT version, GPU and platform of this machine, as ``check_compatibility`` compares them."""
    gpu = gpu_info() or {}
    return {"tensorrt_version": tensorrt_version(), "gpu_name": gpu.get("name"),
            "compute_capability": gpu.get("compute_capability"), "platform": trt_rules.platform_info(cuda_versions())}


def cuda_init_failed(trt: Any, what: str, err: BaseException) -> PipelineError:
    return PipelineError(f"TensorRT {getattr(trt, '__version__', '?')} could not start CUDA ({what} failed: "
                         f"{type(err).__name__}: {str(err)[:160]}): usually an NVIDIA driver too old for this TensorRT's "
                         f"CUDA, a CUDA 12/13 package mix-up, or no usable GPU; {INSTALL_HINT}")


def make_builder(trt: Any):
    """``trt.Builder`` with its constructor failure (pybind11 'factory function returned nullptr') explained."""
    try:
        made = trt.Builder(logger(trt))
    except TypeError as e:
        raise cuda_init_failed(trt, "trt.Builder", e) from None
    return need(made, "trt.Builder")


def need(obj: Any, what: str, hint: str = "see the TensorRT log above") -> Any:
    """TensorRT reports many failures by returning None: turn that into a PipelineError naming the call."""
    if obj is None:
        raise PipelineError(f"TensorRT returned nothing from {what} ({hint})")
    return obj


def trt_available() -> tuple[bool, str]:
    """(True, description) when engines can be built and run here, else (False, the reason).

    Importing tensorrt is not enough: it imports on machines where CUDA cannot start, so this creates a
    Builder and the device buffers, as a build and a run would.
    """
    try:
        import tensorrt as trt
    except Exception as e:  # noqa: BLE001
        return False, f"tensorrt is not importable ({type(e).__name__}: {str(e)[:120]}); {INSTALL_HINT}"
    gpu = gpu_info()
    if gpu is None:
        return False, f"no CUDA GPU visible (tensorrt {trt.__version__} is installed)"
    try:
        make_builder(trt)  # created and dropped: the probe is whether CUDA starts
        bufs = _make_buffers()
    except PipelineError as e:
        return False, str(e)
    backend, note = bufs.name, getattr(bufs, "note", "")
    bufs.close()
    return True, (f"TensorRT {trt.__version__} on {gpu['name']} (compute capability {gpu['compute_capability']}, "
                  f"buffers via {backend}{'; ' + note if note else ''})")


def logger(trt):
    """One logger per process: TensorRT warns when builders and runtimes get different ones."""
    if not _LOGGER or not isinstance(_LOGGER[0], trt.ILogger):
        _LOGGER[:] = [trt.Logger(trt.Logger.WARNING)]
    return _LOGGER[0]


def environment_fingerprint() -> dict:
    """TensorRT version, CUDA availability, GPU name and compute capability (no torch import)."""
    gpu = gpu_info()
    return {"tensorrt": tensorrt_version(), "cuda": gpu is not None, "gpu": gpu["name"] if gpu else None,
            "compute_capability": gpu["compute_capability"] if gpu else None}
