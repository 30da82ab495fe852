"""The one progress display of every long loop: training epochs, evaluations, exports, parity checks, timings.

A transient rich bar (it disappears when the loop ends, leaving the stage's own log lines): description,
bar, done/total, elapsed; ``eta=True`` adds the remaining time, ``info=True`` a free text field that the
loop sets with ``progress.update(task, info=...)`` (training shows its running losses and the run's ETA there).
"""
from __future__ import annotations

from typing import Any, Optional


def progress_bar(*, eta: bool = False, info: bool = False, disable: bool = False, console: Optional[Any] = None):
    """A ``rich.progress.Progress`` with the project's columns; use it as a context manager."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns: list[ProgressColumn | str] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                           TimeElapsedColumn()]
    if eta:
        columns.append(TimeRemainingColumn())
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    return Progress(*columns, disable=disable, transient=True, console=console)
