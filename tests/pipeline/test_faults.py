"""Bad input and faults through the real CLI: one `error: ` line naming the problem and the fix, a non-zero
exit, no traceback, and no stage record created or changed (a failed stage never looks finished).

Cheap commands (config errors, `bundle verify`, `status`) run as subprocesses; commands that need torch run
in-process through click's CliRunner to stay fast. One finished tiny run is shared and copied per case.
Everything runs single-threaded (``ONE_THREAD``): on a busy 2-core machine OpenMP threads that wait for each
other make tiny training steps several times slower, and the results do not depend on it. Bundle/engine faults are in
test_faults_bundle.py, integrity and safe loading in test_faults_integrity.py (both share these helpers).
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "250"}
BASE_STAGES = ("data", "teacher", "baseline", "distill", "merge", "verify", "export", "bundle")
_BASE: dict[str, Path] = {}


# ----------------------------------------------------------------------------- running the CLI
@dataclass
class Res:
    code: int
    out: str
    err: str


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> Res:
    """``python -m pipeline.cli ARGS`` in a subprocess, from the repository root."""
    full_env = {**os.environ, **ONE_THREAD, **(env or {})}
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=full_env, capture_output=True,
                       text=True, timeout=timeout)
    return Res(p.returncode, p.stdout, p.stderr)


def invoke(*args: str) -> Res:
    """The same CLI in this process (torch is imported once); any exception but SystemExit is a bug."""
    import signal

    from click.testing import CliRunner

    from pipeline.cli import main

    saved = signal.getsignal(signal.SIGTERM), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = CliRunner().invoke(main, list(args))
    finally:
        signal.signal(signal.SIGTERM, saved[0])
        torch.set_num_threads(saved[1])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        raise AssertionError("CLI crashed (a traceback, not a one-line error):\n"
                             + "".join(traceback.format_exception(r.exception)))
    return Res(r.exit_code, r.stdout, r.stderr)


def with_sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def records(run_dir: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in Path(run_dir).glob("*/record.json")}


def failed_cleanly(res: Res, *needles: str, run_dir: Path | None = None, before: dict | None = None,
                   code: int | None = None) -> str:
    """The contract of every user error; returns the error line."""
    assert "Traceback" not in res.out + res.err, res.out + res.err
    assert res.code != 0 and (code is None or res.code == code), (res.code, res.err)
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.err
    for needle in needles:
        assert re.search(needle, errors[0]), f"{needle!r} not in {errors[0]!r}"
    if run_dir is not None:
        assert records(run_dir) == (before or {}), "a failed command created or changed a stage record"
        assert not list(Path(run_dir).glob(".*.work/record.json")), "a work folder looks finished"
    return errors[0]


# ----------------------------------------------------------------------------- the shared tiny run
def tiny_config(path: Path, data_root: Path) -> Path:
    """Overrides for a run that trains in seconds: 64 train / 64 val images, one epoch, resnet8 <- resnet8."""
    path.write_text(f"""\
