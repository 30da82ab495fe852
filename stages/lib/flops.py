"""Parameter and FLOP counts: the structural half of "merging leaves the inference cost unchanged".

FLOPs are PyTorch's own count (``torch.utils.flop_counter.FlopCounterMode``): convolutions and matrix
products, 2 FLOPs per multiply-add; element-wise ops (BatchNorm, ReLU, additions, pooling) are not
counted. The same counter on both models makes the comparison fair whatever it leaves out.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (buffers such as BatchNorm running statistics excluded)."""
    return int(sum(p.numel() for p in model.parameters()))


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass on a zero tensor of ``input_shape`` (batch dimension included).

    Runs in eval mode (restoring the previous mode afterwards) so BatchNorm statistics are not touched.
    """
    from torch.utils.flop_counter import FlopCounterMode

    ref = next(iter(model.parameters()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    x = torch.zeros(tuple(int(d) for d in input_shape), dtype=dtype, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
