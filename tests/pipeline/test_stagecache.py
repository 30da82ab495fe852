"""The stage cache: a finished stage is shared between run directories by fingerprint, never in a damaged state."""
from __future__ import annotations

import json
import os

from pipeline import graph
from pipeline.config import load_config
from pipeline.rundir import RunDir
from pipeline.runner import Runner
from pipeline.stagecache import StageCache, run_shared
from stages.lib.io import atomic_write_text, sha256_file


def _run(cfg, path, names, cache):
    runner = Runner(cfg, path, log=lambda m: None)
    return {r.name: r.status for r in run_shared(runner, names, cache, run_one=runner.run_stage)}, runner


def _rec(path, stage):
    return json.loads((path / stage / "record.json").read_text())


def test_a_second_run_directory_restores_instead_of_training(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    cache = StageCache(tmp_path / "cache")
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(cfg, a, ["data", "teacher"], cache)[0] == {"data": "done", "teacher": "done"}
    statuses, rb = _run(cfg, b, ["data", "teacher"], cache)
    assert statuses == {"data": "restored", "teacher": "restored"}
    for stage in ("data", "teacher"):
        ra, rbb = _rec(a, stage), _rec(b, stage)
        assert ra["outputs"] == rbb["outputs"] and ra["fingerprint"] == rbb["fingerprint"]
        assert "restored" not in ra and rbb["restored"] and rbb["origin"] == str(a)
    assert os.stat(a / "teacher" / "model.pt").st_ino == os.stat(b / "teacher" / "model.pt").st_ino  # a link, not a copy
    assert rb.state(graph.get("teacher")) == "done" and RunDir(b).modified_files("teacher") == []
    # another teacher config: its own fingerprint, trained; the data stage is still shared
    cfg2 = load_config(None, tiny_overrides + ["teacher.lr=0.02"])
    assert _run(cfg2, tmp_path / "c", ["data", "teacher"], cache)[0] == {"data": "restored", "teacher": "done"}
    # nothing to do the second time
    assert _run(cfg, b, ["data", "teacher"], cache)[0] == {"data": "cached", "teacher": "cached"}


def test_an_entry_damaged_through_a_link_is_dropped_and_the_stage_runs(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    cache = StageCache(tmp_path / "cache")
    a, b = tmp_path / "a", tmp_path / "b"
    _run(cfg, a, ["data"], cache)
    fp = _rec(a, "data")["fingerprint"]
    with open(a / "data" / "dataset.json", "a") as f:  # an in-place edit reaches the entry through the hard link
        f.write(" ")
    assert _run(cfg, b, ["data"], cache)[0] == {"data": "done"}
    assert "restored" not in _rec(b, "data")
    entry = cache.record(fp)  # replaced by b's good copy
    assert entry["outputs"] == _rec(b, "data")["outputs"] and entry["origin"] == str(b)


def test_a_tampered_copy_is_repaired_from_the_cache(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    cache = StageCache(tmp_path / "cache")
    a, b = tmp_path / "a", tmp_path / "b"
    _run(cfg, a, ["data"], cache)
    _run(cfg, b, ["data"], cache)
    good = sha256_file(a / "data" / "dataset.json")
    atomic_write_text(b / "data" / "dataset.json", "{}")  # a new file in b only: the entry is intact
    assert RunDir(b).modified_files("data") == ["dataset.json"]
    assert _run(cfg, b, ["data"], cache)[0] == {"data": "restored"}
    assert sha256_file(b / "data" / "dataset.json") == good and RunDir(b).modified_files("data") == []
