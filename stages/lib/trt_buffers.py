"""Device buffers for TensorRT engines: one interface (alloc, copies, stream, events) over pycuda or cuda-python.

pycuda is used when it really starts (import and CUDA context), else cuda-python; ``.name`` says which ran
and ``.note`` why pycuda was dropped. Both are imported only when buffers are made.
"""
from __future__ import annotations

import numpy as np

from stages.lib.errors import PipelineError


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python layout
    return cudart



class _CudaPythonBuffers:
    """Device memory, one stream and events through cuda-python (calls return ``(err, value)``)."""

    name = "cuda-python"

    def __init__(self) -> None:
        self.rt = _import_cudart()
        self.stream = self._call(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def _call(self, result, what: str):
        err, rest = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            raise PipelineError(f"CUDA call {what} failed: {err}")
        return rest[0] if len(rest) == 1 else None

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def alloc(self, nbytes: int) -> int:
        return int(self._call(self.rt.cudaMalloc(nbytes), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self._call(self.rt.cudaFree(ptr), "cudaFree")

    def htod(self, ptr: int, host: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, self.stream), "cudaMemcpyAsync")

    def dtoh(self, host: np.ndarray, ptr: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, self.stream), "cudaMemcpyAsync")

    def sync(self) -> None:
        self._call(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def event(self):
        return self._call(self.rt.cudaEventCreate(), "cudaEventCreate")

    def record(self, ev) -> None:
        self._call(self.rt.cudaEventRecord(ev, self.stream), "cudaEventRecord")

    def elapsed_ms(self, start, end) -> float:
        self._call(self.rt.cudaEventSynchronize(end), "cudaEventSynchronize")
        return float(self._call(self.rt.cudaEventElapsedTime(start, end), "cudaEventElapsedTime"))

    def drop_event(self, ev) -> None:
        self.rt.cudaEventDestroy(ev)

    def close(self) -> None:
        self.rt.cudaStreamDestroy(self.stream)


class _PycudaBuffers:
    """The same interface through pycuda (the primary context, so TensorRT and torch share it)."""

    name = "pycuda"

    def __init__(self) -> None:
        import pycuda.driver as cuda

        try:
            import pycuda.autoprimaryctx  # noqa: F401
        except ImportError:
            import pycuda.autoinit  # noqa: F401
        self.cuda, self.stream, self._mem = cuda, cuda.Stream(), {}

    @property
    def stream_handle(self) -> int:
        return int(self.stream.handle)

    def alloc(self, nbytes: int) -> int:
        mem = self.cuda.mem_alloc(nbytes)
        self._mem[int(mem)] = mem
        return int(mem)

    def free(self, ptr: int) -> None:
        self._mem.pop(ptr).free()

    def htod(self, ptr: int, host: np.ndarray) -> None:
        self.cuda.memcpy_htod_async(ptr, host, self.stream)

    def dtoh(self, host: np.ndarray, ptr: int) -> None:
        self.cuda.memcpy_dtoh_async(host, ptr, self.stream)

    def sync(self) -> None:
        self.stream.synchronize()

    def event(self):
        return self.cuda.Event()

    def record(self, ev) -> None:
        ev.record(self.stream)

    def elapsed_ms(self, start, end) -> float:
        end.synchronize()
        return float(end.time_since(start))

    def drop_event(self, ev) -> None:
        pass  # pycuda frees events when they are garbage-collected

    def close(self) -> None:
        pass


def _make_buffers():
    """pycuda when it really starts (import and context), else cuda-python; ``.name`` says which ran and
    ``.note`` why the first choice was dropped."""
    failed = []
    for cls in (_PycudaBuffers, _CudaPythonBuffers):
        try:
            bufs = cls()
        except Exception as e:  # noqa: BLE001 - any import or context error: try the next backend
            failed.append(f"{cls.name}: {type(e).__name__}: {' '.join(str(e).split())[:120]}")
            continue
        bufs.note = f"{'; '.join(failed)}, so {bufs.name} is used" if failed else ""
        return bufs
    raise PipelineError("no CUDA buffer backend could start (" + "; ".join(failed) + "): pip install cuda-python "
                        "matching the NVIDIA driver (see docs/tensorrt.md)")
