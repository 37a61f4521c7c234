"""Per-chunk probes of an aligned tensor pair: what changed, by how much, and by which criterion.

All probes run in one pass over a chunk of raw storage bits. Elements whose bits are equal (or that are
+0 and -0) are unchanged under every criterion, so the expensive arithmetic only touches the elements
whose bits differ. Differences are computed in float64 from exactly widened values; the rare elements
where a rounded float64 comparison could disagree with the exact one (|Δ| equal to a tolerance, or
within 2^-50 of η·max(|w0|,|w1|)) are settled with exact rational arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from ..io.dtypes import DType, is_zero_bits, ulp_exponent, widen, widen32

# Buckets of |Δ| / ULP(w0): "0" (unchanged), "<1", "1" = [1,2), "2" = [2,3), "3-4" = [3,5), ...
ULP_EDGES = np.array([1, 2, 3, 5, 9, 17, 33, 65, 129, 257], dtype=np.float64)
ULP_LABELS = ["0", "<1", "1", "2", "3-4", "5-8", "9-16", "17-32", "33-64", "65-128", "129-256", ">256", "non-finite"]

CRITERIA = ("bitwise", "atol", "bf16rel")


def parse_criterion(text: str) -> tuple[str, float]:
    """``bitwise`` | ``atol:1e-5`` | ``bf16rel:1e-3`` → (kind, value). Raises ValueError."""
    kind, _, val = text.partition(":")
    if kind == "bitwise" and not val:
        return "bitwise", 0.0
    if kind in ("atol", "bf16rel"):
        v = float(val) if val else (1e-5 if kind == "atol" else 1e-3)
        if not (v >= 0 and np.isfinite(v)):
            raise ValueError(text)
        return kind, v
    raise ValueError(text)


@dataclass
class ChunkStats:
    """What one chunk contributed; summed over chunks to give a tensor's numbers."""

    numel: int = 0
    changed: int = 0
    atol_changed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    rel_changed: int = 0
    ulp_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(ULP_LABELS), np.int64))
    max_abs: float = 0.0
    sumsq_delta: float = 0.0
    sumsq_base: float = 0.0
    nonfinite: int = 0

    def add(self, o: "ChunkStats") -> None:
        self.numel += o.numel
        self.changed += o.changed
        self.atol_changed = self.atol_changed + o.atol_changed if self.atol_changed.size else o.atol_changed.copy()
        self.rel_changed += o.rel_changed
        self.ulp_hist = self.ulp_hist + o.ulp_hist
        self.max_abs = max(self.max_abs, o.max_abs)
        self.sumsq_delta += o.sumsq_delta
        self.sumsq_base += o.sumsq_base
        self.nonfinite += o.nonfinite


