"""Latency measurement that can resolve a few percent on a noisy machine (pure, no torch/onnxruntime).

The method, for users, with its sources: docs/latency.md. In short: every model runs one block of a few
runs per round, in a counterbalanced order (mirrored Williams rows, so a linear drift hits all models
alike); the statistic is the per-round log ratio candidate/reference, summarised by its median (or its
Hodges-Lehmann estimate) with a bootstrap CI over rounds, so a change of the machine's speed between rounds cancels
instead of widening the interval. An A/A control (two instances of one model) in the same run is the
noise floor. Rounds are added until the interval is narrow enough or a time budget is spent
(:func:`measure_adaptive`), and :func:`decide` answers yes / no / inconclusive, never a false yes or no.
Single-threaded work can also be timed by the CPU time of its thread, which other processes on a shared
machine cannot stretch.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

# the counterbalanced order of the rounds, part of this module's API (timing.abba_schedule, ...)
from stages.lib.schedule import abba_schedule, iter_schedule, schedule_period, williams_rows  # noqa: F401

PERCENTILES = (90, 95, 99)


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


class _Recorder:
    """Block means and samples per clock and model, as rounds come in."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.means: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
        self.samples: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}

    def add(self, name: str, out: Sequence[float] | Mapping[str, Sequence[float]], n: int) -> None:
        for clock, ms in _split_clocks(name, out, n).items():
            self.means.setdefault(clock, {}).setdefault(name, []).append(float(np.mean(ms)))
            self.samples.setdefault(clock, {}).setdefault(name, []).extend(ms)

    def result(self) -> Interleaved:
        cpu_ok = all(self.means["cpu"][n] for n in self.names)
        return Interleaved({n: list(v) for n, v in self.means["wall"].items()},
                           {n: list(v) for n, v in self.samples["wall"].items()},
                           {n: list(v) for n, v in self.means["cpu"].items()} if cpu_ok else {},
                           {n: list(v) for n, v in self.samples["cpu"].items()} if cpu_ok else {})


def _start(block_fns: dict[str, BlockFn], warmup: int, block_runs: int) -> _Recorder:
    if block_runs < 1:
        raise ValueError(f"block_runs must be >= 1 (got {block_runs})")
    if warmup > 0:
        for name in block_fns:
            block_fns[name](warmup)
    return _Recorder(list(block_fns))


def run_interleaved_blocks(block_fns: dict[str, BlockFn], *, warmup: int, blocks: int, block_runs: int,
                           on_round: Callable[[int], None] | None = None) -> Interleaved:
    """Warm every model up, then run ``blocks`` ABBA rounds of ``block_runs`` runs per model.

    Block functions time themselves (wall clock, CPU clock, CUDA events, a TensorRT runner ...), so
    devices whose clocks differ share one schedule.
    """
    rec = _start(block_fns, warmup, block_runs)
    for i, round_ in enumerate(abba_schedule(rec.names, blocks)):
        for name in round_:
            rec.add(name, block_fns[name](block_runs), block_runs)
        if on_round is not None:
            on_round(i)
    return rec.result()


