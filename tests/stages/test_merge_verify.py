"""Stages `merge` and `verify` on the `upstream` fixture, plus the FLOP/parameter counters."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from stages.lib.errors import PipelineError


def _cfg(upstream, **verify):
    """The fixture's config with a small float64 sample (fast) and optional verify overrides."""
    cfg = upstream["cfg"].model_copy(deep=True)
    cfg.verify.fp64_samples = 32
    for key, value in verify.items():
        setattr(cfg.verify, key, value)
    return cfg


# ----------------------------------------------------------------------------- flops
def test_count_flops_and_params_on_known_layers():
    from stages.lib.flops import count_flops, count_params

    lin = nn.Linear(4, 3)
    assert count_params(lin) == 4 * 3 + 3
    assert count_flops(lin, (2, 4)) == 2 * (2 * 4 * 3)  # 2 FLOPs per multiply-add
    conv = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)).train()
    before = conv[1].running_mean.clone()
    assert count_flops(conv, (1, 2, 6, 6)) == 2 * (6 * 6) * (5 * 2 * 3 * 3)
    assert conv.training and torch.equal(conv[1].running_mean, before)  # mode restored, stats untouched


# ----------------------------------------------------------------------------- merge
def test_merge_stage_writes_the_merged_vanilla_model(make_ctx, upstream, tmp_path):
    from pipeline.graph import stage_module

    merge_stage = stage_module("merge")
    from models.merge import merge_norm_student
    from models.norm import LogitsOnly
    from models.registry import create_model
    from stages.lib.checkpoints import load_model, load_norm_student
    from stages.lib.flops import count_params

    metrics = merge_stage.run(make_ctx("merge"))
    info = json.loads((tmp_path / "merge" / "merge.json").read_text())
    ns, _ = load_norm_student(upstream["distill"] / "norm_student.pt")
    teacher, _ = load_model(upstream["teacher"] / "model.pt")
    assert info["student"] == "resnet8" and info["fc_layer"] == "head.fc"
    assert (info["C_s"], info["C_t"], info["N"], info["residual"]) == (ns.student.num_features, teacher.num_features, 2, True)
    assert info["state_dict_matches_vanilla"] is True
    vanilla_params = count_params(create_model("resnet8", num_classes=10, in_chans=1))
    assert info["params"] == {"unmerged": count_params(ns), "merged": vanilla_params, "vanilla": vanilla_params,
                              "ft_removed": sum(p.numel() for p in ns.ft.parameters())}
    assert metrics == {"params": vanilla_params, "unmerged_params": count_params(ns),
                       "ft_params_removed": info["params"]["ft_removed"]}

    merged, meta = load_model(tmp_path / "merge" / "model.pt")
    expected = merge_norm_student(ns)
    assert type(merged) is type(ns.student) and meta["model"] == "resnet8"
    assert merged.state_dict().keys() == expected.state_dict().keys()
    for key, value in expected.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), key
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), LogitsOnly(ns)(x), rtol=1e-4, atol=1e-5)


def test_merge_refusal_becomes_pipeline_error(make_ctx, upstream, monkeypatch):
    from pipeline.graph import stage_module

    merge_stage = stage_module("merge")
    from stages.lib.checkpoints import load_norm_student

    def max_pool_head(path):
        ns, meta = load_norm_student(path)
        ns.student.head.global_pool = nn.AdaptiveMaxPool2d(1)  # not linear: the merge must refuse it
        return ns, meta

    monkeypatch.setattr(merge_stage, "load_norm_student", max_pool_head)
    with pytest.raises(PipelineError, match="cannot merge: head module 'global_pool'"):
        merge_stage.run(make_ctx("merge"))


