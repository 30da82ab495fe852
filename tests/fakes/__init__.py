"""Test doubles for GPU-only libraries (TensorRT, cuda-python, pycuda) that fail where the real ones fail."""
