"""The benchmark stage end to end on the tiny upstream models (ONNX exported here), tiny timing settings."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch


def export_onnx(model: torch.nn.Module, path: Path, shape: tuple[int, ...]) -> None:
    """Dynamic-batch ONNX with the export stage's names ("input" -> "logits"); the fast TorchScript exporter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros((2, *shape)),), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=18, dynamo=False)


@pytest.fixture(scope="module")
def export_dir(upstream, tmp_path_factory) -> Path:
    """A folder shaped like the export stage's: model/vanilla/unmerged/teacher .onnx."""
    from models.norm import LogitsOnly
    from models.registry import create_model
    from stages.lib.checkpoints import load_model, load_norm_student

    out = tmp_path_factory.mktemp("export")
    merged, meta = load_model(upstream["merge"] / "model.pt")
    vanilla = create_model(meta["model"], num_classes=meta["num_classes"], in_chans=meta["in_chans"])
    vanilla.load_state_dict(merged.state_dict())
    ns, _ = load_norm_student(upstream["distill"] / "norm_student.pt")
    teacher, _ = load_model(upstream["teacher"] / "model.pt")
    shape = (1, 28, 28)
    for name, m in (("model", merged), ("vanilla", vanilla), ("unmerged", LogitsOnly(ns)), ("teacher", teacher)):
        export_onnx(m, out / f"{name}.onnx", shape)
    return out


def tiny_cfg(upstream, **bench):
    settings = {"blocks": 10, "block_runs": 1, "warmup": 1, "batch_sizes": [1, 2], "bootstrap": 200, "max_seconds": 4.0,
                **bench}
    return upstream["cfg"].model_copy(update={"benchmark": upstream["cfg"].benchmark.model_copy(update=settings)})


def run_stage(upstream, export_dir: Path, out: Path, **bench):
    from pipeline.graph import stage_module

    benchmark = stage_module("benchmark")
    from stages.lib.context import StageContext

    ins = {k: upstream[k] for k in ("data", "teacher", "distill", "merge")} | {"export": export_dir}
    ctx = StageContext(name="benchmark", out_dir=out, run_dir=out.parent, cfg=tiny_cfg(upstream, **bench), inputs=ins,
                       input_records={k: upstream["records"][k] for k in ins if k in upstream["records"]},
                       log=lambda m: None)
    metrics = benchmark.run(ctx)
    return out, metrics, json.loads((out / "benchmark.json").read_text())


@pytest.fixture(scope="module")
def bench_run(upstream, export_dir, tmp_path_factory):
    """One full stage run, shared by the checks below (the stage is the slow part)."""
    return run_stage(upstream, export_dir, tmp_path_factory.mktemp("benchmark"))


def test_writes_every_model_on_every_backend_and_batch(bench_run):
    out, metrics, report = bench_run
    models = {"vanilla", "vanilla_b", "merged", "unmerged", "teacher"}
    timed = [c for c in report["cells"] if "models" in c]
    assert {(c["backend"], c["batch"]) for c in timed} >= {(b, n) for b in ("torch_cpu", "onnxruntime_cpu") for n in (1, 2)}
    for c in timed:
        assert set(c["models"]) == models
        rounds = c["adaptive"]["rounds"] if c.get("verdict_cell") else 10
        side = c.get("side_rounds", {"models": []})
        assert side["models"] == (["teacher"] if c.get("verdict_cell") else [])
        for name, s in c["models"].items():
            want = side["rounds"] if name in side["models"] else rounds
            assert s["n"] == want and len(s["block_means_ms"]) == want, name
            assert 0 < s["min_ms"] <= s["median_ms"] <= s["p90_ms"] <= s["max_ms"]
        assert c["conditions"]["before"]["loadavg"] is not None and "changed" in c["conditions"]
        assert {"merged_vs_vanilla", "aa", "unmerged_vs_vanilla", "teacher_vs_vanilla"} <= set(c["comparisons"])
        single_threaded = c["backend"] in ("torch_cpu", "onnxruntime_cpu")  # thread CPU time only where it is the cost
        assert ("cpu_comparisons" in c) is single_threaded and ("cpu" in c["models"]["merged"]) is single_threaded
    assert json.loads(json.dumps(metrics)) == metrics  # JSON-serialisable


