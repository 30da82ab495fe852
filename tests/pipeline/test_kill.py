"""Interruption of real `norm-pipeline` processes: SIGINT and SIGTERM (exit 130 with a resume hint), kill -9
(no chance to clean up), and a second run on a locked run directory. After each, running the same command
again keeps every finished stage cached, resumes training from its last finished epoch, and leaves nothing
half-written in a stage folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from pipeline.rundir import RunDir, is_partial
from tests.pipeline.test_faults import (  # noqa: F401
    ONE_THREAD,
    ROOT,
    Res,
    _reuse_base_onnx,
    failed_cleanly,
    invoke,
    records,
    run_cli,
    run_copy,
)

EPOCHS = 3  # the interrupted distill run; the base run trained 1 epoch, so this is a new configuration
HINT = "interrupted: finished stages and epochs are kept; run the same command again to resume"


class Launched:
    """A CLI process in the background, its output in files (no pipe can fill up and stall it)."""

    def __init__(self, args: list[str], folder: Path, name: str):
        self.out, self.err = folder / f"{name}.out", folder / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, stdout=out,
                                         stderr=err, env={**os.environ, **ONE_THREAD})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for(self, ready: Callable[[], bool], what: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"exited ({self.proc.returncode}) before {what}:\n{self.err.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.02)

    def finish(self, timeout: float = 120) -> Res:
        self.proc.wait(timeout=timeout)
        return Res(self.proc.returncode, self.out.read_text(), self.err.read_text())


@contextlib.contextmanager
def launch(args: list[str], folder: Path, name: str) -> Iterator[Launched]:
    p = Launched(args, folder, name)
    try:
        yield p
    finally:
        if p.proc.poll() is None:  # a failed assertion must not leave our process behind
            p.proc.kill()
            p.proc.wait()


def _exists(path: Path) -> Callable[[], bool]:
    return lambda: path.is_file()


def _epochs_done(last: Path) -> int:
    return int(torch.load(last, map_location="cpu", weights_only=True)["epoch"]) + 1


def interrupted(res: Res) -> None:
    assert res.code == 130, (res.code, res.err[-2000:])
    assert HINT in res.err and "Traceback" not in res.out + res.err, res.err[-2000:]


def resumed_and_finished(rd: Path, res: Res, done: int) -> None:
    """The rerun picked up after epoch ``done`` and wrote each epoch's history exactly once."""
    assert res.code == 0 and "Traceback" not in res.out + res.err, res.err[-3000:]
    assert f"resuming after epoch {done}/{EPOCHS}" in res.out, res.out[-3000:]
    rows = (rd / "distill" / "history.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == [str(e) for e in range(1, EPOCHS + 1)]
    rec = json.loads((rd / "distill" / "record.json").read_text())
    assert rec["status"] == "done" and rec["metrics"]["epochs"] == EPOCHS
    assert not (rd / ".distill.work").exists() and not (rd / "distill" / "ckpt").exists()


def test_sigint_during_training_then_resume(run_copy, tmp_path):
    rd, cfg, before = run_copy
    args = ["stage", "distill", "-c", cfg, "--run-dir", str(rd), "--set", f"distill.epochs={EPOCHS}"]
    last = rd / ".distill.work" / "ckpt" / "last.pt"
    with launch(args, tmp_path, "first") as p:
        p.wait_for(_exists(last), "the first finished epoch")
        p.proc.send_signal(signal.SIGINT)
        interrupted(p.finish())
    assert records(rd) == before, "the interrupted stage replaced the finished distill folder"
    done = _epochs_done(last)
    assert 1 <= done < EPOCHS
    resumed_and_finished(rd, run_cli(*args), done)


def test_locked_run_dir_names_the_holder_then_sigterm_and_resume(run_copy, tmp_path):
    rd, cfg, before = run_copy
    args = ["run", "--to", "distill", "-c", cfg, "--run-dir", str(rd), "--set", f"distill.epochs={EPOCHS}"]
    last, lock = rd / ".distill.work" / "ckpt" / "last.pt", rd / ".lock"
    with launch(args, tmp_path, "holder") as p:
        p.wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(p.pid), "the lock")
        second = run_cli("run", "--to", "data", "-c", cfg, "--run-dir", str(rd))
        failed_cleanly(second, rf"run directory .* is in use by another norm-pipeline process \(pid {p.pid}\)",
                       r"wait for it to finish or use another --run-dir", code=2)
        p.wait_for(_exists(last), "the first finished epoch")
        p.proc.send_signal(signal.SIGTERM)
        interrupted(p.finish())
    assert records(rd) == before
    done = _epochs_done(last)
    res = run_cli(*args)
    resumed_and_finished(rd, res, done)
    for stage in ("data", "teacher", "baseline"):
        assert f"{stage}: skipped (cached)" in res.out
    after = records(rd)
    assert {s: after[s] for s in ("data", "teacher", "baseline")} == {s: before[s] for s in ("data", "teacher", "baseline")}


