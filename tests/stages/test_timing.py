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
    for first, second in zip(rounds[::2], rounds[1::2], strict=False):
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


# ----------------------------------------------------------------------------- the paired per-round estimator
def _series(rounds: int, ratio: float, noise: float, seed: int, speed=lambda i: 1.0) -> tuple[list[float], list[float]]:
    """Block means (ms) of a reference and a candidate ``ratio`` times as costly, timed back to back in each
    round on a machine whose speed factor is ``speed(round)``; multiplicative log-normal noise per block."""
    rng = np.random.default_rng(seed)
    ref = [8.7 * speed(i) * float(np.exp(rng.normal(0, noise))) for i in range(rounds)]
    cand = [8.7 * ratio * speed(i) * float(np.exp(rng.normal(0, noise))) for i in range(rounds)]
    return ref, cand


def _aa(lo: float = 0.995, hi: float = 1.005) -> dict:
    return {"ratio": (lo + hi) / 2, "lo": lo, "hi": hi, "rounds": 40}


def test_hodges_lehmann_is_the_median_of_walsh_averages():
    x = np.random.default_rng(0).normal(size=15)
    walsh = [(x[i] + x[j]) / 2 for i in range(15) for j in range(i, 15)]
    assert timing.hodges_lehmann(x) == pytest.approx(float(np.median(walsh)))
    assert timing.hodges_lehmann([1.0, 2.0, 100.0]) == pytest.approx(np.median([1, 1.5, 50.5, 2, 51, 100]))


def test_paired_ratio_recovers_a_known_ratio_and_checks_inputs():
    ref, cand = _series(60, 1.25, 0.01, seed=1)
    for est in ("hl", "median"):
        c = timing.paired_ratio(ref, cand, estimator=est)
        assert c["lo"] < c["ratio"] < c["hi"] and c["lo"] < 1.25 < c["hi"], (est, c)
        assert c["rounds"] == 60 and c["estimator"] == est
    exact = timing.paired_ratio([2.0, 4.0, 8.0], [3.0, 6.0, 12.0], n_boot=100)  # every round 1.5x: no spread
    assert exact["ratio"] == pytest.approx(1.5) and exact["lo"] == pytest.approx(1.5) and exact["hi"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="equal"):
        timing.paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="positive"):
        timing.paired_ratio([1.0, 0.0], [1.0, 1.0])


def test_step_change_of_speed_between_rounds_cancels():
    """The machine speeds up by 18% for the last rounds (as seen on a fresh 2-core machine): the per-round
    pairs cancel it; the ratio of medians over whole-run block means gives wider intervals from the same data."""
    step = lambda i: 1.0 if i < 30 else 7.1 / 8.7  # noqa: E731
    ref, cand = _series(40, 1.0, 0.01, seed=2, speed=step)
    c = timing.paired_ratio(ref, cand)
    answer, reason = timing.decide(c, 0.02, control=_aa(), name="merged/vanilla")
    assert answer == "yes", reason
    assert c["hi"] - c["lo"] < 0.02
    new, old = [], []
    for seed in range(20):  # 12 rounds, the last 3 faster: the case seen in the field
        ref, cand = _series(12, 1.0, 0.01, seed=seed, speed=lambda i: 1.0 if i < 9 else 7.1 / 8.7)
        p = timing.paired_ratio(ref, cand, n_boot=1000)
        _, olo, ohi = timing.ratio_ci(ref, cand, n_boot=1000)
        new.append(p["hi"] - p["lo"])
        old.append(ohi - olo)
        assert timing.decide(p, 0.02, control=_aa())[0] == "yes"
    assert np.mean(old) > 1.3 * np.mean(new)
    for seed in range(30):  # and never a "no", whichever rounds the step hits
        ref, cand = _series(12 + seed % 20, 1.0, 0.02, seed=seed, speed=lambda i, s=seed: 1.0 if i < s % 9 + 3 else 0.8)
        assert timing.decide(timing.paired_ratio(ref, cand), 0.02, control=_aa())[0] != "no"


def test_constant_3pct_slowdown_is_no_once_enough_rounds_ran():
    ref, cand = _series(200, 1.03, 0.02, seed=3)
    c = timing.paired_ratio(ref, cand)
    answer, reason = timing.decide(c, 0.02, control=_aa(), name="merged/vanilla")
    assert answer == "no" and "slower" in reason and c["lo"] > 1.02, (c, reason)
    faster = timing.paired_ratio(cand, ref)
    assert timing.decide(faster, 0.02, control=_aa())[0] == "no" and "faster" in timing.decide(faster, 0.02)[1]
    few = timing.paired_ratio(*_series(12, 1.03, 0.02, seed=3))  # too few rounds to resolve 1% from the edge
    assert timing.decide(few, 0.02, control=_aa())[0] == "inconclusive"


