"""Bundle and engine faults through the real CLI (`bundle verify`): a tampered or unsafe bundle fails with one
`error: ` line and exit 1; an engine built for another machine is a warning, or a failure with --strict. Shares
test_faults.py's CLI helpers and its tiny run."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.pipeline.test_faults import ROOT, failed_cleanly, run_cli, run_copy  # noqa: F401 - run_copy: the fixture


# ----------------------------------------------------------------------------- bundles and engines
def _bundle(run_copy) -> Path:
    return run_copy[0] / "bundle" / "bundle"


@pytest.mark.parametrize("case", ["folder-file-edited", "tarball-member-edited", "tarball-truncated"])
def test_tampered_bundle(run_copy, tmp_path, case):
    from stages.lib.tarball import make_tarball

    folder = _bundle(run_copy)
    target = folder
    if case == "tarball-truncated":
        target = tmp_path / "bundle.tar.gz"
        target.write_bytes((folder.parent / "bundle.tar.gz").read_bytes()[:50_000])
        needles = [r"is not a readable tar archive \(Compressed file ended"]
    else:
        onnx = folder / "model.onnx"
        onnx.write_bytes(onnx.read_bytes()[:-1] + b"\x00")
        needles = [r"sha256 mismatch: model\.onnx was modified or is corrupt"]
        if case == "tarball-member-edited":
            target = make_tarball(folder, tmp_path / "bundle.tar.gz")
    assert run_cli("bundle", "verify", str(folder.parent / "bundle.tar.gz")).code == 0  # the original is fine
    failed_cleanly(run_cli("bundle", "verify", str(target)), *needles, r"do not deploy it", code=1)


def _add_engine(bundle: Path) -> None:
    """A (fake) TensorRT 10.3 engine for compute capability 8.7, listed and hashed like the bundle stage does."""
    from stages.lib import trt_rules
    from stages.lib.io import sha256_file

    plan = bundle / "model_fp32.plan"
    plan.write_bytes(b"not really a plan")
    side = trt_rules.make_sidecar(plan_path=plan, onnx_path=bundle / "model.onnx", precision="fp32", fp16_mode=None,
                            tensorrt_version="10.3.0.26", gpu={"name": "Jetson AGX Orin", "compute_capability": "8.7"},
                            profile={"input": "input", "min": [1, 1, 28, 28], "opt": [8, 1, 28, 28], "max": [64, 1, 28, 28]},
                            hardware_compatibility="none", inputs=[], outputs=[], build_seconds=1.0,
                            optimization_level=3, workspace_mb=1024)
    (bundle / "model_fp32.json").write_text(json.dumps(side))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["engines"] = [{"plan": plan.name, "sidecar": "model_fp32.json", "precision": "fp32"}]
    for name in (plan.name, "model_fp32.json"):
        manifest["files"][name] = {"sha256": sha256_file(bundle / name), "bytes": (bundle / name).stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    sums = {**{n: e["sha256"] for n, e in manifest["files"].items()}, "manifest.json": sha256_file(bundle / "manifest.json")}
    (bundle / "SHA256SUMS").write_text("".join(f"{h}  {n}\n" for n, h in sorted(sums.items())))


def _fake_machine(root: Path, trt_version: str, gpu: tuple[str, int, int] | None) -> dict:
    """PYTHONPATH with a stand-in `tensorrt` (its version only) and, optionally, cuda-python reporting a GPU."""
    (root / "tensorrt").mkdir(parents=True)
    (root / "tensorrt" / "__init__.py").write_text(f"__version__ = {trt_version!r}\n")
    if gpu:
        (root / "cuda" / "bindings").mkdir(parents=True)
        (root / "cuda" / "__init__.py").write_text("")
        (root / "cuda" / "bindings" / "__init__.py").write_text("")
        (root / "cuda" / "bindings" / "runtime.py").write_text(
            "class cudaError_t:\n    cudaSuccess = 0\n\n\nclass _Props:\n"
            f"    name, major, minor = {gpu[0].encode()!r}, {gpu[1]}, {gpu[2]}\n\n\n"
            "def cudaGetDeviceCount():\n    return 0, 1\n\n\n"
            "def cudaGetDeviceProperties(device):\n    return 0, _Props()\n")
    return {"PYTHONPATH": os.pathsep.join([str(root), str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("trt_version, gpu, needles", [
    ("10.8.0", None, [r"built with TensorRT 10\.3\.0\.26 but this machine has TensorRT 10\.8\.0",
                      r"rebuild the engine with trtexec on the device"]),
    ("10.3.1", None, [r"built with TensorRT 10\.3\.0\.26 but this machine has TensorRT 10\.3\.1",
                      r"only on the exact version that built it"]),  # a patch release apart is refused too
    ("10.3.0.26", ("Tesla T4", 7, 5), [r"built for compute capability 8\.7 \(Jetson AGX Orin\) but this GPU \(Tesla T4\) has 7\.5",
                                       r"rebuild the engine"]),
], ids=["other-tensorrt", "other-patch", "other-gpu"])
def test_engine_for_another_machine(run_copy, tmp_path, trt_version, gpu, needles):
    bundle = _bundle(run_copy)
    _add_engine(bundle)
    env = _fake_machine(tmp_path / "fake", trt_version, gpu)
    lenient = run_cli("bundle", "verify", str(bundle), env=env)
    assert lenient.code == 0 and "warning: model_fp32.plan" in lenient.err  # intact bundle, engine for elsewhere
    failed_cleanly(run_cli("bundle", "verify", "--strict", str(bundle), env=env),
                   r"is intact, but an engine cannot run on this machine: model_fp32\.plan", *needles, code=1)
