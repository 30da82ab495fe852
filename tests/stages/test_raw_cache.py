"""The decoded dataset is read once per process and reused while its files' contents are unchanged."""
from __future__ import annotations

import gzip
import os

import torch

from stages.lib import datasets as ds
from tests.conftest import make_fashion_like


def test_second_load_reuses_the_decoded_tensors_exactly(tmp_path):
    root = make_fashion_like(tmp_path / "fm", n_train=64, n_val=32)
    first = ds.load_raw("fashion_mnist", root)
    again = ds.load_raw("fashion_mnist", root)
    assert again["train"][0] is first["train"][0]  # not decoded a second time
    fresh = ds.load_fashion_mnist(root)
    for split in ("train", "val"):
        assert torch.equal(again[split][0], fresh[split][0]) and torch.equal(again[split][1], fresh[split][1])


def test_a_file_rewritten_in_place_is_read_again(tmp_path):
    root = make_fashion_like(tmp_path / "fm", n_train=64, n_val=32)
    for gz in root.glob("*.gz"):  # plain IDX files, so a rewrite can keep the exact size
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    before = ds.load_raw("fashion_mnist", root)
    path = root / "t10k-labels-idx1-ubyte"
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[8:] = bytes((b + 1) % 10 for b in raw[8:])  # other labels, same size
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime
    after = ds.load_raw("fashion_mnist", root)
    assert torch.equal(after["val"][1], (before["val"][1] + 1) % 10)