def differing(ra: np.ndarray, rb: np.ndarray, da: DType, db: DType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of elements that differ, with their float64 values in base and tuned.

    Same dtype: the stored bits differ, except +0 vs -0 (NaN payloads compare bitwise). Different
    dtypes: the exactly widened values differ (two NaNs count as equal).
    """
    if da.name == db.name:
        idx = np.flatnonzero(ra != rb)
        if idx.size == 0:
            e = np.zeros(0, np.float64)
            return idx, e, e
        sa, sb = ra[idx], rb[idx]
        if da.is_float:
            both_zero = is_zero_bits(sa, da) & is_zero_bits(sb, db)
            if both_zero.any():
                keep = ~both_zero
                idx, sa, sb = idx[keep], sa[keep], sb[keep]
        return idx, widen(sa, da), widen(sb, db)
    fa, fb = widen(ra, da), widen(rb, db)
    with np.errstate(invalid="ignore"):
        neq = (fa != fb) & ~(np.isnan(fa) & np.isnan(fb))
    idx = np.flatnonzero(neq)
    return idx, fa[idx], fb[idx]


def _exact_absdiff(a: float, b: float) -> Fraction:
    return abs(Fraction(b) - Fraction(a))


def atol_exceed(absd: np.ndarray, fa: np.ndarray, fb: np.ndarray, tols: np.ndarray) -> np.ndarray:
    """Boolean matrix-free count helper: for each element, how many of the sorted ``tols`` it exceeds.

    Returns ``k`` with ``k[i]`` = number of tolerances t with exact |Δ_i| > t (NaN exceeds all).
    """
    k = np.searchsorted(tols, absd, side="left")
    inb = k < tols.size
    ties = np.flatnonzero(inb & (tols[np.minimum(k, tols.size - 1)] == absd))
    for i in ties:  # fl(|Δ|) == t: the exact |Δ| may lie just above t
        if _exact_absdiff(float(fa[i]), float(fb[i])) > Fraction(float(tols[k[i]])):
            k[i] += 1
    return k


def rel_changed_mask(absd: np.ndarray, fa: np.ndarray, fb: np.ndarray, eta: float) -> np.ndarray:
    """True where |Δ| > η·max(|w0|,|w1|) exactly (non-finite values count as changed)."""
    m = np.maximum(np.abs(fa), np.abs(fb))
    with np.errstate(invalid="ignore", over="ignore"):
        p = eta * m
        changed = ~(absd <= p) | ~np.isfinite(absd)
        near = np.flatnonzero(np.isfinite(absd) & (np.abs(absd - p) <= p * 2.0**-50))
    fe = Fraction(eta)
    for i in near:
        changed[i] = _exact_absdiff(float(fa[i]), float(fb[i])) > fe * Fraction(float(m[i]))
    return changed


def probe_chunk(
    ra: np.ndarray,
    rb: np.ndarray,
    da: DType,
    db: DType,
    tols: np.ndarray,
    eta: float,
    mask_criterion: tuple[str, float] | None = None,
    base_norm: bool = True,
) -> tuple[ChunkStats, np.ndarray | None]:
    """All probes for one chunk. ``tols`` must be sorted ascending and unique.

    Returns the stats and, when ``mask_criterion`` is given, the boolean changed-mask of the chunk.
    """
    st = ChunkStats(numel=int(ra.size), atol_changed=np.zeros(tols.size, np.int64))
    if base_norm:
        x = widen32(ra, da)
        with np.errstate(over="ignore", invalid="ignore"):
            st.sumsq_base = float(np.dot(x, x))
    idx, fa, fb = differing(ra, rb, da, db)
    n = idx.size
    st.changed = int(n)
    st.ulp_hist[0] = st.numel - n
    mask = None
    if mask_criterion is not None:
        mask = np.zeros(ra.size, dtype=bool)
    if n == 0:
        return st, mask
    with np.errstate(invalid="ignore", over="ignore"):
        absd = np.abs(fb - fa)
    finite = np.isfinite(absd)
    st.nonfinite = int(n - np.count_nonzero(finite))
    k = atol_exceed(absd, fa, fb, tols)
    bc = np.bincount(k, minlength=tols.size + 1)
    st.atol_changed = np.cumsum(bc[::-1])[::-1][1:].astype(np.int64)  # count(k > j) for each j
    relm = rel_changed_mask(absd, fa, fb, eta)
    st.rel_changed = int(np.count_nonzero(relm))
    # ULP histogram, in units of the ULP of the base value in its storage dtype
    sa = ra[idx]
    r = np.ldexp(np.where(finite, absd, 0.0), -ulp_exponent(sa, da).astype(np.int32))
    buckets = np.searchsorted(ULP_EDGES, r, side="right") + 1
    buckets[~finite] = len(ULP_LABELS) - 1
    st.ulp_hist += np.bincount(buckets, minlength=len(ULP_LABELS))
    st.ulp_hist[0] = st.numel - n
    if finite.any():
        af = absd[finite]
        st.max_abs = float(af.max())
        st.sumsq_delta = float(np.dot(af, af))
    if mask is not None:
        kind, val = mask_criterion
        if kind == "bitwise":
            mask[idx] = True
        elif kind == "atol":
            j = int(np.searchsorted(tols, val))
            if j < tols.size and tols[j] == val:
                mask[idx[k > j]] = True
            else:
                mask[idx[atol_exceed(absd, fa, fb, np.array([val])) > 0]] = True
        else:
            mask[idx[relm if val == eta else rel_changed_mask(absd, fa, fb, val)]] = True
    return st, mask