# ----------------------------------------------------------------------------- verify
def test_verify_passes_on_honest_artifacts(make_ctx, upstream, tmp_path):
    from pipeline.graph import stage_module

    verify_stage = stage_module("verify")
    from models.registry import create_model
    from stages.lib.flops import count_flops, count_params

    metrics = verify_stage.run(make_ctx("verify", cfg=_cfg(upstream)))
    report = json.loads((tmp_path / "verify" / "verify.json").read_text())
    dataset = json.loads((upstream["data"] / "dataset.json").read_text())
    assert report["passed"] is True and report["failures"] == []
    assert report["fp32"]["samples"] == dataset["val_size"]  # the whole validation set
    assert report["fp64"]["samples"] == report["fp64_stored"]["samples"] == 32
    assert metrics["fp32_max_rel_diff"] <= 1e-4 and metrics["fp64_max_rel_diff"] <= 1e-12
    assert metrics["fp64_stored_max_rel_diff"] <= 1e-6
    assert metrics["top1_agreement"] == 1.0 and metrics["merged_top1"] == metrics["unmerged_top1"]
    fresh = create_model("resnet8", num_classes=10, in_chans=1)
    assert metrics["params"] == count_params(fresh) and metrics["flops"] == count_flops(fresh, (1, 1, 28, 28)) > 0
    assert metrics["params_equal"] is True and metrics["flops_equal"] is True
    s = report["structure"]
    assert s["state_dict_equal"] is True
    assert s["unmerged_params"] > s["params"] and s["unmerged_flops"] > s["flops"]  # the FT had a cost


def test_verify_fails_on_tampered_merge(make_ctx, upstream, tmp_path):
    from pipeline.graph import stage_module

    verify_stage = stage_module("verify")

    payload = torch.load(upstream["merge"] / "model.pt", weights_only=True)
    payload["state_dict"]["head.fc.bias"] = payload["state_dict"]["head.fc.bias"] + 0.05
    tampered = tmp_path / "tampered_merge"
    tampered.mkdir()
    torch.save(payload, tampered / "model.pt")
    with pytest.raises(PipelineError, match=r"fp32_max_rel_diff=\S+ exceeds verify.fp32_rel_tol"):
        verify_stage.run(make_ctx("verify", inputs={"merge": tampered}, cfg=_cfg(upstream)))
    report = json.loads((tmp_path / "verify" / "verify.json").read_text())  # written for the record
    assert report["passed"] is False
    assert report["fp32"]["max_abs_diff"] == pytest.approx(0.05, rel=1e-3)
    assert report["structure"]["params_equal"] is True  # same architecture, wrong numbers


def test_verify_fails_when_tolerances_are_absurd(make_ctx, upstream, tmp_path):
    from pipeline.graph import stage_module

    verify_stage = stage_module("verify")

    cfg = _cfg(upstream, fp32_rel_tol=1e-30, fp64_rel_tol=1e-30)
    with pytest.raises(PipelineError) as err:
        verify_stage.run(make_ctx("verify", cfg=cfg))
    assert "exceeds verify.fp32_rel_tol=1.0e-30" in str(err.value)
    assert "fp64_max_rel_diff=" in str(err.value) and "verify.fp64_rel_tol" in str(err.value)
    assert json.loads((tmp_path / "verify" / "verify.json").read_text())["passed"] is False


def test_verify_failures_names_structure_and_agreement():
    from stages.lib.verify_checks import failures

    ok = {"max_rel_diff": 0.0, "top1_agreement": 1.0}
    report = {"fp32": {**ok, "top1_agreement": 0.9}, "fp64": {**ok, "max_rel_diff": float("nan")}, "fp64_stored": ok,
              "structure": {"params_equal": False, "params": 11, "vanilla_params": 10, "flops_equal": False,
                            "flops": 7, "vanilla_flops": 5, "state_dict_equal": True}}
    fails = failures(report, fp32_rel_tol=1e-4, fp64_rel_tol=1e-9, min_top1_agreement=0.999)
    assert len(fails) == 4
    assert any(f.startswith("top1_agreement=0.90000") for f in fails)
    assert any(f.startswith("fp64_max_rel_diff=nan") for f in fails)
    assert "params=11 differs from the vanilla student's 10" in fails
    assert "flops=7 differs from the vanilla student's 5" in fails