def test_kill9_during_training_then_run_again(run_copy, tmp_path):
    rd, cfg, before = run_copy
    sets = ["--set", f"distill.epochs={EPOCHS}"]
    args = ["run", "--to", "merge", "-c", cfg, "--run-dir", str(rd), *sets]
    last = rd / ".distill.work" / "ckpt" / "last.pt"
    with launch(args, tmp_path, "killed") as p:
        p.wait_for(_exists(last), "the first finished epoch")
        p.proc.kill()
        assert p.finish().code == -signal.SIGKILL
        dead = p.pid
    assert records(rd) == before and (rd / ".lock").read_text().strip() == str(dead)  # a stale lock file
    done = _epochs_done(last)
    res = run_cli(*args)  # the dead holder's lock does not block: flock died with it
    resumed_and_finished(rd, res, done)
    after = records(rd)
    for stage in ("data", "teacher", "baseline"):
        assert f"{stage}: skipped (cached)" in res.out and after[stage] == before[stage]
    assert "merge: done" in res.out and after["merge"] != before["merge"]
    from pipeline import graph
    from pipeline.config import load_config
    from pipeline.runner import Runner

    runner = Runner(load_config(cfg, [sets[1]]), rd)
    for stage in ("data", "teacher", "baseline", "distill", "merge"):
        assert runner.state(graph.get(stage)) == "done" and not runner.rd.modified_files(stage), stage
    assert not [q for q in rd.rglob("*") if is_partial(q)], "temp files left behind"


def test_kill9_during_export_keeps_the_previous_export(run_copy, tmp_path, monkeypatch):
    rd, cfg, before = run_copy
    args = ["stage", "export", "-c", cfg, "--run-dir", str(rd), "--set", "export.parity_samples=16"]
    work = rd / ".export.work"

    def writing() -> bool:
        return work.is_dir() and any(q.name != ".fingerprint" for q in work.iterdir())

    with launch(args, tmp_path, "export") as p:
        p.wait_for(writing, "the first ONNX file")
        p.proc.kill()
        assert p.finish().code == -signal.SIGKILL
    assert records(rd) == before and not RunDir(rd).modified_files("export"), "the finished export was touched"
    assert not (work / "record.json").exists()
    # a kill inside an atomic write leaves its temp file; on a tiny model that window is a few milliseconds,
    # so put there what such a kill leaves: the rerun must not ship it
    (work / f".vanilla.{p.pid}.tmp.onnx").write_bytes(b"the first half of an ONNX file")
    leftovers = [q.name for q in work.iterdir() if is_partial(q)]
    _reuse_base_onnx(monkeypatch)  # the rerun: the exporter's output is the same files, taken from the base run
    res = invoke(*args)
    assert res.code == 0, res.err[-3000:]
    rec = json.loads((rd / "export" / "record.json").read_text())
    assert rec["status"] == "done" and {"model.onnx", "export.json"} <= set(rec["outputs"])
    assert not [n for n in rec["outputs"] if is_partial(Path(n))], rec["outputs"]
    assert not [q for q in (rd / "export").iterdir() if is_partial(q) or q.name in leftovers]
    assert records(rd)["export"] != before["export"] and not RunDir(rd).modified_files("export")
