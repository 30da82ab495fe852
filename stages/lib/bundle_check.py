"""Is a bundle intact, and can its engines run here? ``verify_bundle`` on a bundle folder or its .tar.gz.

Used by ``norm-pipeline bundle verify`` (pipeline/cli.py). Each finding is a ``Problem`` with a severity:
``error`` (a missing, modified, unlisted or unsafe file; a broken manifest; a failed self-test) means do not
deploy; ``warning`` (an engine built for another TensorRT/GPU, no TensorRT or onnxruntime here to check
with) means the bundle is intact but this machine could not confirm everything. ``str(problem)`` is the line
users see: warnings start with ``warning: ``.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from stages.lib.errors import PipelineError
from stages.lib.io import sha256_file
from stages.lib.tarball import safe_extract

UNLISTED = ("manifest.json", "SHA256SUMS")  # the manifest describes the others; SHA256SUMS covers manifest.json too


@dataclass(frozen=True)
class Problem:
    """One finding of ``verify_bundle``."""

    severity: Literal["error", "warning"]
    message: str

    def __post_init__(self) -> None:
        if self.severity not in ("error", "warning"):
            raise ValueError(f"Problem severity must be 'error' or 'warning', not {self.severity!r}")

    def __str__(self) -> str:
        return f"warning: {self.message}" if self.severity == "warning" else self.message


def error(message: str) -> Problem:
    return Problem("error", message)


def warning(message: str) -> Problem:
    return Problem("warning", message)


def integrity_errors(problems: list[Problem]) -> list[Problem]:
    """The integrity failures among ``problems`` (the warnings left out)."""
    return [p for p in problems if p.severity == "error"]


def verify_bundle(path: Path | str, selftest: bool = False) -> list[Problem]:
    """Problems with a bundle folder or its .tar.gz; ``[]`` means intact.

    Problems of severity ``warning`` are not integrity failures: an engine that will not load on this
    machine (other TensorRT/GPU), or that cannot be checked because TensorRT is absent here. With
    ``selftest``, an intact bundle's own ``run_onnx.py --selftest`` also runs for every shipped ONNX precision.
    """
    path = Path(path)
    if path.is_file():
        with tempfile.TemporaryDirectory(prefix="norm-bundle-") as tmp:
            unsafe = safe_extract(path, Path(tmp))
            if unsafe:
                return [error(m) for m in unsafe]
            tops = list(Path(tmp).iterdir())
            return _verify_folder(tops[0] if len(tops) == 1 and tops[0].is_dir() else Path(tmp), selftest)
    if not path.is_dir():
        return [error(f"{path} does not exist")]
    return _verify_folder(path, selftest)


def _verify_folder(root: Path, selftest: bool = False) -> list[Problem]:
    mpath = root / "manifest.json"
    if not mpath.is_file():
        return [error(f"manifest.json missing in {root}")]
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, OSError) as e:
        return [error(f"manifest.json is not readable JSON ({e})")]
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        return [error("manifest.json lists no files")]
    problems: list[Problem] = []
    for name, entry in sorted(files.items()):
        p, f = PurePosixPath(name), root / name
        if p.is_absolute() or ".." in p.parts:
            problems.append(error(f"manifest lists an unsafe path: {name}"))
        elif not f.is_file():
            problems.append(error(f"missing file: {name}"))
        elif f.stat().st_size != entry.get("bytes"):
            problems.append(error(f"size mismatch: {name} is {f.stat().st_size} bytes, the manifest says {entry.get('bytes')}"))
        elif sha256_file(f) != entry.get("sha256"):
            problems.append(error(f"sha256 mismatch: {name} was modified or is corrupt"))
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            problems.append(error(f"symbolic link in bundle: {rel}"))
        elif p.is_file() and rel not in files and rel not in UNLISTED:
            problems.append(error(f"unlisted file: {rel}"))
    sums = root / "SHA256SUMS"
    if sums.is_file():
        listed = dict(reversed(line.split(None, 1)) for line in sums.read_text().splitlines() if line.strip())
        if listed.get("manifest.json") != sha256_file(mpath):
            problems.append(error("manifest.json does not match SHA256SUMS (edited after bundling?)"))
    problems += engine_checks(root, manifest)
    if selftest and not integrity_errors(problems):
        problems += selftest_bundle(root, manifest)
    return problems


def engine_checks(root: Path, manifest: dict) -> list[Problem]:
    """Warnings about engines this machine cannot load or check; a missing sidecar is a real problem."""
    engines = manifest.get("engines") or []
    if not engines:
        return []
    from stages.lib import trt_env, trt_rules

    info, out = trt_env.runtime_info(), []
    for e in engines:
        try:
            side = trt_rules.load_sidecar(root / e.get("sidecar", ""))
        except PipelineError as err:
            out.append(error(str(err)))
            continue
        if not info["tensorrt_version"]:
            out.append(warning(f"TensorRT is not installed here, so {side.get('plan')} (TensorRT "
                       f"{side.get('tensorrt_version')}, {side.get('gpu_name')}, compute capability "
                       f"{side.get('compute_capability')}) was not checked against this machine"))
            continue
        try:
            trt_rules.check_compatibility(side, info)
        except PipelineError as err:
            out.append(warning(str(err)))
    return out


def selftest_bundle(root: Path, manifest: dict) -> list[Problem]:
    """The bundle's own ``run_onnx.py --selftest`` per shipped ONNX precision, in a fresh Python process."""
    import importlib.util
    import subprocess
    import sys

    if not (manifest.get("selftest") or {}).get("golden"):
        return [warning("this bundle has no golden self-test (made by an older norm-pipeline, or an image-folder dataset)")]
    if importlib.util.find_spec("onnxruntime") is None:
        return [warning("onnxruntime is not installed here, so the ONNX self-test did not run")]
    out = []
    for row in manifest.get("precisions") or [{"precision": "fp32", "file": "model.onnx"}]:
        if not row.get("file") or not str(row["file"]).endswith(".onnx"):
            continue
        cmd = [sys.executable, str(root / "run_onnx.py"), "--selftest", "--precision", row["precision"],
               "--manifest", str(root / "manifest.json")]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=root)
        except subprocess.TimeoutExpired:
            out.append(error(f"self-test ({row['precision']}) did not finish within 15 minutes"))
            continue
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["(no output)"])[-1].removeprefix("error: ")
            out.append(error(f"self-test ({row['precision']}): {last}"))
    return out
