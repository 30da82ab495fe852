"""Helpers shared by several stages (data loading, training loop, ONNX/TensorRT plumbing, timing)."""