def test_verdict_keys_and_backend(bench_run):
    _, metrics, report = bench_run
    for key in ("merged_vs_vanilla_ratio", "merged_vs_vanilla_lo", "merged_vs_vanilla_hi", "aa_ratio", "aa_lo",
                "aa_hi", "unmerged_vs_vanilla_ratio", "teacher_vs_vanilla_ratio"):
        assert isinstance(metrics[key], float) and metrics[key] > 0, key
    assert metrics["merged_vs_vanilla_lo"] <= metrics["merged_vs_vanilla_hi"]
    assert metrics["verdict_backend"] == "onnxruntime_cpu" and metrics["verdict_batch"] == 2
    assert metrics["verdict_clock"] == "cpu" and metrics["wall_aa_lo"] <= metrics["wall_aa_hi"]
    assert report["verdict"]["verdict"] == metrics["verdict"]
    assert metrics["onnxruntime_cpu_b1_merged_median_ms"] > 0


def test_verdict_is_the_rule_applied_to_the_recorded_intervals(bench_run):
    """merged and vanilla are the same network: never "no"; the answer and reason follow from the verdict cell."""
    from stages.lib import timing

    _, metrics, report = bench_run
    vcell = next(c for c in report["cells"] if c.get("verdict_cell"))
    assert (vcell["backend"], vcell["batch"]) == ("onnxruntime_cpu", 2)
    comps = vcell["cpu_comparisons"]
    assert comps["merged_vs_vanilla"]["ratio"] == metrics["merged_vs_vanilla_ratio"]
    assert comps["aa"]["hi"] == metrics["aa_hi"] and comps["unmerged_vs_vanilla"]["lo"] == metrics["unmerged_vs_vanilla_lo"]
    band = metrics["band"]
    answer, reason = timing.decide(comps["merged_vs_vanilla"], band, control=comps["aa"], name="merged/vanilla")
    if metrics["verdict"] == "inconclusive" and answer != "inconclusive":  # only the negative-control guard may differ
        assert "negative control" in metrics["verdict_reason"]
    else:
        assert (metrics["verdict"], metrics["verdict_reason"].split(" (after ")[0]) == (answer, reason)
    assert metrics["verdict"] in ("yes", "inconclusive"), metrics["verdict_reason"]
    assert metrics["unmerged_verdict"] == timing.decide(comps["unmerged_vs_vanilla"], band, control=comps["aa"])[0]
    a = vcell["adaptive"]
    assert metrics["verdict_rounds"] == a["rounds"] >= 10 and metrics["verdict_seconds"] == a["seconds"]
    assert a["stopped"] in ("precision reached", "time limit") and a["target"] == "merged_vs_vanilla" and a["control"] == "aa"
    assert report["verdict"]["verdict_reason"] == metrics["verdict_reason"]
    informational = [c for c in report["cells"] if "models" in c and not c.get("verdict_cell")]
    assert informational and all("adaptive" not in c for c in informational)


def test_merged_file_of_known_higher_cost_gives_no(upstream, export_dir, tmp_path):
    """Wiring with models of known, different cost: the export folder's model.onnx is the teacher (several times
    the student's FLOPs). merged_vs_vanilla must see it (a pair table comparing vanilla_b with vanilla would not)."""
    import shutil

    swapped = tmp_path / "export"
    shutil.copytree(export_dir, swapped)
    shutil.copy(export_dir / "teacher.onnx", swapped / "model.onnx")
    # a wide band: the point is which files are compared, not this (shared, busy) machine's resolution
    _, m, report = run_stage(upstream, swapped, tmp_path / "benchmark", batch_sizes=[4], backends=["onnxruntime"],
                             multithreaded=False, include_teacher=True, band=0.25, block_runs=3)
    assert m["verdict"] == "no" and "slower" in m["verdict_reason"], m["verdict_reason"]
    assert m["merged_vs_vanilla_lo"] > 1 + m["band"]
    assert m["merged_vs_vanilla_ratio"] == pytest.approx(m["teacher_vs_vanilla_ratio"], rel=0.15)
    assert m["aa_lo"] <= 1.0 + m["band"] and m["aa_hi"] >= 1.0 - m["band"]
    assert "merged measurably slower" in m.get("verdict_power", "") or m["unmerged_verdict"] != "no"


