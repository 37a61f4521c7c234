"""Uncertainty for the study's claims: paired bootstrap intervals, seed spreads, and the verdicts the
report states (a difference is claimed only when its interval excludes zero; otherwise "inconclusive")."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

LEVEL = 0.95


@dataclass
class Comparison:
    """``b − a`` with a confidence interval and the verdict it supports."""

    what: str
    a: str
    b: str
    diff: float
    lo: float | None
    hi: float | None
    n: int
    method: str
    verdict: str  # "higher" | "lower" | "inconclusive" | "no interval" (b against a)
    p: float | None = None  # two-sided bootstrap p-value of "no difference" (bootstrap comparisons)
    p_holm: float | None = None  # after Holm's correction over the family it was tested in (see holm)
    family: int | None = None  # how many tests that family holds

    def to_dict(self) -> dict:
        return asdict(self)


def verdict(lo: float | None, hi: float | None) -> str:
    """``higher`` / ``lower`` when the interval excludes 0, else ``inconclusive`` (also when there is no interval)."""
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    if lo > 0:
        return "higher"
    if hi < 0:
        return "lower"
    return "inconclusive"


def paired_bootstrap(a, b, what: str = "accuracy", names: tuple[str, str] = ("a", "b"), n_boot: int = 10000,
                     seed: int = 0, level: float = LEVEL) -> Comparison:
    """Mean of ``b`` minus mean of ``a`` over the same items (per-problem outcomes of two models on one test
    set), with a percentile interval from resampling items (pairs kept together)."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired bootstrap needs outcomes on the same items ({x.shape} vs {y.shape})")
    n = len(x)
    if n == 0:
        return Comparison(what, names[0], names[1], math.nan, None, None, 0, "paired bootstrap", "inconclusive")
    d = y - x
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for s in range(0, n_boot, 1000):  # in blocks, to bound memory for large test sets
        k = min(1000, n_boot - s)
        means[s : s + k] = d[rng.integers(0, n, size=(k, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return Comparison(what, names[0], names[1], float(d.mean()), float(lo), float(hi), n, f"paired bootstrap ({n_boot}x)",
                      verdict(float(lo), float(hi)), p=_boot_p(means))


def _boot_p(means: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a zero difference: twice the smaller tail share at 0, (k+1)/(B+1) corrected."""
    B = len(means)
    k = min(int(np.count_nonzero(means <= 0)), int(np.count_nonzero(means >= 0)))
    return float(min(1.0, 2 * (k + 1) / (B + 1)))


def pooled_bootstrap(pairs, what: str = "accuracy", names: tuple[str, str] = ("a", "b"), n_boot: int = 10000, seed: int = 0,
                     level: float = LEVEL) -> Comparison:
    """``b − a`` pooled over seeds: ``pairs`` holds one ``(outcomes_a, outcomes_b)`` per seed, all on the same test
    problems. Each replicate resamples seeds (so the spread between training runs counts, not only the test
    set's) and then problems (one draw of problem indices shared by the drawn seeds, which saw the same problems);
    the statistic is the mean over drawn seeds of the mean paired difference. With one seed it is the paired
    bootstrap over problems."""
    arrs = [(np.asarray(a, np.float64), np.asarray(b, np.float64)) for a, b in pairs]
    if not arrs or any(x.shape != y.shape or x.ndim != 1 or x.shape != arrs[0][0].shape for x, y in arrs) or arrs[0][0].size == 0:
        return Comparison(what, names[0], names[1], math.nan, None, None, 0, "pooled bootstrap (no paired outcomes)", "inconclusive")
    D = np.stack([y - x for x, y in arrs])  # seeds × problems
    S, n = D.shape
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for s0 in range(0, n_boot, 500):
        k = min(500, n_boot - s0)
        si = rng.integers(0, S, size=(k, S))
        pi = rng.integers(0, n, size=(k, n))
        rows = D[si]  # k × S × n
        means[s0 : s0 + k] = np.take_along_axis(rows, np.broadcast_to(pi[:, None, :], rows.shape), axis=2).mean(axis=(1, 2))
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return Comparison(what, names[0], names[1], float(D.mean()), float(lo), float(hi), n * S,
                      f"bootstrap over {S} seed(s) × {n} problems ({n_boot}x)", verdict(float(lo), float(hi)), p=_boot_p(means))


def holm(comparisons: list[Comparison], alpha: float = 1 - LEVEL) -> list[Comparison]:
    """Holm's step-down correction over a family of comparisons (those with a p-value): each gets ``p_holm`` and
    ``family``, and a verdict of higher/lower only if its corrected p-value is below ``alpha`` (and its interval
    agrees); the rest become inconclusive. Returns the same objects."""
    tested = sorted((c for c in comparisons if c.p is not None), key=lambda c: c.p)
    m = len(tested)
    running = 0.0
    for i, c in enumerate(tested):
        running = max(running, min(1.0, (m - i) * c.p))
        c.p_holm, c.family = running, m
        if c.verdict in ("higher", "lower") and running >= alpha:
            c.verdict = "inconclusive"
    return comparisons


def mean_sd(xs) -> dict:
    """Mean, sample standard deviation and n of per-seed values (sd None for one seed)."""
    v = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    if not v:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None, "n": len(v)}


def seed_difference(a, b, what: str, names: tuple[str, str], level: float = LEVEL) -> Comparison:
    """Difference of two groups of per-seed values (``b − a``) with Welch's t interval; with fewer than two
    seeds on either side there is no interval and the verdict is ``inconclusive``."""
    x = [float(v) for v in a if v is not None]
    y = [float(v) for v in b if v is not None]
    diff = (float(np.mean(y)) - float(np.mean(x))) if x and y else math.nan
    if len(x) < 2 or len(y) < 2:
        return Comparison(what, names[0], names[1], diff, None, None, min(len(x), len(y)), "per-seed means (too few seeds)", "inconclusive")
    vx, vy = np.var(x, ddof=1) / len(x), np.var(y, ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    if se == 0:  # every seed gave the same value on both sides: Welch has no interval to offer
        return Comparison(what, names[0], names[1], diff, None, None, min(len(x), len(y)), "Welch t over seeds (zero variance)", "no interval")
    else:
        df = (vx + vy) ** 2 / ((vx**2) / (len(x) - 1) + (vy**2) / (len(y) - 1))
        q = t_quantile(1 - (1 - level) / 2, df)
        lo, hi = diff - q * se, diff + q * se
    return Comparison(what, names[0], names[1], diff, lo, hi, min(len(x), len(y)), "Welch t over seeds", verdict(lo, hi))


def _t_cdf(x: float, df: float) -> float:
    """Student's t CDF (x ≥ 0) by Simpson integration of the density from 0 to x."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    m = 2000
    h = x / m
    f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(m + 1)]
    return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


def t_quantile(p: float, df: float) -> float:
    """The p-quantile (p ≥ 0.5) of Student's t with ``df`` degrees of freedom, by bisection (no scipy here)."""
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2