@pytest.mark.parametrize("noise", [0.005, 0.03, 0.10])
def test_pure_noise_is_yes_or_inconclusive_never_no(noise):
    """Identical models, noise per block from 0.5% to 10%; the A/A control is measured under the same noise."""
    answers = Counter()
    for seed in range(60):
        n = 10 + seed % 31
        ref, cand = _series(n, 1.0, noise, seed=100 + seed)
        twin = _series(n, 1.0, noise, seed=1000 + seed)[1]  # vanilla_b: the same cost, its own noise
        aa = timing.paired_ratio(ref, twin, n_boot=500)
        answers[timing.decide(timing.paired_ratio(ref, cand, n_boot=500), 0.02, control=aa)[0]] += 1
    assert answers["no"] == 0, answers
    if noise == 0.005:
        assert answers["yes"] == 60
    if noise == 0.10:
        assert answers["inconclusive"] > 0


def test_aa_control_outside_the_band_makes_it_inconclusive():
    inside = {"ratio": 1.0, "lo": 0.995, "hi": 1.005, "rounds": 40}
    for control in (_aa(1.025, 1.04), _aa(0.97, 1.01), _aa(0.95, 1.05)):
        answer, reason = timing.decide(inside, 0.02, control=control, name="merged/vanilla")
        assert answer == "inconclusive" and "A/A" in reason
    # a difference far beyond what two copies of one model showed is still a "no" on a noisy machine
    slow = {"ratio": 1.3, "lo": 1.28, "hi": 1.32, "rounds": 40}
    assert timing.decide(slow, 0.02, control=_aa(0.97, 1.04))[0] == "no"
    within_noise = {"ratio": 1.035, "lo": 1.025, "hi": 1.045, "rounds": 40}  # beyond the band, not beyond the A/A
    answer, reason = timing.decide(within_noise, 0.02, control=_aa(0.95, 1.05))
    assert answer == "inconclusive" and "A/A" in reason
    assert timing.decide(within_noise, 0.02, control=_aa())[0] == "no"
    assert timing.decide(inside, 0.02, control=_aa()) == ("yes", "candidate/reference 1.000 [0.995, 1.005] lies inside 1 ± 2%")


def test_decide_edges_and_too_few_rounds():
    c = lambda lo, hi, n=40: {"ratio": (lo + hi) / 2, "lo": lo, "hi": hi, "rounds": n}  # noqa: E731
    assert timing.decide(c(0.98, 1.02), 0.02)[0] == "yes"
    assert timing.decide(c(1.01, 1.03), 0.02)[0] == "inconclusive"  # straddles the upper edge
    assert timing.decide(c(0.96, 1.04), 0.02)[0] == "inconclusive"  # too wide
    assert timing.decide(c(1.021, 1.05), 0.02)[0] == "no"
    assert timing.decide(c(0.90, 0.979), 0.02)[0] == "no"
    answer, reason = timing.decide(c(0.999, 1.001, n=4), 0.02)
    assert answer == "inconclusive" and "4 paired rounds" in reason
    for lo, hi in ((0.98, 1.02), (1.01, 1.03), (1.021, 1.05)):
        assert "\n" not in timing.decide(c(lo, hi), 0.02)[1]


# ----------------------------------------------------------------------------- adaptive length
class Machine:
    """Fake models on a fake clock whose speed can change (a step at ``step_at`` seconds), CPU-time noise."""

    def __init__(self, noise: float = 0.01, step_at: float | None = None, step: float = 0.8, seed: int = 0):
        self.t, self.noise, self.step_at, self.step = 0.0, noise, step_at, step
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> float:
        return self.t

    def model(self, cost_ms: float):
        def run() -> None:
            speed = self.step if self.step_at is not None and self.t >= self.step_at else 1.0
            self.t += cost_ms * 1e-3 * speed * float(np.exp(self.rng.normal(0, self.noise)))
        return timing.timed_block(run, timer=self)


PAIRS = (("merged_vs_vanilla", "merged", "vanilla"), ("aa", "vanilla_b", "vanilla"),
         ("unmerged_vs_vanilla", "unmerged", "vanilla"))


def _adaptive(m: Machine, merged: float, max_seconds: float = 60.0, min_rounds: int = 12, vanilla_b: float = 1.0) -> dict:
    fns = {"vanilla": m.model(10.0), "vanilla_b": m.model(10.0 * vanilla_b), "merged": m.model(10.0 * merged),
           "unmerged": m.model(13.5)}
    return timing.measure_adaptive(fns, batch_size=32, pairs=PAIRS, target="merged_vs_vanilla", control="aa", band=0.02,
                                   warmup=2, block_runs=5, min_rounds=min_rounds, max_seconds=max_seconds, n_boot=1000,
                                   seed=0, clock="wall", timer=m)