def test_structure_shows_identical_cost(bench_run):
    _, metrics, report = bench_run
    s = report["structure"]
    assert s["identical"] == {"params": True, "flops": True, "onnx_ops": True}
    assert s["params"]["unmerged"] > s["params"]["merged"] and s["flops"]["unmerged"] > s["flops"]["merged"]
    assert s["onnx_ops"]["merged"].get("Conv", 0) > 0
    assert metrics["structure_identical"] is True


def test_tensorrt_skipped_with_reason_and_artifacts(bench_run):
    out, _, report = bench_run
    assert "tensorrt" in report["skipped_backends"] and "engine" in report["skipped_backends"]["tensorrt"]
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "latency.md").read_text()
    assert "inference cost unchanged" in table and "| onnxruntime_cpu | 2 | merged |" in table


def test_missing_onnx_file_is_a_clear_error(upstream, make_ctx, tmp_path):
    from pipeline.graph import stage_module

    benchmark = stage_module("benchmark")
    from stages.lib.errors import PipelineError

    empty = tmp_path / "export_empty"
    empty.mkdir()
    with pytest.raises(PipelineError, match="vanilla.onnx"):
        benchmark.run(make_ctx("benchmark", inputs={"export": empty}, cfg=tiny_cfg(upstream)))


def _comps(ratio: float, lo: float, hi: float) -> dict:
    return {"merged_vs_vanilla": {"ratio": ratio, "lo": lo, "hi": hi}, "aa": {"ratio": 1.0, "lo": 0.99, "hi": 1.01}}


def _cell(backend: str, batch: int, ratio: float, lo: float, hi: float, cpu: tuple | None = None) -> dict:
    cell = {"backend": backend, "batch": batch, "models": {"merged": {"median_ms": ratio}}, "comparisons": _comps(ratio, lo, hi)}
    if cpu is not None:
        cell["cpu_comparisons"] = _comps(*cpu)
    return cell


def test_verdict_cell_prefers_single_threaded_ort_at_largest_batch():
    from stages.lib.latency_verdict import flat_metrics, pick_verdict_cell

    cells = [_cell("torch_cpu", 64, 1.5, 1.4, 1.6), _cell("onnxruntime_cpu", 1, 1.0, 0.99, 1.01),
             _cell("onnxruntime_cpu", 32, 1.2, 1.1, 1.3), {"backend": "tensorrt", "batch": 64, "skipped": "x"}]
    v = pick_verdict_cell(cells)
    assert (v["backend"], v["batch"]) == ("onnxruntime_cpu", 32)
    m = flat_metrics(cells, v, 0.05, "cpu")  # no CPU clock in this cell: falls back to wall
    assert m["verdict"] == "no" and m["merged_vs_vanilla_ratio"] == 1.2 and m["aa_within_band"] is True
    assert m["verdict_clock"] == "wall"
    assert m["torch_cpu_b64_merged_median_ms"] == 1.5
    fallback = pick_verdict_cell([_cell("torch_cpu", 1, 1.0, 0.98, 1.02), _cell("torch_cpu", 8, 1.0, 0.97, 1.03),
                                  _cell("onnxruntime_cpu_mt", 8, 1.0, 0.5, 1.5)])
    assert (fallback["backend"], fallback["batch"]) == ("torch_cpu", 8)
    assert flat_metrics([fallback], fallback, 0.05, "wall")["verdict"] == "yes"
    assert pick_verdict_cell([]) is None and flat_metrics([], None, 0.05, "cpu")["verdict"] == "n/a"


