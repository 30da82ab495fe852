"""A cache you can trust: a stage's fingerprint is exactly the config and code it reads, one plan decides.

One tiny run (data .. bundle, engine skipped without TensorRT) is made once per module and copied per test.
Code edits are made in a copy of the project's source (``pipeline.codehash.CODE_ROOT`` points at it), so
the tests never touch the real files; an unedited copy hashes like the original (relative paths + bytes).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pipeline import codehash, graph
from pipeline.config import load_config
from pipeline.runner import Runner

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("data", "teacher", "baseline", "distill", "merge", "verify", "export", "engine", "bundle")
BEFORE_ENGINE = ("data", "teacher", "baseline", "distill", "merge", "verify", "export")
TINY = ["data.train_limit=64", "data.val_limit=64", "data.eval_batch_size=64", "teacher.model=resnet8",
        "student.model=resnet8", "distill.n=2", "verify.fp64_samples=16", "export.parity_samples=32",
        "export.max_batch=64", "engine.max_batch=64", "bundle.fp16_onnx=false",
        *[f"{s}.{k}" for s in ("teacher", "baseline", "distill") for k in ("epochs=1", "batch_size=32")]]
_BASE: dict[str, Path] = {}


def _cfg(data_root: Path, *extra: str):
    return load_config(None, [f"data.root={data_root}", *TINY, *extra])


def _run(cfg, run_dir: Path, stages=STAGES) -> dict[str, str]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner = Runner(cfg, run_dir, log=lambda m: None)
        return {s: runner.run_stage(s).status for s in stages}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def run_copy(tmp_path_factory, tiny_data_root, tmp_path) -> Path:
    """A copy of the finished tiny run (made once per module with the real source tree)."""
    if "run" not in _BASE:
        base = tmp_path_factory.mktemp("cache_base") / "run"
        assert set(_run(_cfg(tiny_data_root), base).values()) <= {"done", "skipped"}
        _BASE["run"] = base
    dst = tmp_path / "run"
    shutil.copytree(_BASE["run"], dst)
    return dst


@pytest.fixture
def code_copy(tmp_path, monkeypatch) -> Path:
    """A copy of models/, stages/, pipeline/ that the fingerprints read instead of the real source."""
    dst = tmp_path / "src"
    for pkg in codehash.PACKAGES:
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    monkeypatch.setattr(codehash, "CODE_ROOT", dst)
    return dst


def _edit(path: Path) -> None:
    path.write_text(path.read_text() + "\n# an edit that changes the file's bytes\n")


def _reaching(index: codehash.CodeIndex, rel: str) -> set[str]:
    target = index.root / rel
    return {s for s in STAGES if target in index.files(graph.get(s).module, graph.get(s).data_files)}


# ----------------------------------------------------------------------------- code in the fingerprint
def test_closure_follows_lazy_and_relative_imports_and_stays_in_the_project(tmp_path, monkeypatch):
    pkg = tmp_path / "stages"
    (pkg / "lib").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "lib" / "__init__.py").write_text("")
    (pkg / "one.py").write_text("import numpy\nfrom .lib import helper\n\ndef run(ctx):\n    from stages.lib.lazy import x\n")
    (pkg / "lib" / "helper.py").write_text("from . import deep\n")
    (pkg / "lib" / "deep.py").write_text("import importlib\nM = importlib.import_module('stages.lib.dyn')\n")
    for name in ("lazy", "dyn", "unused"):
        (pkg / "lib" / f"{name}.py").write_text("x = 1\n")
    index = codehash.CodeIndex(tmp_path)
    got = set(index.relative(index.closure("stages.one")))
    assert got == {"stages/__init__.py", "stages/one.py", "stages/lib/__init__.py", "stages/lib/helper.py",
                   "stages/lib/deep.py", "stages/lib/lazy.py", "stages/lib/dyn.py"}
    # what parsing found is kept by content: the next invocation parses only files that changed
    again = codehash.CodeIndex(tmp_path, parsed=dict(index.parsed))
    monkeypatch.setattr(codehash.CodeIndex, "_parse", staticmethod(lambda *a: pytest.fail("parsed again")))
    assert again.code_hash("stages.one") == index.code_hash("stages.one")
    (pkg / "lib" / "helper.py").write_text("from . import deep\nfrom . import unused\n")
    monkeypatch.undo()
    edited = codehash.CodeIndex(tmp_path, parsed=dict(index.parsed))
    assert "stages/lib/unused.py" in edited.relative(edited.closure("stages.one"))
    assert edited.code_hash("stages.one") != index.code_hash("stages.one")


def test_each_stage_hashes_the_code_it_runs():
    index = codehash.CodeIndex(ROOT)
    files = {s.name: set(index.relative(index.files(s.module, s.data_files))) for s in graph.STAGES}
    assert "stages/lib/trt_build.py" in files["engine"] and "stages/lib/trt_build.py" not in files["teacher"]
    assert "stages/lib/verify_checks.py" in files["verify"], "verify imports stages.lib.verify_checks: its fingerprint must cover it"
    assert "stages/merge.py" not in files["verify"], "a stage module is imported by the runner only"
    assert "stages/bundle_files/README.md.tmpl" in files["bundle"]
    assert not any(f.startswith("stages/bundle_files/") for s in STAGES if s != "bundle" for f in files[s])
    assert "models/merge.py" in files["merge"] and "models/merge.py" not in files["teacher"]
    assert not any("pipeline/graph.py" in f for f in files.values()), "editing the graph must not re-run every stage"


def test_editing_code_only_the_engine_reaches_keeps_the_rest_cached(run_copy, code_copy, tiny_data_root):
    index = codehash.CodeIndex(code_copy)
    assert not _reaching(index, "stages/lib/trt_build.py") & set(BEFORE_ENGINE)
    _edit(code_copy / "stages" / "lib" / "trt_build.py")
    got = _run(_cfg(tiny_data_root), run_copy)
    assert {s: got[s] for s in BEFORE_ENGINE} == {s: "cached" for s in BEFORE_ENGINE}
    assert got["engine"] != "cached" and got["bundle"] == "done", got


def test_editing_the_checks_merge_and_verify_share_reruns_both(run_copy, code_copy, tiny_data_root):
    """stages/lib/verify_checks.py is imported by both stages (no stage imports another stage's module)."""
    _edit(code_copy / "stages" / "lib" / "verify_checks.py")
    got = _run(_cfg(tiny_data_root), run_copy)
    assert got["merge"] == "done" and got["verify"] == "done", got
    assert all(got[s] == "cached" for s in ("data", "teacher", "baseline", "distill")), got


@pytest.mark.parametrize("rel", ["models/merge.py", "stages/lib/flops.py"])
def test_editing_library_code_reruns_exactly_the_stages_that_reach_it(run_copy, code_copy, tiny_data_root, rel):
    """models/ and stages/lib/ are part of a stage's code: stages that reach the edited file re-run; stages that
    neither reach it nor sit downstream of one that does stay cached."""
    index = codehash.CodeIndex(code_copy)
    reach = _reaching(index, rel)
    affected = reach | {d for s in reach for d in graph.downstream(s)}
    assert "merge" in reach, "stages/merge.py imports both files"
    assert set(STAGES) - affected, f"{rel} should reach some stages, not all: {reach}"
    _edit(code_copy / rel)
    got = _run(_cfg(tiny_data_root), run_copy)
    assert {s for s in reach if got[s] == "cached"} == set(), got
    assert {s: got[s] for s in STAGES if s not in affected} == {s: "cached" for s in STAGES if s not in affected}


# ----------------------------------------------------------------------------- config in the fingerprint
def test_engine_profile_change_rebuilds_the_bundle_even_when_engine_is_skipped(run_copy, tiny_data_root):
    assert _run(_cfg(tiny_data_root), run_copy)["bundle"] == "cached"
    got = _run(_cfg(tiny_data_root, "engine.max_batch=48"), run_copy)
    assert got["bundle"] == "done" and all(got[s] == "cached" for s in BEFORE_ENGINE), got
    manifest = json.loads((run_copy / "bundle" / "bundle" / "manifest.json").read_text())
    assert "x".join(["48", "1", "28", "28"]) in manifest["trtexec"]["fp32"], manifest["trtexec"]["fp32"]


def test_undeclared_config_read_fails_with_stage_and_key(tiny_data_root, tmp_path):
    from stages.lib.config_view import ConfigAccessError
    from stages.lib.context import StageContext

    ctx = StageContext(name="teacher", out_dir=tmp_path, run_dir=tmp_path, cfg=_cfg(tiny_data_root))
    assert ctx.cfg.run.seed == 0 and ctx.cfg.teacher.epochs == 1 and ctx.cfg.data.eval_batch_size == 64
    with pytest.raises(ConfigAccessError, match=r"stage 'teacher' read config key 'distill'"):
        ctx.cfg.distill
    with pytest.raises(ConfigAccessError, match=r"stage 'teacher' read config key 'run\.name'"):
        ctx.cfg.run.name
    with pytest.raises(ConfigAccessError, match=r"stage 'teacher' read config key 'data\.root'"):
        ctx.cfg.data.root
    with pytest.raises(ConfigAccessError, match=r"tried to set config key 'teacher\.epochs'"):
        ctx.cfg.teacher.epochs = 5
    assert isinstance(ctx.cfg.teacher.milestones, tuple), "a list handed out would let the stage edit the config"
    bundle = StageContext(name="bundle", out_dir=tmp_path, run_dir=tmp_path, cfg=_cfg(tiny_data_root))
    assert bundle.cfg.engine.max_batch == 64
    assert bundle.cfg.engine.fp32_atol > 0  # the manifest's per-precision tolerances: bundle declares all of engine
    with pytest.raises(ConfigAccessError, match=r"stage 'bundle' read config key 'quantize\.blocks'"):
        bundle.cfg.quantize.blocks  # it declares quantize.max_drop alone


def test_a_stage_reading_undeclared_config_fails_in_the_runner(tmp_path, tiny_data_root, monkeypatch):
    """The wiring: the context the runner builds is the restricted view (here `data` declares nothing)."""
    import dataclasses

    from stages.lib.config_view import ConfigAccessError

    spec = dataclasses.replace(graph.BY_NAME["data"], config=("data.dataset",))
    monkeypatch.setitem(graph.BY_NAME, "data", spec)
    with pytest.raises(ConfigAccessError, match=r"stage 'data' read config key 'data\.root'"):
        Runner(_cfg(tiny_data_root), tmp_path / "run", log=lambda m: None).run_stage("data")


def test_teacher_pretrained_is_gone_with_a_clear_line():
    from stages.lib.errors import PipelineError

    with pytest.raises(PipelineError, match=r"teacher\.pretrained: removed: .*teacher\.checkpoint"):
        load_config(None, ["teacher.pretrained=true"])


# ----------------------------------------------------------------------------- one plan, tamper check everywhere
def _tamper(run_dir: Path) -> None:
    p = run_dir / "teacher" / "model.pt"
    p.write_bytes(p.read_bytes()[:-64])


def test_tampered_teacher_is_treated_alike_by_run_and_run_nproc(run_copy, tmp_path, tiny_data_root, monkeypatch):
    from pipeline import session

    cfg = _cfg(tiny_data_root)
    launched: list[str] = []
    real_run = subprocess.run

    def fake_torchrun(cmd, *a, **kw):  # the child `stage NAME` of `run --nproc`, run in this process
        if "pipeline.cli" not in cmd:
            return real_run(cmd, *a, **kw)
        name = cmd[cmd.index("stage") + 1]
        launched.append(name)
        Runner(cfg, Path(cmd[cmd.index("--run-dir") + 1]), log=lambda m: None).run_stage(name, standalone=True)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(session.subprocess, "run", fake_torchrun)
    other = tmp_path / "other"
    shutil.copytree(run_copy, other)
    assert [r.status for r in session.run_pipeline(cfg, other, to_stage="teacher", nproc=2)] == ["cached", "cached"]
    assert launched == [], "an intact cached stage must not be launched"
    _tamper(run_copy)
    _tamper(other)
    plain = {r.name: r.status for r in session.run_pipeline(cfg, run_copy, to_stage="teacher")}
    nproc = {r.name: r.status for r in session.run_pipeline(cfg, other, to_stage="teacher", nproc=2)}
    assert plain == nproc == {"data": "cached", "teacher": "done"}
    assert launched == ["teacher"]
    assert Runner(cfg, other).state(graph.get("teacher")) == "done"


def test_status_hashes_each_artifact_at_most_once_and_caches_across_calls(run_copy, tiny_data_root, monkeypatch):
    from collections import Counter

    import stages.lib.io as io
    from pipeline import hashcache
    from pipeline.session import print_status

    monkeypatch.setattr(hashcache, "RACY_NS", 200_000_000)  # files count as settled 0.2 s after their last change
    time.sleep(0.3)
    real, calls = io.sha256_file, Counter()

    def counting(path, *a, **k):
        calls[str(path)] += 1
        return real(path, *a, **k)

    monkeypatch.setattr(io, "sha256_file", counting)
    cfg = _cfg(tiny_data_root)
    assert print_status(cfg, run_copy) == []
    artifacts = {str(p) for p in run_copy.glob("*/**/*") if p.is_file() and p.name != "record.json"}
    assert artifacts and set(calls) == artifacts and max(calls.values()) == 1, calls.most_common(3)
    calls.clear()
    assert print_status(cfg, run_copy) == []
    assert not calls, f"an unchanged artifact was read again: {sorted(calls)[:3]}"
    model = run_copy / "teacher" / "model.pt"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # same size; the old modification time is restored, the change time cannot be
    st = model.stat()
    model.write_bytes(bytes(data))
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert print_status(cfg, run_copy) == ["teacher"]
    assert list(calls) == [str(model)]


def test_hash_cache_rereads_a_file_changed_right_after_it_was_hashed(tmp_path):
    from pipeline.hashcache import HashCache

    f = tmp_path / "a.bin"
    f.write_bytes(b"one")
    first = HashCache(tmp_path / ".hashes.json")
    h1 = first.sha256(f)
    first.save()
    f.write_bytes(b"two")  # same size, and maybe the same timestamp tick as the first write
    second = HashCache(tmp_path / ".hashes.json")
    assert second.sha256(f) != h1 and second.hashed == [str(f)]


# ----------------------------------------------------------------------------- `stage` refreshes the report
def test_stage_command_refreshes_report_and_summary(run_copy, tiny_data_root, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.config import dump_config

    for name in ("report.html", "summary.json"):
        (run_copy / name).unlink(missing_ok=True)
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(dump_config(_cfg(tiny_data_root)))
    res = CliRunner().invoke(main, ["stage", "merge", "--force", "-c", str(cfg_file), "--run-dir", str(run_copy)])
    assert res.exit_code == 0, res.output
    summary = json.loads((run_copy / "summary.json").read_text())
    record = json.loads((run_copy / "merge" / "record.json").read_text())
    assert summary["stages"]["merge"]["fingerprint"] == record["fingerprint"]
    assert (run_copy / "report.html").is_file()
