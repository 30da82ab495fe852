"""Latency measurement that can resolve a few percent on a noisy machine (pure, no torch/onnxruntime).

The method (see /work/shared/TENSORRT.md, "Measuring inference cost unchanged"): time every model in
blocks of a few runs, interleave the blocks in a counterbalanced ABBA order so slow drifts of the machine
hit all models alike, compare medians of block means with a paired bootstrap confidence interval, and run
an A/A control (two instances of one model) in the same run: its interval is the noise floor.
Single-threaded work can also be timed by the CPU time of its thread, which other processes on a shared
machine cannot stretch (wall-clock intervals there are several times wider).
"""
from __future__ import annotations

import time
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

PERCENTILES = (90, 95, 99)


# ----------------------------------------------------------------------------- schedule
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


def abba_schedule(models: Sequence[str], blocks: int) -> list[list[str]]:
    """``blocks`` rounds; each round runs one block of every model, in a counterbalanced order.

    Rounds come in mirrored pairs (row, reversed row) of a Williams square: for two models this is
    A B | B A | B A | A B ..., i.e. ABBA then BAAB. Every pair of rounds gives each model the same mean
    position (a linear drift cancels); every ``2k`` rounds each model has held every position equally.
    """
    models = list(models)
    if len(set(models)) != len(models):
        raise ValueError(f"model names must be unique (got {models})")
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1 (got {blocks})")
    rows = williams_rows(len(models))
    rounds: list[list[str]] = []
    r = 0
    while len(rounds) < blocks:
        row = rows[r % len(rows)]
        rounds.append([models[i] for i in row])
        if len(rounds) < blocks:
            rounds.append([models[i] for i in reversed(row)])
        r += 1
    return rounds


def schedule_period(k: int) -> int:
    """Rounds after which every one of ``k`` models has held every position equally often."""
    return 1 if k == 1 else 2 * k


# ----------------------------------------------------------------------------- running
class Interleaved(NamedTuple):
    """Per model: the mean of each block (ms, in round order) and every raw sample (ms), by wall clock;
    the same by CPU clock when the block functions measured one (empty dicts otherwise)."""

    block_means: dict[str, list[float]]
    samples: dict[str, list[float]]
    cpu_block_means: dict[str, list[float]]
    cpu_samples: dict[str, list[float]]


# runs n timed inferences; returns n latencies in ms, or {"wall": [...], "cpu": [...]}
BlockFn = Callable[[int], "Sequence[float] | Mapping[str, Sequence[float]]"]


def timed_block(fn: Callable[[], None], timer: Callable[[], float] = time.perf_counter,
                cpu_timer: Callable[[], float] | None = None) -> BlockFn:
    """Wrap a one-inference callable as a block function timed with ``timer`` (seconds).

    With ``cpu_timer`` (e.g. ``time.thread_time`` for work that runs on the calling thread) each run is
    also timed in CPU seconds, which other processes on a busy machine cannot stretch.
    """

    def block(n: int) -> list[float] | dict[str, list[float]]:
        wall, cpu = [], []
        for _ in range(n):
            c0 = cpu_timer() if cpu_timer is not None else 0.0
            t0 = timer()
            fn()
            wall.append((timer() - t0) * 1e3)
            if cpu_timer is not None:
                cpu.append((cpu_timer() - c0) * 1e3)
        return wall if cpu_timer is None else {"wall": wall, "cpu": cpu}

    return block


def _split_clocks(name: str, out: Sequence[float] | Mapping[str, Sequence[float]], n: int) -> dict[str, list[float]]:
    clocks = {k: list(map(float, v)) for k, v in out.items()} if isinstance(out, Mapping) else {"wall": list(map(float, out))}
    for clock, ms in clocks.items():
        if len(ms) != n:
            raise RuntimeError(f"block of {name!r} returned {len(ms)} {clock} samples, expected {n}")
    return clocks


def run_interleaved_blocks(block_fns: dict[str, BlockFn], *, warmup: int, blocks: int, block_runs: int,
                           on_round: Callable[[int], None] | None = None) -> Interleaved:
    """Warm every model up, then run ``blocks`` ABBA rounds of ``block_runs`` runs per model.

    Block functions time themselves (wall clock, CPU clock, CUDA events, a TensorRT runner ...), so
    devices whose clocks differ share one schedule.
    """
    if block_runs < 1:
        raise ValueError(f"block_runs must be >= 1 (got {block_runs})")
    names = list(block_fns)
    if warmup > 0:
        for name in names:
            block_fns[name](warmup)
    means: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    samples: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    for i, round_ in enumerate(abba_schedule(names, blocks)):
        for name in round_:
            for clock, ms in _split_clocks(name, block_fns[name](block_runs), block_runs).items():
                means.setdefault(clock, {}).setdefault(name, []).append(float(np.mean(ms)))
                samples.setdefault(clock, {}).setdefault(name, []).extend(ms)
        if on_round is not None:
            on_round(i)
    cpu_ok = all(means["cpu"][n] for n in names)
    return Interleaved(means["wall"], samples["wall"], means["cpu"] if cpu_ok else {}, samples["cpu"] if cpu_ok else {})


