"""Integrity and safe loading: `status` flags an artifact that no longer matches its record, and every
pickle/yaml load in the project is a safe one. Shares test_faults.py's CLI helpers and its tiny run."""
from __future__ import annotations

import ast
import re

from tests.pipeline.test_faults import ROOT, run_cli, run_copy  # noqa: F401 - run_copy: the fixture


# ----------------------------------------------------------------------------- integrity and safe loading
def test_status_flags_an_artifact_that_no_longer_matches_its_record(run_copy):
    rd, cfg, _ = run_copy
    clean = run_cli("status", "-c", cfg, "--run-dir", str(rd))
    assert clean.code == 0 and "modified" not in clean.out and re.search(r"teacher\s.*done", clean.out), clean.out
    (rd / "merge" / "merge.json").write_text("{}")
    (rd / "teacher" / "notes.txt").write_text("added by hand")
    res = run_cli("status", "-c", cfg, "--run-dir", str(rd))
    assert res.code == 1 and "Traceback" not in res.out + res.err
    assert res.err.strip().splitlines()[-1].startswith("error: files of teacher, merge no longer match"), res.err
    rows = {ln.split("│")[1].strip(): ln for ln in res.out.splitlines() if ln.count("│") > 2}
    assert "modified" in rows["merge"] and "merge.json" in rows["merge"], res.out
    assert "modified" in rows["teacher"] and "notes.txt (unrecorded)" in rows["teacher"], res.out
    assert all("modified" not in rows[s] for s in ("data", "distill", "verify", "export")), res.out


_UNSAFE = {("pickle", "load"), ("pickle", "loads"), ("yaml", "load"), ("yaml", "unsafe_load"), ("marshal", "loads")}


def _unsafe_loads(tree: ast.AST) -> tuple[int, list[str]]:
    """(number of torch.load calls, the offending calls) in one module."""
    torch_loads, bad = 0, []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ast.unparse(node.func.value)
        kw = {k.arg: k.value for k in node.keywords}
        if node.func.attr == "load" and owner in ("torch", "torch.serialization"):
            torch_loads += 1
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                bad.append(f"line {node.lineno}: {ast.unparse(node)[:80]} (needs weights_only=True)")
        elif (owner, node.func.attr) in _UNSAFE or (owner in ("np", "numpy") and node.func.attr == "load"
                                                      and isinstance(kw.get("allow_pickle"), ast.Constant)
                                                      and kw["allow_pickle"].value):
            bad.append(f"line {node.lineno}: {ast.unparse(node)[:80]} (can run code from the file)")
    return torch_loads, bad


def test_every_load_is_weights_only():
    files = [p for p in ROOT.rglob("*.py") if not {".venv", "build", ".git"} & set(p.relative_to(ROOT).parts)]
    total, offenders = 0, []
    for f in files:
        n, bad = _unsafe_loads(ast.parse(f.read_text(encoding="utf-8"), filename=str(f)))
        total += n
        offenders += [f"{f.relative_to(ROOT)} {b}" for b in bad]
    assert total >= 2, "the scan found no torch.load at all: it is not looking at the source"
    assert not offenders, "unsafe loading:\n" + "\n".join(offenders)
    n, bad = _unsafe_loads(ast.parse("import torch\ntorch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)"))
    assert n == 2 and len(bad) == 3  # the scanner itself catches what it must
