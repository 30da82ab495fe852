"""stages.lib.timing on synthetic clocks: schedule balance, interleaving, statistics, the verdict."""
from __future__ import annotations

from collections import Counter
from itertools import pairwise

import numpy as np
import pytest

from stages.lib import timing


class FakeClock:
    """A clock that advances only when a fake model runs: cost x drift(t) x noise, in seconds."""

    def __init__(self, drift: float = 0.0, noise: float = 0.02, seed: int = 0):
        self.t = 0.0
        self.drift = drift  # relative slow-down per simulated second
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        self.log: list[str] = []

    def __call__(self) -> float:
        return self.t

    def model(self, name: str, cost_ms: float):
        def run() -> None:
            self.log.append(name)
            factor = (1 + self.drift * self.t) * float(np.exp(self.rng.normal(0, self.noise)))
            self.t += cost_ms * 1e-3 * factor
        return run


# ----------------------------------------------------------------------------- schedule
def test_two_models_give_abba_then_baab():
    rounds = timing.abba_schedule(["A", "B"], 4)
    assert [m for r in rounds for m in r] == list("ABBABAAB")


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_every_model_holds_every_position_equally(k):
    models = [f"m{i}" for i in range(k)]
    period = timing.schedule_period(k)
    for blocks in (period, 2 * period):
        rounds = timing.abba_schedule(models, blocks)
        assert len(rounds) == blocks
        assert all(sorted(r) == sorted(models) for r in rounds)  # one block of every model per round
        for pos in range(k):
            counts = Counter(r[pos] for r in rounds)
            assert set(counts.values()) == {blocks // k}, (k, blocks, pos, counts)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_mirrored_pairs_cancel_linear_drift(k):
    models = [f"m{i}" for i in range(k)]
    rounds = timing.abba_schedule(models, 6)
    for first, second in zip(rounds[::2], rounds[1::2]):
        for m in models:
            assert first.index(m) + second.index(m) == k - 1


@pytest.mark.parametrize("k", [2, 4, 6])
def test_williams_square_balances_carry_over(k):
    rows = timing.williams_rows(k)
    pairs = Counter(p for row in rows for p in pairwise(row))
    assert len(pairs) == k * (k - 1) and set(pairs.values()) == {1}


def test_schedule_rejects_duplicates():
    with pytest.raises(ValueError, match="unique"):
        timing.abba_schedule(["a", "a"], 2)


# ----------------------------------------------------------------------------- running
def test_run_interleaved_follows_the_schedule_and_counts():
    clock = FakeClock(noise=0.0)
    fns = {n: clock.model(n, c) for n, c in (("A", 1.0), ("B", 3.0), ("C", 2.0))}
    res = timing.run_interleaved(fns, warmup=2, blocks=6, block_runs=3, timer=clock)
    assert {n: len(v) for n, v in res.block_means.items()} == {"A": 6, "B": 6, "C": 6}
    assert {n: len(v) for n, v in res.samples.items()} == {"A": 18, "B": 18, "C": 18}
    assert res.samples["B"] == pytest.approx([3.0] * 18)
    expected = ["A"] * 2 + ["B"] * 2 + ["C"] * 2
    for r in timing.abba_schedule(["A", "B", "C"], 6):
        expected += [m for m in r for _ in range(3)]
    assert clock.log == expected


def test_ratio_ci_finds_a_model_twice_as_slow_under_drift():
    clock = FakeClock(drift=2.0, noise=0.03, seed=1)
    res = timing.run_interleaved({"A": clock.model("A", 1.0), "B": clock.model("B", 2.0)},
                                 warmup=1, blocks=12, block_runs=5, timer=clock)
    r, lo, hi = timing.ratio_ci(res.block_means["A"], res.block_means["B"], n_boot=2000, seed=0)
    assert lo <= 2.0 <= hi and not lo <= 1.0 <= hi
    assert r == pytest.approx(2.0, rel=0.03)
    assert not timing.verdict(lo, hi, 0.05)


def test_identical_models_give_a_ci_around_one_and_verdict_yes():
    clock = FakeClock(drift=2.0, noise=0.03, seed=2)
    res = timing.run_interleaved({"A": clock.model("A", 1.5), "A2": clock.model("A2", 1.5)},
                                 warmup=1, blocks=12, block_runs=5, timer=clock)
    r, lo, hi = timing.ratio_ci(res.block_means["A"], res.block_means["A2"], n_boot=2000, seed=0)
    assert lo <= 1.0 <= hi and lo < r < hi
    assert timing.verdict(lo, hi, 0.05)


def test_pairing_narrows_the_interval_under_drift():
    clock = FakeClock(drift=5.0, noise=0.01, seed=3)
    res = timing.run_interleaved({"A": clock.model("A", 1.0), "B": clock.model("B", 1.0)},
                                 warmup=0, blocks=12, block_runs=2, timer=clock)
    a, b = res.block_means["A"], res.block_means["B"]
    _, plo, phi = timing.ratio_ci(a, b, seed=0, paired=True)
    _, ulo, uhi = timing.ratio_ci(a, b, seed=0, paired=False)
    assert phi - plo < 0.5 * (uhi - ulo)


def test_cpu_clock_resists_preemption_that_stretches_the_wall_clock():
    """Other processes steal the CPU at random (wall clock only); thread CPU time sees the true cost."""
    rng = np.random.default_rng(4)
    wall, cpu = [0.0], [0.0]

    def model(cost_ms: float):
        def run() -> None:
            work = cost_ms * 1e-3 * float(np.exp(rng.normal(0, 0.005)))
            cpu[0] += work
            wall[0] += work * (1 + (rng.random() < 0.4) * rng.exponential(1.5))
        return run

    res = timing.run_interleaved({"A": model(1.0), "A2": model(1.0), "B": model(1.2)}, warmup=1, blocks=12,
                                 block_runs=5, timer=lambda: wall[0], cpu_timer=lambda: cpu[0])
    assert set(res.cpu_block_means) == {"A", "A2", "B"} and len(res.cpu_samples["B"]) == 60
    _, wlo, whi = timing.ratio_ci(res.block_means["A"], res.block_means["A2"])
    _, clo, chi = timing.ratio_ci(res.cpu_block_means["A"], res.cpu_block_means["A2"])
    assert timing.verdict(clo, chi, 0.02) and not timing.verdict(wlo, whi, 0.05)
    _, lo, hi = timing.ratio_ci(res.cpu_block_means["A"], res.cpu_block_means["B"])
    assert lo <= 1.2 <= hi and lo > 1.1
    assert timing.run_interleaved({"A": model(1.0)}, warmup=0, blocks=2, block_runs=1).cpu_block_means == {}


def test_ratio_ci_checks_its_inputs():
    with pytest.raises(ValueError, match="equal block counts"):
        timing.ratio_ci([1.0, 2.0], [1.0], paired=True)
    with pytest.raises(ValueError):
        timing.ratio_ci([], [1.0])
    assert timing.ratio_ci([1.0, 2.0], [3.0], paired=False)[0] == pytest.approx(2.0)


# ----------------------------------------------------------------------------- statistics
def test_summarize_matches_numpy():
    x = np.random.default_rng(0).lognormal(0.0, 0.5, size=257)
    s = timing.summarize(x.tolist(), batch_size=32)
    assert s["n"] == 257
    assert s["median_ms"] == pytest.approx(np.median(x))
    assert s["mean_ms"] == pytest.approx(x.mean())
    assert s["min_ms"] == pytest.approx(x.min()) and s["max_ms"] == pytest.approx(x.max())
    for p in (90, 95, 99):
        assert s[f"p{p}_ms"] == pytest.approx(np.percentile(x, p))
    assert s["p90_ms"] < s["p95_ms"] < s["p99_ms"]
    assert s["throughput_per_s"] == pytest.approx(32 * 1000 / np.median(x))
    with pytest.raises(ValueError):
        timing.summarize([])


@pytest.mark.parametrize("lo,hi,expected", [(0.97, 1.03, True), (0.95, 1.05, True), (0.94, 1.01, False),
                                            (0.99, 1.06, False), (1.9, 2.1, False)])
def test_verdict_band(lo, hi, expected):
    assert timing.verdict(lo, hi, 0.05) is expected


def test_measure_gives_summaries_and_only_the_comparisons_it_can():
    clock = FakeClock(noise=0.01, seed=5)
    fns = {n: timing.timed_block(clock.model(n, c), clock) for n, c in (("ref", 1.0), ("twin", 1.0), ("slow", 3.0))}
    pairs = (("aa", "twin", "ref"), ("slow_vs_ref", "slow", "ref"), ("absent", "nope", "ref"))
    cell = timing.measure(fns, batch_size=8, pairs=pairs, warmup=1, blocks=4, block_runs=2, n_boot=200, seed=0)
    assert cell["batch"] == 8 and set(cell["models"]) == {"ref", "twin", "slow"}
    assert cell["models"]["slow"]["n"] == 8 and len(cell["models"]["slow"]["block_means_ms"]) == 4
    assert set(cell["comparisons"]) == {"aa", "slow_vs_ref"} and "cpu_comparisons" not in cell
    assert cell["comparisons"]["slow_vs_ref"]["ratio"] == pytest.approx(3.0, rel=0.05)
    assert cell["comparisons"]["aa"]["candidate"] == "twin" and cell["comparisons"]["aa"]["reference"] == "ref"
