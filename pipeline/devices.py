"""Device reports coming back from the edge: validate against the run's bundle, store, list for the report.

A report (``run_onnx.py --report`` / ``run_trt.py --report``) names the sha256 of the bundle's model.onnx and
of the file it ran. It is accepted only when both belong to this run's bundle (an engine built on the
device is accepted through the sha256 of the ONNX it was built from), and is stored as
``<run>/devices/<device>-<runner>-<precision>.json``: outside every stage folder, so stage records stay
intact, and one file per device and configuration (ingesting it again replaces it).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pipeline.graph import artifact_path
from stages.lib.errors import PipelineError
from stages.lib.io import atomic_write_text

REPORT_FORMAT = "norm-pipeline/device-report/1"  # the same string as the bundle's edgekit.REPORT_FORMAT
FOLDER = "devices"


def _bundle_manifest(run_dir: Path) -> dict:
    path = artifact_path(run_dir, "bundle", "bundle") / "manifest.json"
    if not path.is_file():
        raise PipelineError(f"{run_dir} has no bundle (no {path.relative_to(run_dir)}); ingest device reports into the "
                            "run directory that made the bundle (--run-dir), or run `norm-pipeline stage bundle` first")
    return json.loads(path.read_text())


def _load(path: Path) -> dict:
    try:
        rep = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PipelineError(f"{path} is not a readable JSON device report ({type(e).__name__}); pass the file written by "
                            "`run_onnx.py --report` or `run_trt.py --report`") from None
    if not isinstance(rep, dict) or rep.get("format") != REPORT_FORMAT:
        raise PipelineError(f"{path} is not a norm-pipeline device report (format {rep.get('format') if isinstance(rep, dict) else None!r}, "
                            f"expected {REPORT_FORMAT!r}); pass the file written by `run_onnx.py --report`")
    for key in ("bundle", "artifact", "device", "latency"):
        if not isinstance(rep.get(key), (dict, list)):
            raise PipelineError(f"{path} is an incomplete device report: {key!r} is missing; write it again with --report")
    return rep


def validate(rep: dict, manifest: dict, name: str = "the report") -> None:
    """Raise when ``rep`` was not made with this bundle's model."""
    files = manifest.get("files") or {}
    ours = (files.get((manifest.get("model") or {}).get("onnx", "model.onnx")) or {}).get("sha256")
    theirs = (rep.get("bundle") or {}).get("model_onnx_sha256")
    if not ours or theirs != ours:
        raise PipelineError(f"{name} belongs to another bundle: its model.onnx sha256 is {str(theirs)[:16]}…, this run's "
                            f"is {str(ours)[:16]}…; ingest it into the run that made that bundle (--run-dir)")
    art = rep.get("artifact") or {}
    known = {e.get("sha256") for e in files.values()}
    if art.get("sha256") not in known and art.get("source_onnx_sha256") not in known:
        raise PipelineError(f"{name} ran {art.get('file')!r} (sha256 {str(art.get('sha256'))[:16]}…), which is not a file of "
                            "this bundle nor an engine built from one of its ONNX files; refusing it")


def _slug(rep: dict) -> str:
    dev = rep.get("device") or {}
    name = dev.get("gpu_name") or (dev.get("jetson") or {}).get("board") or dev.get("cpu") or dev.get("machine") or "device"
    parts = [name, (rep.get("runner") or "runner").removesuffix(".py"), (rep.get("artifact") or {}).get("precision") or "fp32",
             ",".join((rep.get("backend") or {}).get("providers") or [])[:40]]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(p for p in parts if p)).strip("-").lower()[:120]


def ingest(path: Path, run_dir: Path) -> tuple[Path, str]:
    """Validate ``path`` against the run's bundle and store it; returns (stored path, one-line summary)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PipelineError(f"run directory {run_dir} does not exist; pass --run-dir")
    rep = _load(Path(path))
    validate(rep, _bundle_manifest(run_dir), str(path))
    dest = run_dir / FOLDER / f"{_slug(rep)}.json"
    atomic_write_text(dest, json.dumps(rep, indent=2, default=str) + "\n")
    st = rep.get("selftest") or {}
    lat = rep.get("latency") or []
    first = f"p50 {lat[0]['p50_ms']:.3f} ms at batch {lat[0]['batch']}" if lat else "no latency"
    verdict = {True: "passed", False: "FAILED", None: "not run"}.get(st.get("ok"), "not run")
    return dest, f"{rep['artifact'].get('precision')} {rep['artifact'].get('file')}, self-test {verdict}, {first}"


def load_reports(run_dir: Path) -> list[dict[str, Any]]:
    """Ingested reports still valid for the run's current bundle (a rebuilt bundle makes old ones stale)."""
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return []
    try:
        manifest = _bundle_manifest(Path(run_dir))
    except (PipelineError, ValueError, OSError):
        manifest = None
    out = []
    for p in sorted(folder.glob("*.json")):
        try:
            rep = _load(p)
        except PipelineError:
            continue
        stale = None
        if manifest is not None:
            try:
                validate(rep, manifest)
            except PipelineError as e:
                stale = str(e)
        out.append({**rep, "_file": p.name, "_stale": stale})
    return out
