from __future__ import annotations

import pytest


@pytest.fixture
def tiny_overrides(tiny_data_root):
    """A training setup that runs in seconds on the tiny generated dataset."""
    common = ["epochs=1", "batch_size=64", "lr=0.05"]
    return ([f"data.root={tiny_data_root}", "teacher.model=resnet8", "student.model=resnet8", "distill.n=2",
             "data.eval_batch_size=64"]
            + [f"{s}.{c}" for s in ("teacher", "baseline", "distill") for c in common])