data: {{root: {data_root}, train_limit: 64, val_limit: 64, eval_batch_size: 64}}
teacher: {{model: resnet8, epochs: 1, batch_size: 32}}
student: {{model: resnet8}}
baseline: {{epochs: 1, batch_size: 32}}
distill: {{n: 2, epochs: 1, batch_size: 32}}
verify: {{fp64_samples: 16}}
export: {{parity_samples: 32, max_batch: 64}}
bundle: {{fp16_onnx: false}}
""")
    return path


def base_run(tmp_path_factory, data_root: Path) -> Path:
    """data .. bundle finished once per session (engine/benchmark left out); copy it, never modify it."""
    if "run" not in _BASE:
        from pipeline.config import load_config
        from pipeline.runner import Runner

        top = tmp_path_factory.mktemp("faults_base")
        cfg_path = tiny_config(top / "tiny.yaml", data_root)
        runner, threads = Runner(load_config(cfg_path), top / "run", log=lambda m: None), torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for stage in BASE_STAGES:
                assert runner.run_stage(stage).status == "done", stage
        finally:
            torch.set_num_threads(threads)
        _BASE.update(run=top / "run", config=cfg_path)
    return _BASE["run"]


@pytest.fixture
def run_copy(tmp_path_factory, tiny_data_root, tmp_path):
    """(copy of the finished run, its config file, its records before the case)."""
    dst = tmp_path / "run"
    shutil.copytree(base_run(tmp_path_factory, tiny_data_root), dst)
    return dst, str(_BASE["config"]), records(dst)


# ----------------------------------------------------------------------------- config and command line
@pytest.mark.parametrize("yaml_text, sets, needles", [
    ("distill: [1, 2\n", [], [r"invalid YAML in .*bad\.yaml at line \d+"]),
    ("distill:\n  epochz: 3\n", [], [r"distill\.epochz: unknown key", r"config --defaults"]),
    (None, ["distill.epochs=many"], [r"distill\.epochs: Input should be a valid integer"]),
    (None, ["distill.n=0"], [r"distill\.n: Input should be greater than or equal to 1"]),
    (None, ["distill.epochs"], [r"--set 'distill\.epochs': expected section\.key=value, e\.g\. --set distill\.epochs=3"]),
    ("missing", [], [r"config file not found: .*missing\.yaml \(pass -c with an existing YAML file\)"]),
], ids=["invalid-yaml", "unknown-key", "wrong-type", "n-below-1", "malformed-set", "config-not-found"])
def test_config_errors(tmp_path, yaml_text, sets, needles):
    args = ["run", "--run-dir", str(tmp_path / "run")]
    if yaml_text == "missing":
        args += ["-c", str(tmp_path / "missing.yaml")]
    elif yaml_text is not None:
        (tmp_path / "bad.yaml").write_text(yaml_text)
        args += ["-c", str(tmp_path / "bad.yaml")]
    failed_cleanly(run_cli(*args, *with_sets(*sets)), *needles, code=2)
    assert not (tmp_path / "run").exists(), "a config error must not touch the run directory"


@pytest.mark.parametrize("args, needles", [
    (["run", "--from", "export", "--to", "data"], [r"--from export comes after --to data in the stage order: data, "]),
    (["run", "--to", "bogus"], [r"unknown stage 'bogus'; stages are: data, teacher, "]),
], ids=["from-after-to", "unknown-stage-run"])
def test_bad_stage_slice_touches_nothing(tmp_path, args, needles):
    failed_cleanly(run_cli(*args, "--run-dir", str(tmp_path / "run")), *needles, code=2)
    assert not (tmp_path / "run").exists()


def test_unknown_stage_name(tmp_path):
    failed_cleanly(invoke("stage", "bogus", "--run-dir", str(tmp_path / "run")), r"unknown stage 'bogus'; stages are: ")
    assert not (tmp_path / "run").exists()


def test_run_dir_not_writable(tmp_path):
    """A path below a regular file cannot be created, even by root (chmod would not stop root in CI)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    target = blocker / "run"
    failed_cleanly(run_cli("run", "--run-dir", str(target)), rf"run directory {re.escape(str(target))} is not writable",
                   r"pass --run-dir to a writable folder", code=2)
    assert blocker.read_text() == "not a folder"


def test_stage_without_its_inputs_names_the_stage_to_run(tmp_path, tiny_data_root):
    rd = tmp_path / "empty"
    cfg = tiny_config(tmp_path / "tiny.yaml", tiny_data_root)
    failed_cleanly(invoke("stage", "distill", "-c", str(cfg), "--run-dir", str(rd)),
                   r"stage 'distill' needs stage 'data', which has not run", r"run `norm-pipeline stage data`", run_dir=rd)


# ----------------------------------------------------------------------------- models and checkpoints
def _evil(marker: Path):
    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # would create ``marker`` if it were ever unpickled

    return Evil()


@pytest.mark.parametrize("case", ["unknown-teacher", "unknown-student", "other-architecture", "truncated", "text-file",
                                  "code-in-pickle"])
