"""The one progress display: the columns each kind of loop asks for, and that every long loop uses it."""
from __future__ import annotations

import ast
from pathlib import Path

from rich.progress import TextColumn, TimeRemainingColumn

from stages.lib.progress import progress_bar

ROOT = Path(__file__).resolve().parents[2]


def _kinds(p):
    return [type(c).__name__ for c in p.columns]


def test_columns_follow_the_flags():
    plain = progress_bar()
    assert _kinds(plain) == ["TextColumn", "BarColumn", "MofNCompleteColumn", "TimeElapsedColumn"]
    full = progress_bar(eta=True, info=True, disable=True)
    assert isinstance(full.columns[-2], TimeRemainingColumn) and isinstance(full.columns[-1], TextColumn)
    assert full.columns[-1].text_format == "{task.fields[info]}" and full.disable
    with progress_bar(info=True) as p:  # the info field is filled by the loop
        task = p.add_task("epoch 1", total=3, info="")
        p.update(task, advance=1, info="loss=0.5")
        assert p.tasks[0].fields["info"] == "loss=0.5" and p.tasks[0].completed == 1


def test_no_module_builds_its_own_rich_progress():
    """Five copies of the same Progress(...) became stages/lib/progress.py; keep it one."""
    offenders = []
    for folder in ("pipeline", "stages", "scripts", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == ROOT / "stages/lib/progress.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module == "rich.progress":
                    offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