def run_interleaved(callables: dict[str, Callable[[], None]], *, warmup: int, blocks: int, block_runs: int,
                    timer: Callable[[], float] = time.perf_counter,
                    cpu_timer: Callable[[], float] | None = None) -> Interleaved:
    """Time one-inference callables with ``timer`` (seconds) in interleaved ABBA blocks."""
    return run_interleaved_blocks({n: timed_block(f, timer, cpu_timer) for n, f in callables.items()},
                                  warmup=warmup, blocks=blocks, block_runs=block_runs)


# ----------------------------------------------------------------------------- statistics
def summarize(samples_ms: Sequence[float], batch_size: int = 1) -> dict[str, float]:
    """Median, mean, std, min, max, p90/p95/p99 (ms, linear interpolation) and throughput (items/s)."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no samples to summarize")
    med = float(np.median(a))
    out = {"n": int(a.size), "median_ms": med, "mean_ms": float(a.mean()), "std_ms": float(a.std()),
           "min_ms": float(a.min()), "max_ms": float(a.max())}
    for p in PERCENTILES:
        out[f"p{p}_ms"] = float(np.percentile(a, p))
    out["throughput_per_s"] = batch_size * 1e3 / med if med > 0 else float("inf")
    return out


def ratio_ci(a_blocks: Sequence[float], b_blocks: Sequence[float], n_boot: int = 2000, seed: int = 0,
             paired: bool = True, level: float = 0.95) -> tuple[float, float, float]:
    """``median(b) / median(a)`` with a percentile-bootstrap CI (b is the candidate, a the reference).

    Paired: blocks with the same index ran in the same round, so they are resampled together, which
    removes the machine's slow drifts from the interval.
    """
    a = np.asarray(a_blocks, dtype=np.float64)
    b = np.asarray(b_blocks, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("ratio_ci needs samples on both sides")
    if paired and a.size != b.size:
        raise ValueError(f"paired bootstrap needs equal block counts (got {a.size} and {b.size})")
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, a.size, size=(n_boot, a.size))
    ib = ia if paired else rng.integers(0, b.size, size=(n_boot, b.size))
    boot = np.median(b[ib], axis=1) / np.median(a[ia], axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return float(np.median(b) / np.median(a)), float(lo), float(hi)


def verdict(lo: float, hi: float, band: float) -> bool:
    """True when the whole interval [lo, hi] lies inside 1 +- band ("cost unchanged")."""
    if not 0 < band < 1:
        raise ValueError(f"band must be in (0, 1) (got {band})")
    return (1 - band) <= lo <= hi <= (1 + band)


def compare(block_means: dict[str, list[float]], pairs: Sequence[tuple[str, str, str]], *, n_boot: int,
            seed: int) -> dict[str, dict]:
    """For each ``(label, candidate, reference)`` whose models were timed: ratio of medians and its CI."""
    out = {}
    for label, cand, ref in pairs:
        if cand in block_means and ref in block_means:
            r, lo, hi = ratio_ci(block_means[ref], block_means[cand], n_boot=n_boot, seed=seed)
            out[label] = {"ratio": r, "lo": lo, "hi": hi, "candidate": cand, "reference": ref}
    return out


def measure(block_fns: dict[str, BlockFn], *, batch_size: int, pairs: Sequence[tuple[str, str, str]], warmup: int,
            blocks: int, block_runs: int, n_boot: int, seed: int) -> dict:
    """Interleaved timing plus statistics, JSON-ready: per model a wall-clock summary (+ ``cpu`` one when
    measured) with its block means, and ``comparisons`` (+ ``cpu_comparisons``) from :func:`compare`."""
    res = run_interleaved_blocks(block_fns, warmup=warmup, blocks=blocks, block_runs=block_runs)
    cell: dict = {"batch": batch_size, "models": {}}
    for n, samples in res.samples.items():
        cell["models"][n] = {**summarize(samples, batch_size), "block_means_ms": res.block_means[n]}
        if res.cpu_samples:
            cell["models"][n]["cpu"] = {**summarize(res.cpu_samples[n], batch_size), "block_means_ms": res.cpu_block_means[n]}
    cell["comparisons"] = compare(res.block_means, pairs, n_boot=n_boot, seed=seed)
    if res.cpu_block_means:
        cell["cpu_comparisons"] = compare(res.cpu_block_means, pairs, n_boot=n_boot, seed=seed)
    return cell