def test_bad_models_and_checkpoints(run_copy, tmp_path, case):
    rd, cfg, before = run_copy
    from models.registry import create_model

    ckpt, marker = tmp_path / "teacher.pth", tmp_path / "PWNED"
    stage, sets, needles = "teacher", [f"teacher.checkpoint={ckpt}"], [re.escape(str(ckpt))]
    if case == "unknown-teacher":
        sets, needles = ["teacher.model=resnet999"], [r"teacher\.model: unknown model 'resnet999'; known models: .*resnet8"]
    elif case == "unknown-student":
        stage, sets, needles = "distill", ["student.model=resnet999"], [r"student\.model: unknown model 'resnet999'"]
    elif case == "other-architecture":
        torch.save(create_model("resnet14", num_classes=10, in_chans=1).state_dict(), ckpt)
        needles += [r"does not fit teacher\.model='resnet8'", r"set teacher\.model to the architecture it was trained with"]
    elif case == "truncated":
        torch.save(create_model("resnet8", num_classes=10, in_chans=1).state_dict(), ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
        needles += [r"is not a readable PyTorch checkpoint", r"point to a state_dict saved with torch\.save"]
    elif case == "text-file":
        ckpt.write_text("epochs: 240\nlr: 0.05\n")
        needles += [r"is not a readable PyTorch checkpoint", r"point to a state_dict saved with torch\.save"]
    else:
        torch.save({"model": _evil(marker)}, ckpt)
        needles += [r"was refused: it holds Python objects or code", r"point to a state_dict"]
    failed_cleanly(invoke("stage", stage, "-c", cfg, "--run-dir", str(rd), *with_sets(*sets)),
                   *needles, run_dir=rd, before=before)
    assert not marker.exists(), "code inside a checkpoint was executed"


def test_corrupt_resume_checkpoint(run_copy):
    """A damaged ckpt/last.pt in the stage's work folder: say so and how to start over, do not crash."""
    rd, cfg, before = run_copy
    from pipeline import graph
    from pipeline.config import load_config
    from pipeline.runner import Runner

    sets = ["distill.epochs=3"]
    fp = Runner(load_config(cfg, sets), rd).current_fingerprint(graph.get("distill"))
    work = rd / ".distill.work"
    (work / "ckpt").mkdir(parents=True)
    (work / ".fingerprint").write_text(fp)
    (work / "ckpt" / "last.pt").write_bytes((rd / "distill" / "norm_student.pt").read_bytes()[:4096])
    failed_cleanly(invoke("stage", "distill", "-c", cfg, "--run-dir", str(rd), "--set", sets[0]),
                   r"training checkpoint .*last\.pt is not a readable", r"delete it, or run with --force",
                   run_dir=rd, before=before)


def test_upstream_artifact_changed_after_its_record(run_copy):
    rd, cfg, before = run_copy
    path = rd / "teacher" / "model.pt"
    path.write_bytes(path.read_bytes()[:-100])
    failed_cleanly(invoke("stage", "distill", "-c", cfg, "--run-dir", str(rd), "--set", "distill.epochs=2"),
                   r"reads teacher/model\.pt, which no longer matches the record", r"`norm-pipeline stage teacher`",
                   run_dir=rd, before=before)


# ----------------------------------------------------------------------------- datasets
def _image_folder(root: Path, train: dict[str, int], val: dict[str, int]) -> Path:
    from PIL import Image

    for split, classes in (("train", train), ("val", val)):
        for name, n in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.parametrize("case", ["missing-root", "bad-magic", "truncated-idx", "truncated-gzip", "empty-class",
                                  "class-mismatch"])
def test_bad_datasets(tmp_path, tiny_data_root, case):
    data = tmp_path / "data"
    sets = [f"data.root={data}"]
    if case in ("bad-magic", "truncated-idx", "truncated-gzip"):
        shutil.copytree(tiny_data_root, data)
        images = data / "train-images-idx3-ubyte.gz"
        raw = gzip.decompress(images.read_bytes())
        if case == "bad-magic":
            images.write_bytes(gzip.compress(b"\x12\x34" + raw[2:]))
            needles = [r"corrupt IDX file .*train-images.*bad magic number", r"reinstall the dataset"]
        elif case == "truncated-idx":
            images.write_bytes(gzip.compress(raw[: len(raw) // 2]))
            needles = [r"corrupt IDX file .*data bytes, expected", r"reinstall the dataset"]
        else:
            images.write_bytes(images.read_bytes()[:200])
            needles = [r"corrupt IDX file .*train-images", r"reinstall"]
    elif case == "missing-root":
        needles = [rf"dataset root {re.escape(str(data))} does not exist", r"or set data\.root"]
    else:
        val = {"a": 2, "b": 0} if case == "empty-class" else {"a": 2, "c": 2}
        _image_folder(data, {"a": 2, "b": 2 if case == "class-mismatch" else 0}, val)
        sets += ["data.dataset=imagefolder", "data.image_size=8"]
        needles = ([r"class folder .*train/b is empty; remove it or add images"] if case == "empty-class" else
                   [r"train/val class folders differ .*only in train \['b'\], only in val \['c'\]",
                    r"give train/ and val/ the same class folders"])
    rd = tmp_path / "run"
    failed_cleanly(invoke("stage", "data", "--run-dir", str(rd), *with_sets(*sets)),
                   *needles, run_dir=rd)


def test_unreadable_image_in_image_folder(tmp_path):
    """Found while training (checking every image up front would cost an ImageNet-sized scan): name the file."""
    data, rd = _image_folder(tmp_path / "data", {"a": 3, "b": 3}, {"a": 2, "b": 2}), tmp_path / "run"
    (data / "train" / "a" / "broken.png").write_text("not an image")
    sets = with_sets(f"data.root={data}", "data.dataset=imagefolder", "data.image_size=8", "teacher.model=resnet8",
                     "teacher.epochs=1", "teacher.batch_size=4")
    assert invoke("stage", "data", "--run-dir", str(rd), *sets).code == 0
    failed_cleanly(invoke("stage", "teacher", "--run-dir", str(rd), *sets),
                   r"cannot read an image of the dataset: .*train/a/broken\.png", r"remove or replace that file",
                   run_dir=rd, before=records(rd))


# ----------------------------------------------------------------------------- training, verify, export
@pytest.mark.parametrize("batch", [32, 64], ids=["loss-check", "last-step-check"])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(run_copy, batch):
    """NORM weight 0 in epoch 1, then 1e30: epoch 2 diverges. With one step per epoch (batch 64) the loss of
    that step is still finite; the weights it leaves are not, and must not be saved either."""
    rd, cfg, before = run_copy
    sets = ["distill.epochs=2", "distill.alpha=1e30", "distill.norm_schedule=[[0.5, 0.0], [1.0, 1.0]]",
            f"distill.batch_size={batch}"]
    failed_cleanly(invoke("stage", "distill", "-c", cfg, "--run-dir", str(rd), *with_sets(*sets)),
                   r"became (nan|inf|-inf)\b.* in epoch 2;", r"the last good checkpoint \(epoch 1\) is kept in .*last\.pt",
                   r"lower the learning rate", run_dir=rd, before=before)
    state = torch.load(rd / ".distill.work" / "ckpt" / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_verify_tolerance_exceeded_stops_before_export(run_copy):
    rd, cfg, before = run_copy
    failed_cleanly(invoke("run", "-c", cfg, "--run-dir", str(rd), "--from", "verify", "--to", "export",
                          "--set", "verify.fp32_rel_tol=1e-30"),
                   r"verify failed: fp32_max_rel_diff=\S+ exceeds verify\.fp32_rel_tol=1\.0e-30",
                   r"loosen the verify\.\* tolerance", run_dir=rd, before=before)
    assert json.loads((rd / ".verify.work" / "verify.json").read_text())["passed"] is False
    assert not (rd / ".export.work").exists(), "export ran after a failed verify"


def _reuse_base_onnx(monkeypatch):
    """The exporter is deterministic and slow: hand back the base run's files for the same models."""
    from pipeline.graph import stage_module
    from stages.lib import onnx_utils

    def reuse(model, path, *, kind, **_):
        shutil.copyfile(_BASE["run"] / "export" / stage_module("export").FILES[kind], path)
        return {"exporter": "dynamo", "dynamo_error": None}

    monkeypatch.setattr(onnx_utils, "export_onnx", reuse)


def test_onnx_parity_tolerance_exceeded(run_copy, monkeypatch):
    rd, cfg, before = run_copy
    assert json.loads(before["export"])["metrics"]["ort_max_abs_diff"] > 0  # else a zero tolerance could pass
    _reuse_base_onnx(monkeypatch)
    failed_cleanly(invoke("stage", "export", "-c", cfg, "--run-dir", str(rd), "--set", "export.atol=0",
                          "--set", "export.rtol=0"),
                   r"onnxruntime output differs from PyTorch beyond export\.atol=0\.0/export\.rtol=0\.0",
                   r"loosen export\.atol/export\.rtol", run_dir=rd, before=before)


class _Zeta(torch.nn.Module):
    """aten::special_zeta has no ONNX translation in either exporter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.zeta(x.flatten(1)[:, :10].abs() + 2, torch.ones(1))


def test_unexportable_model(run_copy, monkeypatch):
    rd, cfg, before = run_copy
    from pipeline.graph import stage_module

    export_stage = stage_module("export")

    real = export_stage.load_models
    monkeypatch.setattr(export_stage, "load_models",
                        lambda ctx: {k: ({**v, "model": _Zeta()} if k == "merged" else v) for k, v in real(ctx).items()})
    failed_cleanly(invoke("stage", "export", "-c", cfg, "--run-dir", str(rd), "--force"),
                   r"ONNX export of merged failed: .*zeta", r"replace the unsupported operation", run_dir=rd, before=before)
    assert [p.name for p in (rd / ".export.work").iterdir()] == [".fingerprint"], "a half-written export was left"
