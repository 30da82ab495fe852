"""The order of timing rounds (stages.lib.timing): mirrored Williams rows, so that a linear drift of the machine's
speed hits every model alike and every model holds every position equally often (docs/latency.md)."""
from __future__ import annotations

import itertools
from typing import Iterator, Sequence


def williams_rows(k: int) -> list[list[int]]:
    """A Latin square of order k whose first row is 0, 1, k-1, 2, k-2, ... (Williams' construction).

    Every index sits at every position once; with its mirror rows it is balanced for first-order
    carry-over (which model ran just before) for odd k as well.
    """
    if k < 1:
        raise ValueError(f"need at least one model (got {k})")
    first, lo, hi = [0], 1, k - 1
    while len(first) < k:
        first.append(lo)
        lo += 1
        if len(first) < k:
            first.append(hi)
            hi -= 1
    return [[(v + r) % k for v in first] for r in range(k)]


def iter_schedule(models: Sequence[str]) -> Iterator[list[str]]:
    """Rounds without end; each runs one block of every model, in a counterbalanced order.

    Rounds come in mirrored pairs (row, reversed row) of a Williams square: for two models this is
    A B | B A | B A | A B ..., i.e. ABBA then BAAB. Every pair of rounds gives each model the same mean
    position (a linear drift cancels); every ``2k`` rounds each model has held every position equally.
    """
    models = list(models)
    if len(set(models)) != len(models):
        raise ValueError(f"model names must be unique (got {models})")
    rows = williams_rows(len(models))
    for r in itertools.count():
        row = rows[r % len(rows)]
        yield [models[i] for i in row]
        yield [models[i] for i in reversed(row)]


def abba_schedule(models: Sequence[str], blocks: int) -> list[list[str]]:
    """The first ``blocks`` rounds of :func:`iter_schedule`."""
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1 (got {blocks})")
    return list(itertools.islice(iter_schedule(models), blocks))


def schedule_period(k: int) -> int:
    """Rounds after which every one of ``k`` models has held every position equally often."""
    return 1 if k == 1 else 2 * k