def run_adaptive(block_fns: dict[str, BlockFn], *, warmup: int, block_runs: int, min_rounds: int,
                 max_seconds: float, stop: Callable[[Interleaved], bool], max_rounds: int | None = None,
                 on_round: Callable[[int], None] | None = None,
                 timer: Callable[[], float] = time.perf_counter) -> tuple[Interleaved, dict]:
    """ABBA rounds until ``stop(result so far)`` holds, ``max_seconds`` (by ``timer``, warm-up included) are
    spent or ``max_rounds`` ran; never fewer than ``min_rounds``, and always a whole mirrored pair.

    ``stop`` is asked after ``min_rounds`` and then every ~10% more rounds (it may bootstrap), so its
    cost stays small next to the timing. Returns the timings and ``{rounds, seconds, stopped}``.
    """
    t0 = timer()
    rec = _start(block_fns, warmup, block_runs)
    min_rounds = max(2, min_rounds + min_rounds % 2)
    next_check, stopped, n = min_rounds, "", 0
    for i, round_ in enumerate(iter_schedule(rec.names)):
        for name in round_:
            rec.add(name, block_fns[name](block_runs), block_runs)
        if on_round is not None:
            on_round(i)
        n = i + 1
        if n % 2 or n < min_rounds:
            continue
        if n >= next_check:
            if stop(rec.result()):
                stopped = "precision reached"
                break
            next_check = n + max(2, n // 20 * 2)
        if timer() - t0 >= max_seconds:
            stopped = "time limit"
            break
        if max_rounds is not None and n >= max_rounds:
            stopped = "round limit"
            break
    return rec.result(), {"rounds": n, "seconds": timer() - t0, "stopped": stopped}


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

    The ratio of medians of block means (the training benchmarks use it); latency verdicts use the per-round
    :func:`paired_ratio`, which a change of machine speed during the run cannot bias.

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


def _hl_rows(x: np.ndarray) -> np.ndarray:
    """Hodges-Lehmann estimate (median of all pairwise means, i <= j) of every row of ``x``."""
    i, j = np.triu_indices(x.shape[1])
    out = np.empty(x.shape[0])
    step = max(1, 2_000_000 // len(i))  # bounded memory however many rounds ran
    for s in range(0, x.shape[0], step):
        c = x[s : s + step]
        out[s : s + step] = np.median((c[:, i] + c[:, j]) * 0.5, axis=1)
    return out


def hodges_lehmann(x: Sequence[float]) -> float:
    """Median of the Walsh averages: nearly as efficient as the mean on normal data, robust like the median."""
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no values")
    return float(_hl_rows(a[None, :])[0])


ESTIMATORS = {"hl": _hl_rows, "median": lambda x: np.median(x, axis=1)}


def paired_ratio(ref_blocks: Sequence[float], cand_blocks: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95, estimator: str = "median") -> dict:
    """Candidate/reference cost from per-round pairs: ``exp(estimate of log(cand_i / ref_i))`` and a
    percentile-bootstrap CI that resamples rounds.

    Blocks with the same index ran in the same round, back to back, so a change of the machine's speed
    between rounds scales both and cancels in their ratio. ``estimator``: "median" (the default: its bootstrap
    costs O(rounds) per resample) or "hl" (Hodges-Lehmann: ~1.5x more efficient on normal data, but its bootstrap
    costs O(rounds^2) per resample, seconds beyond ~100 rounds).
    """
    ref = np.asarray(ref_blocks, dtype=np.float64)
    cand = np.asarray(cand_blocks, dtype=np.float64)
    if ref.size == 0 or ref.size != cand.size:
        raise ValueError(f"paired ratio needs equal, non-zero round counts (got {ref.size} and {cand.size})")
    if not (np.all(ref > 0) and np.all(cand > 0)):
        raise ValueError("block times must be positive")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)} (got {estimator!r})")
    stat = ESTIMATORS[estimator]
    d = np.log(cand) - np.log(ref)
    idx = np.random.default_rng(seed).integers(0, d.size, size=(n_boot, d.size))
    boot = stat(d[idx])
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return {"ratio": math.exp(float(stat(d[None, :])[0])), "lo": math.exp(float(lo)), "hi": math.exp(float(hi)),
            "rounds": int(d.size), "estimator": estimator}


def verdict(lo: float, hi: float, band: float) -> bool:
    """True when the whole interval [lo, hi] lies inside 1 +- band ("cost unchanged")."""
    if not 0 < band < 1:
        raise ValueError(f"band must be in (0, 1) (got {band})")
    return (1 - band) <= lo <= hi <= (1 + band)


MIN_DECIDE_ROUNDS = 10  # fewer paired rounds: a bootstrap interval is too rough to claim anything


def fmt_ci(comp: Mapping) -> str:
    return f"{comp['ratio']:.3f} [{comp['lo']:.3f}, {comp['hi']:.3f}]"


def decide(comp: Mapping, band: float, control: Mapping | None = None, name: str = "candidate/reference",
           min_rounds: int = MIN_DECIDE_ROUNDS) -> tuple[str, str]:
    """Three answers, each with a one-line reason; never a false yes or no.

    ``yes``: the CI lies inside 1 +- band, and so does the A/A ``control``'s. ``no``: the CI lies entirely
    beyond one edge of the band, and beyond the largest deviation from 1 the control showed (two copies of
    one model never differ more than that, so a difference beyond it is real). ``inconclusive``: anything
    else: too few rounds, a CI on the edge or too wide, or a "yes" that a noisy control cannot back.
    """
    pct = f"{band:.0%}" if round(band * 100, 6) == round(band * 100) else f"{band:.1%}"
    rounds = comp.get("rounds")
    if rounds is not None and rounds < min_rounds:
        return "inconclusive", f"only {rounds} paired rounds ({min_rounds} needed for an interval that means something)"
    ci = f"{name} {fmt_ci(comp)}"
    noise = max(abs(control["lo"] - 1), abs(control["hi"] - 1)) if control is not None else 0.0
    edge = max(band, noise)
    if comp["lo"] > 1 + edge:
        return "no", f"{ci} lies above 1 + {pct}: measurably slower ({comp['ratio'] - 1:+.0%})"
    if comp["hi"] < 1 - edge:
        return "no", f"{ci} lies below 1 - {pct}: measurably faster ({comp['ratio'] - 1:+.0%})"
    if control is not None and noise > band:
        return "inconclusive", (f"the A/A control {fmt_ci(control)} is not inside 1 ± {pct}: this machine's noise "
                                f"floor was above the band during the run")
    if verdict(comp["lo"], comp["hi"], band):
        return "yes", f"{ci} lies inside 1 ± {pct}"
    return "inconclusive", f"{ci} is neither inside nor beyond 1 ± {pct}: the interval is too wide or on the edge"