def test_adaptive_stops_when_precise_and_survives_a_step_change():
    m = Machine(noise=0.08, step_at=3.0, step=0.8, seed=7)  # the machine gets 20% faster 3 s in
    cell = _adaptive(m, merged=1.0)
    a, comps = cell["adaptive"], cell["comparisons"]
    assert a["stopped"] == "precision reached" and a["rounds"] > 30 and a["rounds"] % 2 == 0  # 12 are far too few
    assert a["seconds"] > 3.0  # the step happened during the timing
    mv = comps["merged_vs_vanilla"]
    assert (mv["hi"] - mv["lo"]) / 2 <= 0.011 and mv["rounds"] == a["rounds"]
    assert len(cell["models"]["merged"]["block_means_ms"]) == a["rounds"]
    assert timing.decide(mv, 0.02, control=comps["aa"])[0] == "yes"
    assert timing.decide(comps["unmerged_vs_vanilla"], 0.02, control=comps["aa"])[0] == "no"


def test_adaptive_resolves_a_3pct_slowdown_given_time():
    cell = _adaptive(Machine(noise=0.02, seed=8), merged=1.03, max_seconds=300.0)
    comps = cell["comparisons"]
    assert timing.decide(comps["merged_vs_vanilla"], 0.02, control=comps["aa"])[0] == "no", comps["merged_vs_vanilla"]


def test_adaptive_honours_the_time_limit_and_the_minimum():
    cell = _adaptive(Machine(noise=0.2, seed=9), merged=1.0, max_seconds=5.0)  # far too noisy for 5 s
    a = cell["adaptive"]  # a round is ~0.22 s here; the clock is checked after every mirrored pair
    assert a["stopped"] == "time limit" and 5.0 <= a["seconds"] < 5.6 and a["rounds"] > 12 and a["rounds"] % 2 == 0
    quick = _adaptive(Machine(noise=0.2, seed=9), merged=1.0, max_seconds=0.01, min_rounds=13)
    assert quick["adaptive"]["rounds"] == 14  # the minimum, rounded up to a whole mirrored pair


def test_adaptive_keeps_going_while_the_aa_control_is_off():
    """A/A off by 1.5%: inside the band for the verdict, but not inside band/2, so rounds go on until the time."""
    cell = _adaptive(Machine(noise=0.005, seed=10), merged=1.0, max_seconds=10.0, vanilla_b=1.015)
    assert cell["adaptive"]["stopped"] == "time limit"
    comps = cell["comparisons"]
    assert timing.decide(comps["merged_vs_vanilla"], 0.02, control=comps["aa"])[0] == "yes"


def test_adaptive_without_control_stops_on_the_targets_precision():
    m = Machine(noise=0.06, seed=11)
    fns = {"vanilla": m.model(10.0), "merged": m.model(10.0)}
    cell = timing.measure_adaptive(fns, batch_size=1, pairs=PAIRS[:1], target="merged_vs_vanilla", control=None,
                                   band=0.02, warmup=0, block_runs=5, min_rounds=10, max_seconds=600, n_boot=1000,
                                   seed=0, clock="cpu", timer=m)  # no CPU clock here: falls back to wall
    mv, a = cell["comparisons"]["merged_vs_vanilla"], cell["adaptive"]
    assert a["stopped"] == "precision reached" and a["rounds"] > 30 and a["clock"] == "wall"
    assert (mv["hi"] - mv["lo"]) / 2 <= 0.0105
    with pytest.raises(ValueError, match="not one of the pairs"):
        timing.measure_adaptive(fns, batch_size=1, pairs=PAIRS[:1], target="aa", control=None, band=0.02, warmup=0,
                                block_runs=1, min_rounds=2, max_seconds=1, n_boot=100, seed=0)


def test_paired_ratio_ci_has_its_nominal_coverage():
    """The interval labelled 95% covers the true ratio about 95% of the time (a 90% one labelled 95% would make a
    "cost unchanged: yes" easier to get): 400 synthetic runs of 40 rounds with machine drift and per-round noise."""
    rng = np.random.default_rng(1)
    true, trials, hits = 1.03, 400, 0
    for t in range(trials):
        ref = rng.lognormal(0.0, 0.05, 40)  # the machine's speed moves from round to round
        cand = ref * true * rng.lognormal(0.0, 0.02, 40)
        r = timing.paired_ratio(ref, cand, n_boot=1000, seed=t)
        hits += r["lo"] <= true <= r["hi"]
    assert 0.925 <= hits / trials <= 0.975, f"coverage {hits / trials:.3f} for a nominal 95% interval"
