"""Stage `export`: ONNX files with a dynamic batch, checked, run in onnxruntime, and compared structurally.

Four files: ``model.onnx`` (the merged student: THE deployable), ``vanilla.onnx`` (a freshly built vanilla
student carrying the merged weights: the reference for graph identity and benchmarks), ``unmerged.onnx``
(the NORM student with its FT) and ``teacher.onnx``. Each passes the full ONNX checker, carries metadata
(classes, layout, normalisation, provenance) and must match PyTorch in onnxruntime (Polygraphy's rule).
``model.onnx`` must be structurally identical to ``vanilla.onnx``: that is the proof that merging left
the deployed architecture, and hence its cost, unchanged.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from models.norm import LogitsOnly
from models.registry import create_model
from stages.lib import onnx_utils
from stages.lib.checkpoints import load_model, load_norm_student
from stages.lib.context import StageContext
from stages.lib.dataset_meta import DatasetMeta
from stages.lib.datasets import val_batches
from stages.lib.errors import PipelineError
from stages.lib.io import sha256_file
from stages.lib.progress import progress_bar

FILES = {"merged": "model.onnx", "vanilla": "vanilla.onnx", "unmerged": "unmerged.onnx", "teacher": "teacher.onnx"}


def package_version() -> str:
    try:
        from pipeline import __version__

        return str(__version__)
    except ImportError:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("norm-pipeline")
        except PackageNotFoundError:
            return "unknown"


def load_models(ctx: StageContext) -> dict[str, dict]:
    """kind -> {"model": CPU float32 module in eval mode, "name", "source" file, "in_chans"}."""
    merge_pt = ctx.artifact("merge", "model")
    distill_pt = ctx.artifact("distill", "norm_student")
    teacher_pt = ctx.artifact("teacher", "model")
    merged, m_meta = load_model(merge_pt, "merged model")
    vanilla = create_model(m_meta["model"], num_classes=m_meta["num_classes"], in_chans=m_meta["in_chans"])
    vanilla.load_state_dict(merged.state_dict(), strict=True)
    ns, ns_meta = load_norm_student(distill_pt)
    teacher, t_meta = load_model(teacher_pt, "teacher checkpoint")
    out = {"merged": (merged, m_meta, merge_pt), "vanilla": (vanilla, m_meta, merge_pt),
           "unmerged": (LogitsOnly(ns), ns_meta, distill_pt), "teacher": (teacher, t_meta, teacher_pt)}
    return {k: {"model": m.eval().float().cpu(), "name": meta["model"], "source": src, "in_chans": meta["in_chans"]}
            for k, (m, meta, src) in out.items()}


def parity_images(meta: dict, n: int, batch_size: int) -> torch.Tensor:
    """The first ``n`` validation images, normalised, on the CPU."""
    xs, have = [], 0
    for x, _ in val_batches(meta, batch_size=batch_size, device="cpu"):
        xs.append(x[: n - have])
        have += len(xs[-1])
        if have >= n:
            break
    if not xs:
        raise PipelineError("the validation set is empty: no images for the ONNX parity check (check data.val_limit)")
    return torch.cat(xs)


def metadata(meta: dict, *, kind: str, name: str, source_sha256: str, max_batch: int) -> dict[str, str]:
    """metadata_props for one ONNX file: what a runtime needs to feed it and where it came from."""
    return {"classes": json.dumps(meta["classes"]), "num_classes": str(meta["num_classes"]), "input_layout": "NCHW",
            "input_shape": json.dumps([-1, meta["in_chans"], *meta["input_size"]]), "max_batch": str(max_batch),
            "mean": json.dumps(meta["mean"]), "std": json.dumps(meta["std"]),
            "input_name": onnx_utils.INPUT_NAME, "output_name": onnx_utils.OUTPUT_NAME, "model": name, "kind": kind,
            "norm_pipeline_version": package_version(), "torch_version": torch.__version__,
            "source_sha256": source_sha256}


@torch.no_grad()
def parity(model: nn.Module, path: Path, x: torch.Tensor, *, batch: int, atol: float, rtol: float) -> dict:
    """onnxruntime (CPU) vs PyTorch (CPU, float32) on ``x``, batch by batch."""
    session = onnx_utils.ort_session(path)
    got, want = [], []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        got.append(onnx_utils.run_ort(session, xb.numpy()))
        want.append(model(xb).numpy())
    actual, expected = np.concatenate(got), np.concatenate(want)
    out = onnx_utils.compare_outputs(actual, expected, atol=atol, rtol=rtol)
    if actual.shape == expected.shape:
        out["top1_agreement"] = float((actual.argmax(1) == expected.argmax(1)).mean())
    return {"samples": int(len(x)), **out}


def export_all(models: dict, meta: dict, out_dir: Path, example: torch.Tensor, *, opset: int, max_batch: int,
               exporter: str = "auto") -> dict:
    """Export every model to its file; kind -> export facts (exporter, seconds, size, sha256)."""
    facts = {}
    with progress_bar() as progress:
        task = progress.add_task("ONNX export", total=len(models))
        for kind, m in models.items():
            source_sha = sha256_file(m["source"])
            props = metadata(meta, kind=kind, name=m["name"], source_sha256=source_sha, max_batch=max_batch)
            path = out_dir / FILES[kind]
            t0 = time.perf_counter()
            info = onnx_utils.export_onnx(m["model"], path, kind=kind, example=example, opset=opset,
                                          max_batch=max_batch, metadata=props, exporter=exporter)
            facts[kind] = {"file": FILES[kind], **info, "export_seconds": round(time.perf_counter() - t0, 3),
                           "bytes": path.stat().st_size, "sha256": sha256_file(path), "model": m["name"],
                           "source": f"{m['source'].parent.name}/{m['source'].name}", "source_sha256": source_sha}
            progress.advance(task)
    return facts


def run(ctx: StageContext) -> dict:
    import onnx

    c = ctx.cfg.export
    meta = DatasetMeta.load(ctx.artifact("data", "dataset")).to_dict()
    models = load_models(ctx)
    for kind, m in models.items():
        if m["in_chans"] != meta["in_chans"]:
            raise PipelineError(f"the {kind} model takes {m['in_chans']} input channels but the dataset has "
                                f"{meta['in_chans']}; re-run the stages after data")
    batch = max(1, min(c.max_batch, ctx.cfg.data.eval_batch_size))
    x = parity_images(meta, c.parity_samples, batch)
    example = x[:2] if len(x) >= 2 else x.repeat(2, 1, 1, 1)  # batch >= 2: sizes 0/1 would be specialised
    facts = export_all(models, meta, ctx.out_dir, example, opset=c.opset, max_batch=c.max_batch, exporter=c.exporter)

    with progress_bar() as progress:
        task = progress.add_task("onnxruntime parity", total=len(models))
        for kind, m in models.items():
            facts[kind]["parity"] = parity(m["model"], ctx.out_dir / FILES[kind], x, batch=batch, atol=c.atol, rtol=c.rtol)
            progress.advance(task)
    sigs = {k: onnx_utils.graph_signature(ctx.out_dir / f) for k, f in FILES.items()}
    identity = {"merged_vs_vanilla": onnx_utils.compare_graphs(sigs["merged"], sigs["vanilla"]),
                "unmerged_vs_vanilla": onnx_utils.compare_graphs(sigs["unmerged"], sigs["vanilla"])}
    for kind in FILES:
        facts[kind].update(ops=len(sigs[kind]["ops"]), params=sigs[kind]["initializer_params"])
    proto = onnx.load(str(ctx.out_dir / FILES["merged"]), load_external_data=False)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    failed = [k for k in FILES if not facts[k]["parity"]["ok"]]
    report = {"opset": opset, "requested_opset": c.opset, "max_batch": c.max_batch, "input_name": onnx_utils.INPUT_NAME,
              "output_name": onnx_utils.OUTPUT_NAME, "dynamic_axis": "batch",
              "parity": {"atol": c.atol, "rtol": c.rtol, "samples": int(len(x)), "runtime": "onnxruntime CPU",
                         "rule": "element fails if |a-b| > atol and |a-b| > rtol*|b| (Polygraphy)", "ok": not failed},
              "models": facts, "graph_identity": identity,
              "metadata": {p.key: p.value for p in proto.metadata_props}}
    ctx.write_json("export.json", report)
    if failed:
        worst = ", ".join(f"{k} max abs diff {facts[k]['parity']['max_abs_diff']:.2e}" for k in failed)
        raise PipelineError(f"onnxruntime output differs from PyTorch beyond export.atol={c.atol}/export.rtol={c.rtol}: "
                            f"{worst} (details in export.json); if that is float noise, loosen export.atol/export.rtol, "
                            "otherwise an op is translated wrongly: check the model's ops against onnxruntime")
    mv = identity["merged_vs_vanilla"]
    ctx.log(f"exported {len(FILES)} ONNX files (opset {opset}, {facts['merged']['exporter']}); model.onnx "
            f"{'is' if mv['identical'] else 'is NOT'} structurally identical to vanilla.onnx; "
            f"ORT max abs diff {max(f['parity']['max_abs_diff'] for f in facts.values()):.2e}")
    metrics = {"ort_max_abs_diff": max(f["parity"]["max_abs_diff"] for f in facts.values()),
               "ort_max_rel_diff": max(f["parity"]["max_rel_diff"] for f in facts.values()),
               "ort_parity_ok": not failed, "graph_identical": mv["identical"], "onnx_ops": facts["merged"]["ops"],
               "unmerged_extra_ops": sum(identity["unmerged_vs_vanilla"]["extra_ops"].values()),
               "unmerged_extra_params": identity["unmerged_vs_vanilla"]["extra_params"], "opset": opset,
               "exporter": "+".join(sorted({f["exporter"] for f in facts.values()})),
               "model_onnx_sha256": facts["merged"]["sha256"],
               "export_seconds": round(sum(f["export_seconds"] for f in facts.values()), 3)}
    metrics.update({f"{FILES[k].replace('.', '_')}_bytes": facts[k]["bytes"] for k in FILES})
    return metrics
