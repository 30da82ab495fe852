"""Named stage outputs: the runner checks them, ``ctx.artifact`` resolves them, ``list`` shows them."""
from __future__ import annotations

import dataclasses

import pytest

from pipeline import graph
from pipeline.config import load_config
from pipeline.runner import Runner
from stages.lib.context import StageContext
from stages.lib.errors import PipelineError


def _with_outputs(monkeypatch, name: str, extra: dict, when: dict | None = None) -> None:
    spec = graph.BY_NAME[name]
    new = dataclasses.replace(spec, outputs={**spec.outputs, **extra}, required_when={**spec.required_when, **(when or {})})
    monkeypatch.setitem(graph.BY_NAME, name, new)


def test_a_stage_that_forgets_an_output_fails_and_is_not_recorded(tmp_path, tiny_overrides, monkeypatch):
    _with_outputs(monkeypatch, "data", {"labels": "labels.json"})  # the data stage never writes labels.json
    runner = Runner(load_config(None, tiny_overrides), tmp_path, log=lambda m: None)
    with pytest.raises(PipelineError, match=r"^stage 'data' finished without writing its output 'labels' \(labels\.json\)"):
        runner.run_stage("data")
    assert runner.rd.record("data") is None and not (tmp_path / "data").exists()


def test_a_conditional_output_is_required_only_under_its_config(tmp_path, tiny_overrides, monkeypatch):
    _with_outputs(monkeypatch, "data", {"labels": "labels.json"}, {"labels": ("data.dataset", "cifar10")})
    runner = Runner(load_config(None, tiny_overrides), tmp_path, log=lambda m: None)
    assert runner.run_stage("data").status == "done"  # fashion_mnist: labels.json is not expected
    assert (tmp_path / "data" / "dataset.json").is_file()


def test_required_outputs_follow_the_config():
    base, bundle = graph.get("baseline"), graph.get("bundle")
    assert base.required_outputs(load_config(None, ["baseline.methods=[ce]"])) == {
        "ce": "ce/model.pt", "ce_history": "ce/history.csv"}
    assert set(base.required_outputs(load_config(None, ["baseline.methods=[ce,kd]"]))) == {
        "ce", "kd", "ce_history", "kd_history"}
    assert "tar" not in bundle.required_outputs(load_config(None, ["bundle.tarball=false"]))
    assert bundle.required_outputs(load_config(None, []))["tar"] == "bundle.tar.gz"
    teacher = graph.get("teacher")
    assert "history" in teacher.required_outputs(load_config(None, []))


def _ctx(tmp_path, name="export", inputs=("merge", "teacher")):
    return StageContext(name=name, out_dir=tmp_path / "out", run_dir=tmp_path, cfg=None,
                        inputs={s: tmp_path / s for s in inputs})


def test_ctx_artifact_resolves_named_outputs_of_inputs(tmp_path):
    ctx = _ctx(tmp_path)
    assert ctx.artifact("merge", "model") == tmp_path / "merge" / "model.pt"
    assert ctx.artifact("teacher", "history") == tmp_path / "teacher" / "history.csv"
    bundle = _ctx(tmp_path, "bundle", ("export", "quantize"))
    assert bundle.artifact("quantize", "int8") == tmp_path / "quantize" / "model_int8.onnx"
    assert graph.artifact_path(tmp_path, "bundle", "bundle") == tmp_path / "bundle" / "bundle"


def test_ctx_artifact_errors_are_one_clear_line(tmp_path):
    ctx = _ctx(tmp_path)
    with pytest.raises(PipelineError, match=r"^stage 'merge' has no output named 'weights'; its outputs are: model, merge$"):
        ctx.artifact("merge", "weights")
    with pytest.raises(PipelineError, match=r"stage 'export' reads quantize's output 'int8' but does not declare 'quantize'"):
        ctx.artifact("quantize", "int8")  # quantize is downstream of export: never an input
    with pytest.raises(PipelineError, match=r"needs the output of stage 'distill'; run `norm-pipeline stage distill`"):
        ctx.artifact("distill", "norm_student")  # an input, but not run


def test_list_shows_every_output_with_its_condition(capsys, monkeypatch):
    from rich.console import Console

    from pipeline import session

    monkeypatch.setattr(session, "console", Console(width=2000, highlight=False))  # one line per stage
    session.print_stage_list()
    out = " ".join(capsys.readouterr().out.split())
    for spec in graph.STAGES:
        for rel in spec.outputs.values():
            assert rel in out, (spec.name, rel)
    assert graph.get("baseline").describe_outputs().startswith("ce/model.pt (if baseline.methods has ce)")
    assert "bundle.tar.gz (if bundle.tarball = true)" in graph.get("bundle").describe_outputs()