def test_verdict_clock_chooses_cpu_or_wall_comparisons():
    from stages.lib.latency_verdict import flat_metrics

    noisy_wall = _cell("onnxruntime_cpu", 32, 1.03, 0.85, 1.2, cpu=(1.001, 0.995, 1.008))
    cpu = flat_metrics([noisy_wall], noisy_wall, 0.05, "cpu")
    assert cpu["verdict"] == "yes" and cpu["verdict_clock"] == "cpu" and cpu["merged_vs_vanilla_hi"] == 1.008
    assert cpu["wall_merged_vs_vanilla_hi"] == 1.2
    wall = flat_metrics([noisy_wall], noisy_wall, 0.05, "wall")  # [0.85, 1.2]: too wide to say anything
    assert wall["verdict"] == "inconclusive" and wall["verdict_clock"] == "wall" and "wall_merged_vs_vanilla_hi" not in wall


def _fake_backend(costs: dict[str, float], noise: float = 0.01, seed: int = 0):
    """A backend whose models have known costs (ms per item, CPU = wall), log-normal noise per run."""
    import numpy as np

    from stages.lib.latency import Backend

    rng = np.random.default_rng(seed)

    def make(x):
        def block_fn(cost: float):
            def block(n: int) -> dict[str, list[float]]:
                ms = [cost * len(x) * float(np.exp(rng.normal(0, noise))) for _ in range(n)]
                return {"wall": ms, "cpu": ms}
            return block
        return {name: block_fn(c) for name, c in costs.items()}

    return Backend("onnxruntime_cpu", {"informational": False}, make)


@pytest.mark.parametrize("merged,vanilla_b,expected", [(1.10, 1.0, "no"), (1.0, 1.0, "yes"), (1.0, 1.05, "inconclusive")])
def test_pair_table_wiring_with_fake_models_of_known_cost(upstream, merged, vanilla_b, expected):
    """Each comparison must be computed on its own pair: with every model at a different known cost, a pair
    table that compared vanilla_b (or anything else) in place of merged would give the wrong ratio and answer."""
    import numpy as np

    from stages.lib.latency import time_cells
    from stages.lib.latency_verdict import flat_metrics, pick_verdict_cell

    costs = {"vanilla": 1.0, "vanilla_b": vanilla_b, "merged": merged, "unmerged": 1.40, "teacher": 3.0}
    c = tiny_cfg(upstream).benchmark
    cells = time_cells([_fake_backend(costs)], {1: np.zeros((1, 1, 28, 28), np.float32),
                                                 4: np.zeros((4, 1, 28, 28), np.float32)}, c, 0, torch.get_num_threads())
    vcell = pick_verdict_cell(cells)
    assert vcell["batch"] == 4 and vcell["verdict_cell"] and not any(x.get("verdict_cell") for x in cells if x is not vcell)
    struct = {"flops": {"vanilla": 100, "merged": 100, "unmerged": 140}}
    m = flat_metrics(cells, vcell, 0.02, "cpu", struct)
    for label, want in (("merged_vs_vanilla", merged), ("aa", vanilla_b), ("unmerged_vs_vanilla", 1.40),
                        ("teacher_vs_vanilla", 3.0)):
        assert m[f"{label}_ratio"] == pytest.approx(want, rel=0.03), label  # 1.0 / 1.05 / 1.10 / 1.40 / 3.0 apart
        assert m[f"{label}_lo"] <= m[f"{label}_ratio"] <= m[f"{label}_hi"]
    assert m["verdict"] == expected, m["verdict_reason"]
    assert m["unmerged_verdict"] == "no"  # +40% is far beyond even a 5% A/A deviation
    if expected == "yes":
        assert m["verdict_power"] == (f"this benchmark detects the unmerged student's "
                                      f"{m['unmerged_vs_vanilla_ratio'] - 1:+.0%}; it finds merged = vanilla within ±2%")
    if expected == "no":
        assert "measurably slower (+" in m["verdict_reason"] and m["merged_vs_vanilla_lo"] > 1.02
    if expected == "inconclusive":
        assert "A/A control" in m["verdict_reason"]


