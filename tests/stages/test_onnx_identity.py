"""Graph identity (the export stage's "merged graph = vanilla graph" proof) tells apart graphs whose weights
have the same shapes but whose computation differs: an extra operator, another operator, another order,
another stride or padding, other I/O. Names and weight values do not count."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from stages.lib.onnx_utils import compare_graphs, graph_signature


def _onnx(path: Path, *, stride: int = 1, pads: int = 1, acts: tuple[str, ...] = ("Relu",), act_after_pool: bool = False,
          seed: int = 0, prefix: str = "", out_type: int | None = None, size: int = 8) -> dict:
    """Conv(4x1x3x3) -> activations -> GlobalAveragePool -> Flatten, written with onnx.helper; its signature."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), f"{prefix}w")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), f"{prefix}b")
    nodes = [helper.make_node("Conv", ["input", w.name, b.name], [f"{prefix}c"], kernel_shape=[3, 3],
                              strides=[stride, stride], pads=[pads] * 4, name=f"{prefix}conv")]
    acts_nodes, last = [], f"{prefix}c"
    pool = [helper.make_node("GlobalAveragePool", [last], [f"{prefix}p"], name=f"{prefix}pool")]
    if act_after_pool:
        nodes, last = nodes + pool, f"{prefix}p"
    for i, op in enumerate(acts):
        acts_nodes.append(helper.make_node(op, [last], [f"{prefix}a{i}"], name=f"{prefix}act{i}"))
        last = f"{prefix}a{i}"
    nodes += acts_nodes
    if not act_after_pool:
        nodes.append(helper.make_node("GlobalAveragePool", [last], [f"{prefix}p"], name=f"{prefix}pool"))
        last = f"{prefix}p"
    nodes.append(helper.make_node("Flatten", [last], ["logits"], name=f"{prefix}flat"))
    graph = helper.make_graph(nodes, f"{prefix}g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, size, size])],
                              [helper.make_tensor_value_info("logits", out_type or TensorProto.FLOAT, ["batch", 4])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return graph_signature(path)


@pytest.fixture
def base(tmp_path) -> dict:
    return _onnx(tmp_path / "base.onnx")


def test_same_computation_with_other_names_and_weights_is_identical(base, tmp_path):
    other = _onnx(tmp_path / "renamed.onnx", seed=1, prefix="x_")
    res = compare_graphs(other, base)
    assert res["identical"] is True and res["extra_ops"] == {} and res["missing_ops"] == {} and res["extra_params"] == 0


@pytest.mark.parametrize("change, differs, extra, missing", [
    (dict(acts=("Relu", "Relu")), "ops_equal", {"Relu": 1}, {}),                  # an extra operator
    (dict(acts=("Sigmoid",)), "ops_equal", {"Sigmoid": 1}, {"Relu": 1}),           # another operator
    (dict(act_after_pool=True), "ops_equal", {}, {}),                             # same operators, other order
    (dict(stride=2), "attrs_equal", {}, {}),                                       # another stride
    (dict(pads=0), "attrs_equal", {}, {}),                                         # other padding
    (dict(size=10), "io_equal", {}, {}),                                           # another input shape
])
def test_a_different_computation_with_the_same_weight_shapes_is_told_apart(base, tmp_path, change, differs, extra, missing):
    other = _onnx(tmp_path / "other.onnx", **change)
    res = compare_graphs(other, base)
    assert res["initializers_equal"] is True and res["extra_params"] == 0  # the weights alone cannot tell them apart
    assert res[differs] is False and res["identical"] is False, res
    assert res["extra_ops"] == extra and res["missing_ops"] == missing
    assert compare_graphs(base, base)["identical"] is True


class _Net(nn.Module):
    def __init__(self, stride: int = 1, extra_relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=stride, padding=1)
        self.act = nn.Sequential(nn.ReLU(), nn.ReLU()) if extra_relu else nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)))


def _export(model: nn.Module, path: Path) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(2, 1, 8, 8),), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=18, dynamo=False)
    return graph_signature(path)


def test_exported_models_differing_only_in_stride_or_an_extra_relu(tmp_path):
    torch.manual_seed(0)
    ref = _export(_Net(), tmp_path / "ref.onnx")
    torch.manual_seed(1)
    assert compare_graphs(_export(_Net(), tmp_path / "same.onnx"), ref)["identical"] is True
    strided = compare_graphs(_export(_Net(stride=2), tmp_path / "stride.onnx"), ref)
    assert strided["initializers_equal"] and strided["io_equal"] and not strided["attrs_equal"]
    assert strided["identical"] is False
    relu = compare_graphs(_export(_Net(extra_relu=True), tmp_path / "relu.onnx"), ref)
    assert relu["initializers_equal"] and relu["identical"] is False and relu["extra_ops"] == {"Relu": 1}
