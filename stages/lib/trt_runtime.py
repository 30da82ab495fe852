"""Run a serialized TensorRT engine on numpy batches (``TrtRunner``): load, check it may run here, infer, time.

An engine is refused, with the rebuild command, when its sidecar says it was built for another TensorRT,
GPU or platform (``stages.lib.trt_rules.check_compatibility``). Device buffers come from cuda-python or
pycuda (``stages.lib.trt_buffers``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stages.lib import trt_env
from stages.lib.errors import PipelineError
from stages.lib.io import sha256_file
from stages.lib.trt_buffers import _make_buffers
from stages.lib.trt_env import cuda_init_failed, logger, need
from stages.lib.trt_rules import check_compatibility, compatibility_notes, load_sidecar, rebuild_hint, sidecar_path_for


def numpy_dtype(trt: Any, dtype: Any) -> np.dtype:
    """numpy dtype of a TensorRT DataType; one TensorRT cannot map (BF16, FP8, ...) is refused by name."""
    try:
        return np.dtype(trt.nptype(dtype))
    except (TypeError, KeyError, ValueError):
        raise PipelineError(f"engine tensor type {getattr(dtype, 'name', dtype)} has no numpy equivalent; "
                            "export the ONNX with float32 or float16 inputs and outputs") from None


class TrtRunner:
    """Run a serialized engine on numpy batches; refuses engines built for another TensorRT or GPU."""

    def __init__(self, plan_path: Path | str, sidecar_path: Path | str | None = None) -> None:
        import tensorrt as trt

        self.plan_path = Path(plan_path)
        self.sidecar = load_sidecar(sidecar_path or sidecar_path_for(self.plan_path))
        if self.sidecar.get("plan_sha256") != sha256_file(self.plan_path):
            raise PipelineError(f"{self.plan_path} does not match its sidecar's sha256 (rebuilt or corrupt?); "
                                "re-run `norm-pipeline stage engine`")
        info = trt_env.runtime_info()
        check_compatibility(self.sidecar, info)
        self.notes = compatibility_notes(self.sidecar, info)
        self._ptrs: dict[str, int] = {}
        self._bufs = _make_buffers()
        self.backend = self._bufs.name
        self.notes.append(f"device buffers via {self.backend}" + (f" ({self._bufs.note})" if self._bufs.note else ""))
        try:
            try:
                self._runtime = trt.Runtime(logger(trt))
            except TypeError as e:
                raise cuda_init_failed(trt, "trt.Runtime", e) from None
            self.engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
            if self.engine is None:
                raise PipelineError(f"TensorRT {trt.__version__} could not deserialize {self.plan_path} (see the log above); "
                                    f"{rebuild_hint(self.sidecar)}")
            self.context = need(self.engine.create_execution_context(), "create_execution_context",
                                 "out of GPU memory?")
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            if len(ins) != 1:
                raise PipelineError(f"{self.plan_path} has {len(ins)} inputs; TrtRunner handles one")
            self.input_name, self.outputs = ins[0], [n for n in names if n not in ins]
            self.dtypes = {n: numpy_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
            pmin, _, pmax = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.min_shape, self.max_shape = tuple(pmin), tuple(pmax)
            self._set_shape(self.max_shape)
            for n in names:  # buffers sized for the largest batch, bound once
                shape = tuple(self.context.get_tensor_shape(n))
                if any(d < 0 for d in shape):
                    raise PipelineError(f"TensorRT left tensor {n} with unknown dimensions {shape} at the profile's "
                                        f"maximum input {self.max_shape}")
                nbytes = int(np.prod(shape)) * self.dtypes[n].itemsize
                self._ptrs[n] = self._bufs.alloc(max(nbytes, 1))
                if self.context.set_tensor_address(n, self._ptrs[n]) is False:
                    raise PipelineError(f"TensorRT rejected the device address of tensor {n}")
        except BaseException:
            self.close()
            raise

    @property
    def output_name(self) -> str:
        return "logits" if "logits" in self.outputs else self.outputs[0]

    def _set_shape(self, shape: tuple) -> None:
        if not self.context.set_input_shape(self.input_name, tuple(shape)):
            raise PipelineError(f"TensorRT rejected input shape {tuple(shape)} for {self.input_name} (the engine's profile "
                                f"is {self.min_shape} .. {self.max_shape})")

    def _load_input(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.dtypes[self.input_name])
        if x.ndim != len(self.max_shape) or any(not lo <= d <= hi for d, lo, hi in zip(x.shape, self.min_shape, self.max_shape, strict=True)):
            raise PipelineError(f"input shape {tuple(x.shape)} is outside the engine's profile {self.min_shape} .. {self.max_shape}")
        self._set_shape(x.shape)
        self._bufs.htod(self._ptrs[self.input_name], x)
        return x  # the caller keeps it alive until the stream is synchronised

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self._bufs.stream_handle):
            raise PipelineError(f"TensorRT execution of {self.plan_path.name} failed (see the TensorRT log)")

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Host batch in, host output ``logits`` (or the first output) out."""
        keep = self._load_input(x)
        self._execute()
        out = np.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.dtypes[self.output_name])
        self._bufs.dtoh(out, self._ptrs[self.output_name])
        self._bufs.sync()
        del keep
        return out

    def time(self, x: np.ndarray, iters: int = 100, warmup: int = 10) -> list[float]:
        """Per-inference GPU milliseconds (CUDA events around execute_async_v3; no host/device copies)."""
        keep = self._load_input(x)
        self._bufs.sync()
        for _ in range(warmup):
            self._execute()
        start, end = self._bufs.event(), self._bufs.event()
        times = []
        for _ in range(iters):
            self._bufs.record(start)
            self._execute()
            self._bufs.record(end)
            times.append(self._bufs.elapsed_ms(start, end))
        self._bufs.drop_event(start)
        self._bufs.drop_event(end)
        del keep
        return times

    def close(self) -> None:
        bufs = getattr(self, "_bufs", None)
        if bufs is not None:
            for ptr in self._ptrs.values():
                bufs.free(ptr)
            self._ptrs.clear()
            bufs.close()
            self._bufs = None
        self.context = self.engine = None

    def __enter__(self) -> "TrtRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