def test_the_teacher_is_timed_outside_the_verdict_rounds(upstream):
    """The adaptive verdict rounds time only what the verdict needs; the teacher gets ``blocks`` rounds of its own
    against vanilla afterwards, and its ratio comes from those rounds."""
    import numpy as np

    from stages.lib.latency import Backend, measure_verdict_cell

    calls: dict[str, int] = {}
    inner = _fake_backend({"vanilla": 1.0, "vanilla_b": 1.0, "merged": 1.0, "unmerged": 1.4, "teacher": 3.0})

    def make(x):
        fns = inner.make(x)

        def counted(name):
            def block(n):
                calls[name] = calls.get(name, 0) + 1
                return fns[name](n)
            return block
        return {name: counted(name) for name in fns}

    cell = measure_verdict_cell(Backend("onnxruntime_cpu", {}, make), np.zeros((4, 1, 28, 28), np.float32), warmup=1,
                                min_rounds=6, block_runs=2, max_seconds=0.5, band=0.02, clock="cpu", n_boot=200, seed=0)
    rounds = cell["adaptive"]["rounds"]
    assert rounds >= 6 and cell["side_rounds"] == {"models": ["teacher"], "rounds": 6, "reference": "vanilla",
                                                   "why": "timed after the verdict rounds, against vanilla in rounds of their own"}
    assert calls["teacher"] == 1 + 6  # its warm-up block and its own rounds, none of the adaptive ones
    assert calls["merged"] == 1 + rounds and calls["vanilla"] == 2 + rounds + 6  # vanilla is the teacher's reference too
    assert cell["models"]["teacher"]["n"] == 6 * 2 and cell["models"]["merged"]["n"] == rounds * 2
    assert cell["cpu_comparisons"]["teacher_vs_vanilla"]["ratio"] == pytest.approx(3.0, rel=0.03)
    assert cell["cpu_comparisons"]["teacher_vs_vanilla"]["rounds"] == 6
    assert cell["cpu_comparisons"]["merged_vs_vanilla"]["rounds"] == rounds


def test_a_negative_control_that_shows_no_cost_voids_a_yes():
    from stages.lib.latency_verdict import judge

    comps = {"merged_vs_vanilla": {"ratio": 1.0, "lo": 0.995, "hi": 1.005, "rounds": 40},
             "aa": {"ratio": 1.0, "lo": 0.996, "hi": 1.004, "rounds": 40},
             "unmerged_vs_vanilla": {"ratio": 1.001, "lo": 0.996, "hi": 1.006, "rounds": 40}}
    j = judge(comps, 0.02, None, unmerged_flops=1.35)
    assert j["verdict"] == "inconclusive" and "does not see model cost" in j["verdict_reason"]
    assert j["unmerged_verdict"] == "yes" and "not resolved" in j["verdict_power"]
    assert judge(comps, 0.02, None, unmerged_flops=1.01)["verdict"] == "yes"  # an FT too small to be seen: no claim
    late = judge({**comps, "merged_vs_vanilla": {"ratio": 1.02, "lo": 1.0, "hi": 1.04, "rounds": 40}}, 0.02,
                 {"stopped": "time limit", "rounds": 40, "seconds": 45.2})
    assert late["verdict"] == "inconclusive" and "after 40 rounds in 45 s" in late["verdict_reason"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA")
def test_torch_cuda_backend_times_with_events():
    import numpy as np

    from models.registry import create_model
    from stages.lib.latency import measure_cell, torch_backend

    m = create_model("resnet8", num_classes=10, in_chans=1).eval()
    twin = create_model("resnet8", num_classes=10, in_chans=1).eval()
    twin.load_state_dict(m.state_dict())
    be = torch_backend({"vanilla": m, "vanilla_b": twin, "merged": m}, "cuda", 1)
    cell = measure_cell(be, np.zeros((4, 1, 28, 28), np.float32), warmup=2, blocks=4, block_runs=3, n_boot=200, seed=0)
    assert be.name == "torch_cuda" and cell["models"]["merged"]["n"] == 12
    assert cell["comparisons"]["aa"]["lo"] <= cell["comparisons"]["aa"]["hi"]
