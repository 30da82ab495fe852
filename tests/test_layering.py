"""Nothing imports a stage module (stages/<name>.py) except the runner machinery.

A stage module is the stage's orchestration; code anyone else needs (the CLI, benchmarks, other stages, tests of
a helper) lives in stages/lib. pipeline/graph.py loads stage modules by their path (``StageSpec.load``,
``stage_module``); tests that exercise a stage's ``run()`` (or patch what ``run()`` uses) reach the module through
``pipeline.graph.stage_module(name)``, the runner's own loader, never by an import statement.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.graph import STAGES

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("pipeline", "stages", "benchmarks", "scripts", "tests")
ALLOWED = {"pipeline/graph.py"}  # the runner machinery: imports stage modules by the path in each StageSpec
STAGE_MODULES = {s.module for s in STAGES}  # "stages.data", ..., "stages.bundle"
STAGE_NAMES = {m.split(".", 1)[1] for m in STAGE_MODULES}


def stage_imports(source: str) -> list[tuple[int, str]]:
    """(line, what) for every import of a stage module in ``source``: ``import stages.x``, ``from stages.x import y``,
    ``from stages import x``, and ``importlib.import_module("stages.x")`` / ``__import__("stages.x")``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if _is_stage(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if _is_stage(node.module):
                found.append((node.lineno, node.module))
            elif node.module == "stages":
                found += [(node.lineno, f"stages.{a.name}") for a in node.names if a.name in STAGE_NAMES]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            arg = node.args[0].value
            if fn in ("import_module", "__import__") and isinstance(arg, str) and _is_stage(arg):
                found.append((node.lineno, arg))
    return found


def _is_stage(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in STAGE_MODULES)


def python_files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def test_no_code_imports_a_stage_module_except_the_runner():
    offenders = [f"{p.relative_to(ROOT).as_posix()}:{line}: imports {what}"
                 for p in python_files() if p.relative_to(ROOT).as_posix() not in ALLOWED
                 for line, what in stage_imports(p.read_text(encoding="utf-8"))]
    assert not offenders, ("stage modules are reached only through the runner (pipeline.graph.stage_module in tests of "
                           "run()); move shared code to stages/lib:\n" + "\n".join(offenders))


def test_the_scan_covers_every_stage_and_the_repository():
    assert STAGE_NAMES == {"data", "teacher", "baseline", "distill", "merge", "verify", "export", "quantize", "engine",
                           "benchmark", "bundle"}
    scanned = {p.relative_to(ROOT).as_posix() for p in python_files()}
    assert {"pipeline/cli.py", "benchmarks/inference_latency.py", "tests/conftest.py", "scripts/mutate.py"} <= scanned


@pytest.mark.parametrize("source", [
    "import stages.bundle", "import stages.engine as e", "from stages.benchmark import flat_metrics",
    "from stages import data", "from stages import lib, merge", "def f():\n    from stages.verify import failures",
    "import importlib\nimportlib.import_module('stages.export')", "__import__('stages.quantize')",
])
def test_the_scan_sees_every_form_of_import(source):
    assert stage_imports(source), source


@pytest.mark.parametrize("source", [
    "from stages.lib import trt_env", "import stages.lib.latency", "from stages.lib.bundle_check import verify_bundle",
    "from pipeline.graph import stage_module\nstage_module('bundle')", "import stages", "x = 'stages.bundle'",
])
def test_the_scan_allows_the_shared_library_and_the_runner(source):
    assert stage_imports(source) == [], source
