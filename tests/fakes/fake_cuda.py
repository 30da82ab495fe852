"""A fake CUDA device for CPU tests: host memory stands in for device memory.

``runtime_module()`` is a cuda-python ``cuda.bindings.runtime`` over it (every call returns ``(err, ...)``
like the real one, and a copy outside an allocation fails instead of corrupting memory);
``install(monkeypatch)`` puts it, and a pycuda that imports but cannot start CUDA (or no pycuda at all),
into ``sys.modules``. ``fake_tensorrt`` engines read and write the same memory, so the real data path of
``stages.lib.trt_runtime.TrtRunner`` and of the bundle's ``run_trt.py`` runs on CPU::

    from tests.fakes import fake_cuda
    fake_cuda.install(monkeypatch, pycuda="broken")   # or "absent"
    ...
    assert not fake_cuda.DEVICE                        # every allocation was freed
"""
from __future__ import annotations

import ctypes
import enum
import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

import numpy as np

DEVICE: dict[int, np.ndarray] = {}  # device pointer (a real host address) -> its bytes


class FakeDeviceError(RuntimeError):
    """A device access outside every allocation (on a real GPU: corruption or an illegal address)."""


def alloc(nbytes: int) -> int:
    arr = np.zeros(max(int(nbytes), 1), np.uint8)
    DEVICE[arr.ctypes.data] = arr
    return arr.ctypes.data


def region(ptr: int, nbytes: int) -> np.ndarray:
    """The ``nbytes`` of device memory at ``ptr``; FakeDeviceError unless they lie inside one allocation."""
    for base, arr in DEVICE.items():
        if base <= ptr < base + arr.nbytes:
            if ptr + nbytes > base + arr.nbytes:
                raise FakeDeviceError(f"{nbytes} bytes at {ptr:#x} run {ptr + nbytes - base - arr.nbytes} bytes past "
                                      f"an allocation of {arr.nbytes}")
            return arr[ptr - base : ptr - base + nbytes]
    raise FakeDeviceError(f"{ptr:#x} is not device memory")


def runtime_module(*, gpu: tuple[str, int, int] | None = ("Fake GPU", 8, 7), driver: int = 12040,
                   runtime: int = 12060) -> types.ModuleType:
    """A strict stand-in for ``cuda.bindings.runtime`` (the calls this project uses, nothing else)."""
    rt = types.ModuleType("cuda.bindings.runtime")

    class cudaError_t(enum.IntEnum):  # noqa: N801 - the real names
        cudaSuccess = 0
        cudaErrorInvalidValue = 1
        cudaErrorNoDevice = 100
        cudaErrorIllegalAddress = 700

    class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class _Handle:
        __slots__ = ("_h",)
        _next = [1]

        def __init__(self) -> None:
            self._h = _Handle._next[0]
            _Handle._next[0] += 1

        def __int__(self) -> int:
            return self._h

    class cudaStream_t(_Handle):  # noqa: N801
        __slots__ = ()

    class cudaEvent_t(_Handle):  # noqa: N801
        __slots__ = ()

    ok, streams = cudaError_t.cudaSuccess, set()
    no_dev = (cudaError_t.cudaErrorNoDevice,)

    def props(device: int):
        if gpu is None or device != 0:
            return (cudaError_t.cudaErrorInvalidValue if gpu else cudaError_t.cudaErrorNoDevice, None)
        return ok, types.SimpleNamespace(name=gpu[0].encode() + b"\x00" * 8, major=gpu[1], minor=gpu[2])

    def memcpy(dst: int, src: int, nbytes: int, kind, stream) -> tuple:
        if gpu is None:
            return no_dev
        if not isinstance(kind, cudaMemcpyKind) or not isinstance(stream, cudaStream_t) or stream not in streams:
            return (cudaError_t.cudaErrorInvalidValue,)
        try:
            dev = region(dst if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else src, nbytes)
        except FakeDeviceError:
            return (cudaError_t.cudaErrorIllegalAddress,)
        host = src if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else dst
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            ctypes.memmove(dev.ctypes.data, host, nbytes)
        else:
            ctypes.memmove(host, dev.ctypes.data, nbytes)
        return (ok,)

    def stream_create():
        if gpu is None:
            return (cudaError_t.cudaErrorNoDevice, None)
        s = cudaStream_t()
        streams.add(s)
        return ok, s

    def stream_destroy(s):
        if s not in streams:
            return (cudaError_t.cudaErrorInvalidValue,)
        streams.discard(s)
        return (ok,)

    def malloc(nbytes: int):
        return (ok, alloc(nbytes)) if gpu is not None else (cudaError_t.cudaErrorNoDevice, 0)

    def free(ptr: int):
        return (ok,) if DEVICE.pop(int(ptr), None) is not None else (cudaError_t.cudaErrorInvalidValue,)

    funcs: dict[str, Any] = {
        "cudaError_t": cudaError_t, "cudaMemcpyKind": cudaMemcpyKind, "cudaStream_t": cudaStream_t, "cudaEvent_t": cudaEvent_t,
        "cudaGetDeviceCount": lambda: (ok, 1) if gpu else (cudaError_t.cudaErrorNoDevice, 0),
        "cudaGetDeviceProperties": props, "cudaDriverGetVersion": lambda: (ok, driver),
        "cudaRuntimeGetVersion": lambda: (ok, runtime), "cudaStreamCreate": stream_create,
        "cudaStreamDestroy": stream_destroy, "cudaMalloc": malloc, "cudaFree": free, "cudaMemcpyAsync": memcpy,
        "cudaStreamSynchronize": lambda s: (ok,) if s in streams else (cudaError_t.cudaErrorInvalidValue,),
        "cudaEventCreate": lambda: (ok, cudaEvent_t()), "cudaEventRecord": lambda ev, s: (ok,),
        "cudaEventSynchronize": lambda ev: (ok,), "cudaEventElapsedTime": lambda a, b: (ok, 0.5),
        "cudaEventDestroy": lambda ev: (ok,),
    }
    for k, v in funcs.items():
        setattr(rt, k, v)
    return rt


