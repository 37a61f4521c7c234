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
    verdict: str  # "higher" | "lower" | "inconclusive" (b against a)

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
                      verdict(float(lo), float(hi)))


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
    if se == 0:
        lo = hi = diff
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
