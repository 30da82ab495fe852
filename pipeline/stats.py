"""Statistics over seeds: mean with a Student-t confidence interval, paired differences, the NORM verdict.

Seeds are few (2-10), so the interval uses Student's t, not the normal approximation: with 3 seeds the 95%
half-width is 4.30 standard errors, not 1.96. No scipy: the t quantile is found by bisection on the t CDF,
written with the regularised incomplete beta function (continued fraction, as in Numerical Recipes §6.4).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (bisection on the CDF; 1e-12 absolute)."""
    if not 0.0 < q < 1.0 or df <= 0:
        raise ValueError(f"t_ppf needs 0 < q < 1 and df > 0 (got q={q}, df={df})")
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def mean_ci(values: Iterable[float], level: float = 0.95) -> dict:
    """Mean, sample sd and the two-sided Student-t CI of the mean; lo/hi are None with fewer than two values."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "lo": None, "hi": None, "half": None}
    mean = sum(xs) / n
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "lo": None, "hi": None, "half": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_ppf(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half, "half": half}


def paired(a: dict, b: dict) -> list[tuple]:
    """(key, a - b) for every key in both (pairing by seed: same student init and data order on both sides)."""
    return [(k, a[k] - b[k]) for k in sorted(set(a) & set(b), key=str) if a[k] is not None and b[k] is not None]


def helped_verdict(diff: dict, unit: str = "pts") -> tuple[Optional[str], str]:
    """yes / no / inconclusive (or None when nothing was measured) from the paired difference's CI, and why.

    One seed never gives yes or no: the seed-to-seed spread is unknown, so a difference of any size could be
    seed noise. With two or more, yes needs the whole 95% CI above 0, no the whole CI below 0.
    """
    n, mean = diff.get("n", 0), diff.get("mean")
    if not n or mean is None:
        return None, "baseline or distill not run"
    if n == 1:
        return "inconclusive", ("rests on one seed: the seed-to-seed spread is unknown, so this difference may be "
                                "seed noise; `norm-pipeline run --seeds 0,1,2` measures it")
    ci = f"95% CI [{diff['lo']:+.2f}, {diff['hi']:+.2f}] {unit} over {n} seeds"
    if diff["lo"] > 0:
        return "yes", f"{ci} lies above 0"
    if diff["hi"] < 0:
        return "no", f"{ci} lies below 0: NORM did worse than the student alone"
    return "inconclusive", f"{ci} includes 0: the difference is within seed noise"


def fmt_mean_ci(e: Optional[dict], scale: float = 1.0, unit: str = "", signed: bool = False, digits: int = 2) -> str:
    """'85.61% ± 0.42' (or '+0.85 pts [+0.31, +1.39]' with ``signed``), '85.61% (1 seed)', '—'."""
    if not e or e.get("mean") is None:
        return "—"
    sign = "+" if signed else ""
    m = f"{e['mean'] * scale:{sign}.{digits}f}{unit}"
    if e.get("half") is None:
        return f"{m} (1 seed)"
    if signed:
        return f"{m} [{e['lo'] * scale:+.{digits}f}, {e['hi'] * scale:+.{digits}f}]"
    return f"{m} ± {e['half'] * scale:.{digits}f}"