def compare(block_means: dict[str, list[float]], pairs: Sequence[tuple[str, str, str]], *, n_boot: int,
            seed: int, estimator: str = "median") -> dict[str, dict]:
    """For each ``(label, candidate, reference)`` whose models were timed: :func:`paired_ratio` and the names."""
    out = {}
    for label, cand, ref in pairs:
        if cand in block_means and ref in block_means:
            out[label] = {**paired_ratio(block_means[ref], block_means[cand], n_boot=n_boot, seed=seed,
                                         estimator=estimator), "candidate": cand, "reference": ref}
    return out


def _cell(res: Interleaved, batch_size: int, pairs: Sequence[tuple[str, str, str]], n_boot: int, seed: int,
          estimator: str = "median") -> dict:
    cell: dict = {"batch": batch_size, "models": {}}
    for n, samples in res.samples.items():
        cell["models"][n] = {**summarize(samples, batch_size), "block_means_ms": res.block_means[n]}
        if res.cpu_samples:
            cell["models"][n]["cpu"] = {**summarize(res.cpu_samples[n], batch_size), "block_means_ms": res.cpu_block_means[n]}
    cell["comparisons"] = compare(res.block_means, pairs, n_boot=n_boot, seed=seed, estimator=estimator)
    if res.cpu_block_means:
        cell["cpu_comparisons"] = compare(res.cpu_block_means, pairs, n_boot=n_boot, seed=seed, estimator=estimator)
    return cell


def measure(block_fns: dict[str, BlockFn], *, batch_size: int, pairs: Sequence[tuple[str, str, str]], warmup: int,
            blocks: int, block_runs: int, n_boot: int, seed: int, on_round: Callable[[int], None] | None = None,
            estimator: str = "median") -> dict:
    """Interleaved timing plus statistics, JSON-ready: per model a wall-clock summary (+ ``cpu`` one when
    measured) with its block means, and ``comparisons`` (+ ``cpu_comparisons``) from :func:`compare`."""
    res = run_interleaved_blocks(block_fns, warmup=warmup, blocks=blocks, block_runs=block_runs, on_round=on_round)
    return _cell(res, batch_size, pairs, n_boot, seed, estimator)


def measure_adaptive(block_fns: dict[str, BlockFn], *, batch_size: int, pairs: Sequence[tuple[str, str, str]],
                     target: str, control: str | None, band: float, warmup: int, block_runs: int, min_rounds: int,
                     max_seconds: float, n_boot: int, seed: int, clock: str = "cpu", max_rounds: int | None = None,
                     on_round: Callable[[int], None] | None = None, estimator: str = "median",
                     timer: Callable[[], float] = time.perf_counter) -> dict:
    """:func:`measure` with rounds added until the ``target`` comparison's CI half-width is <= band/2 and the
    ``control`` (A/A) CI lies inside 1 +- band/2, on ``clock`` ("cpu" where measured, else wall), or until
    ``max_seconds`` are spent. The cell's ``adaptive`` entry records rounds, seconds and why it stopped.

    Stopping on precision, not on the answer, keeps the interval honest (see docs/latency.md). The stop test
    uses at most 500 bootstrap resamples and is asked after ``min_rounds`` and then every ~10% more rounds.
    """
    by_label = {label: (cand, ref) for label, cand, ref in pairs}
    for label in (target, control):
        if label is not None and label not in by_label:
            raise ValueError(f"{label!r} is not one of the pairs {sorted(by_label)}")

    def on_clock(res: Interleaved) -> tuple[str, dict[str, list[float]]]:
        return ("cpu", res.cpu_block_means) if clock == "cpu" and res.cpu_block_means else ("wall", res.block_means)

    def stop(res: Interleaved) -> bool:
        means = on_clock(res)[1]
        boot = min(n_boot, 500)  # a quick look; the cell's own intervals use n_boot
        cand, ref = by_label[target]
        t = paired_ratio(means[ref], means[cand], n_boot=boot, seed=seed, estimator=estimator)
        if (t["hi"] - t["lo"]) / 2 > band / 2:
            return False
        if control is None:
            return True
        cand, ref = by_label[control]
        c = paired_ratio(means[ref], means[cand], n_boot=boot, seed=seed, estimator=estimator)
        return verdict(c["lo"], c["hi"], band / 2)

    res, info = run_adaptive(block_fns, warmup=warmup, block_runs=block_runs, min_rounds=min_rounds,
                             max_seconds=max_seconds, stop=stop, max_rounds=max_rounds, on_round=on_round, timer=timer)
    cell = _cell(res, batch_size, pairs, n_boot, seed, estimator)
    cell["adaptive"] = {**info, "target": target, "control": control, "band": band, "min_rounds": min_rounds,
                        "max_seconds": max_seconds, "clock": on_clock(res)[0],
                        "rule": f"stop when {target}'s CI half-width <= {band / 2:g}"
                                + (f" and {control}'s CI lies inside 1 +- {band / 2:g}" if control else "")
                                + f", or after {max_seconds:g} s"}
    return cell
