from __future__ import annotations

import pytest


@pytest.fixture
def env(monkeypatch):
    """Fake CUDA device + cuda-python (no pycuda) and a fake TensorRT 10.3.0; returns the fake module."""
    from stages.lib import trt_env
    from tests.fakes import fake_cuda, fake_tensorrt

    fake_cuda.DEVICE.clear()
    fake_cuda.install(monkeypatch)
    trt_env._LOGGER.clear()
    yield fake_tensorrt.install(monkeypatch, "10.3.0")
    fake_cuda.DEVICE.clear()