class PycudaLogicError(RuntimeError):
    """What pycuda raises when cuInit fails (pycuda._driver.LogicError)."""


class _NoCudaLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise PycudaLogicError("cuInit failed: no CUDA-capable device is detected")


class _PycudaContextFinder(importlib.abc.MetaPathFinder):
    """``import pycuda.autoprimaryctx`` / ``pycuda.autoinit`` fail as they do when the driver cannot start."""

    def find_spec(self, fullname, path, target=None):
        if fullname in ("pycuda.autoprimaryctx", "pycuda.autoinit"):
            return importlib.machinery.ModuleSpec(fullname, _NoCudaLoader())
        return None


def broken_pycuda() -> dict[str, types.ModuleType]:
    """pycuda installed (so ``find_spec('pycuda')`` succeeds) but unable to start CUDA."""
    pkg = types.ModuleType("pycuda")
    pkg.__spec__ = importlib.machinery.ModuleSpec("pycuda", None, is_package=True)
    pkg.__path__ = []
    drv = types.ModuleType("pycuda.driver")

    def init(flags: int = 0) -> None:
        raise PycudaLogicError("cuInit failed: no CUDA-capable device is detected")

    drv.init, drv.LogicError = init, PycudaLogicError
    pkg.driver = drv
    return {"pycuda": pkg, "pycuda.driver": drv}


def install(monkeypatch, *, pycuda: str = "absent", **runtime_kw) -> types.ModuleType:
    """Fake cuda-python (and pycuda 'absent' or 'broken') in ``sys.modules``; returns the runtime module."""
    rt = runtime_module(**runtime_kw)
    bindings = types.ModuleType("cuda.bindings")
    bindings.__path__, bindings.runtime = [], rt
    cuda = types.ModuleType("cuda")
    cuda.__path__, cuda.bindings = [], bindings
    for name, mod in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", rt)):
        monkeypatch.setitem(sys.modules, name, mod)
    for name in ("pycuda", "pycuda.driver", "pycuda.autoprimaryctx", "pycuda.autoinit"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    if pycuda == "broken":
        for name, mod in broken_pycuda().items():
            monkeypatch.setitem(sys.modules, name, mod)
        monkeypatch.setattr(sys, "meta_path", [_PycudaContextFinder(), *sys.meta_path])
    else:
        monkeypatch.setitem(sys.modules, "pycuda", None)  # import pycuda -> ImportError
    return rt
