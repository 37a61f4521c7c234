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
from functools import lru_cache

import numpy as np

from ..io.bits import changed_index
from ..io.dtypes import DTYPES, DType, dot, sumsq, ulp_exponent, widen, widen32
from .kernels import kernels

# Buckets of |Δ| / ULP(w0): "0" (unchanged), "<1", "1" = [1,2), "2" = [2,3), "3-4" = [3,5), ...
ULP_EDGES = np.array([1, 2, 3, 5, 9, 17, 33, 65, 129, 257], dtype=np.float64)
ULP_LABELS = ["0", "<1", "1", "2", "3-4", "5-8", "9-16", "17-32", "33-64", "65-128", "129-256", ">256", "non-finite"]

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
    frozen: int = 0  # base entries below the precision floor (with lr_sum)
    changed_frozen: int = 0  # ... of which changed anyway
    exp_numel: np.ndarray | None = None  # per exponent field of the base value: entries ...
    exp_changed: np.ndarray | None = None  # ... and changed entries
    codes_changed: int = 0  # quantized storage: weights whose stored code differs
    scales_changed: int = 0  # ... stored scale entries that differ
    survive_requantize: int = 0  # ... changes that survive rounding the (unquantized) tuned value into base's grid
    per_expert: np.ndarray | None = None  # fused MoE tensors: changed entries per expert

    def add(self, o: ChunkStats) -> None:
        self.numel += o.numel
        self.changed += o.changed
        self.atol_changed = self.atol_changed + o.atol_changed if self.atol_changed.size else o.atol_changed.copy()
        self.rel_changed += o.rel_changed
        self.ulp_hist = self.ulp_hist + o.ulp_hist
        self.max_abs = max(self.max_abs, o.max_abs)
        self.sumsq_delta += o.sumsq_delta
        self.sumsq_base += o.sumsq_base
        self.nonfinite += o.nonfinite
        self.frozen += o.frozen
        self.changed_frozen += o.changed_frozen
        self.codes_changed += o.codes_changed
        self.scales_changed += o.scales_changed
        self.survive_requantize += o.survive_requantize
        if o.per_expert is not None:
            self.per_expert = o.per_expert.copy() if self.per_expert is None else self.per_expert + o.per_expert
        if o.exp_numel is not None:
            self.exp_numel = o.exp_numel.copy() if self.exp_numel is None else self.exp_numel + o.exp_numel
            self.exp_changed = o.exp_changed.copy() if self.exp_changed is None else self.exp_changed + o.exp_changed


def differing(ra: np.ndarray, rb: np.ndarray, da: DType, db: DType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of elements that differ, with their float64 values in base and tuned.

    Same dtype: the stored bits differ, except +0 vs -0 (NaN payloads compare bitwise). Different
    dtypes: the exactly widened values differ (two NaNs count as equal).
    """
    if da.name == db.name:
        idx = changed_index(ra, rb, da.is_float)
        return idx, widen(ra[idx], da), widen(rb[idx], db)
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


def atol_counts(absd: np.ndarray, fa: np.ndarray, fb: np.ndarray, tols: np.ndarray) -> np.ndarray:
    """For each tolerance t of ``tols``: how many elements have exact |Δ| > t (NaN exceeds all). One comparison
    pass per tolerance (a handful), the float64 ties settled exactly."""
    nan = int(np.count_nonzero(absd != absd))
    out = np.empty(tols.size, np.int64)
    for j, t in enumerate(tols.tolist()):
        n = int(np.count_nonzero(absd > t)) + nan
        for i in np.flatnonzero(absd == t):  # fl(|Δ|) == t: the exact |Δ| may lie just above t
            n += _exact_absdiff(float(fa[i]), float(fb[i])) > Fraction(t)
        out[j] = n
    return out


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


def _round_down_f32(t: float) -> np.float32:
    """The largest float32 not above ``t``: for any float32 x, x > t ⟺ x > result."""
    f = np.float32(t)
    return f if float(f) <= t else np.nextafter(f, np.float32(-np.inf))


# Exponent-field mask and shift, the largest exponent gap for which the float32 difference of two values
# of the format is exact (24-bit float32 significand minus the format's), and the smallest exponent field
# for which 2^-(ULP exponent) is a normal float32.
_FAST16 = {"BF16": (0x7F80, 7, 16, 9), "F16": (0x7C00, 10, 13, 0)}


def _fast16(sa, sb, dt: DType, tols32, eta, st: ChunkStats):
    """Probes for changed elements of a bf16/fp16 pair whose float32 difference is exact.

    Returns (fast, relm): ``fast`` selects the elements handled here (the caller sends the rest to the
    float64 path: exponents too far apart, or tiny subnormal-range values); ``relm`` is the
    bf16-relative changed mask of those elements.
    """
    emask, shift, gap, emin = _FAST16[dt.name]
    ea = sa & np.uint16(emask)
    eb = sb & np.uint16(emask)
    d = (ea.view(np.int16) - eb.view(np.int16)).view(np.int16)
    fast = (np.abs(d) <= (gap << shift)) & (ea >= np.uint16(emin << shift))
    allx = bool(fast.all())
    if not allx:
        sa, sb, ea = sa[fast], sb[fast], ea[fast]
    fa, fb = widen32(sa, dt), widen32(sb, dt)
    absd = np.abs(fb - fa)  # exact in float32
    n = absd.size
    finite = np.isfinite(absd)
    nf = n - int(np.count_nonzero(finite))
    nan = int(np.count_nonzero(absd != absd))
    for j, t32 in enumerate(tols32):
        st.atol_changed[j] += int(np.count_nonzero(absd > t32)) + nan
    # bf16-relative |Δ| > η·max(|w0|,|w1|): decided on the float32 quotient outside a one-ULP band
    # around η, and exactly inside it
    m = np.maximum(np.abs(fa), np.abs(fb))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        q = absd / m
    lo = _round_down_f32(eta)
    hi = np.nextafter(lo, np.float32(np.inf))
    relm = (q > hi) | ~np.isfinite(q)
    for i in np.flatnonzero((q >= lo) & (q <= hi)):
        relm[i] = _exact_absdiff(float(fa[i]), float(fb[i])) > Fraction(eta) * Fraction(float(m[i]))
    st.rel_changed += int(np.count_nonzero(relm))
    # |Δ| in ULPs of the base value: |Δ| · 2^-(ulp exponent), the power of two built from bits
    ue = (ea >> np.uint16(shift)).astype(np.int32) - (dt.exponent_bias + dt.mantissa_bits)
    if dt.name == "F16":
        ue = np.maximum(ue, 1 - dt.exponent_bias - dt.mantissa_bits)
    scale = ((127 - ue) << 23).view(np.float32)
    ad = absd if nf == 0 else np.where(finite, absd, np.float32(0))
    r = ad * scale
    ge = [int(np.count_nonzero(r >= e)) for e in _ULP_EDGES32]
    hist = st.ulp_hist
    hist[1] += n - nf - ge[0]
    for j in range(len(ULP_EDGES) - 1):
        hist[2 + j] += ge[j] - ge[j + 1]
    hist[len(ULP_EDGES) + 1] += ge[-1]
    hist[-1] += nf  # non-finite elements have r = 0 above, so they are in no other bucket
    if n:
        st.max_abs = max(st.max_abs, float(ad.max()))
        st.sumsq_delta += dot(ad.astype(np.float64))
    st.nonfinite += nf
    return fast, relm


_ULP_EDGES32 = ULP_EDGES.astype(np.float32)


def _compiled16(ra, tols, st: ChunkStats, mask, dt: DType, eta, rb, base_norm: bool) -> bool:
    """The probes of a same-dtype bf16/fp16 chunk in one compiled pass (:mod:`.kernels`), into ``st`` and ``mask``.
    False (nothing done) where the kernels are unavailable or there are more tolerances than they take."""
    k = kernels()
    if k is None or tols.size > k.MAX_TOLS:
        return False
    emask, shift, gap, emin = _FAST16[dt.name]
    tab, tols32, lo, hi = _params16(dt.name, tuple(tols.tolist()), float(eta), k.MAX_TOLS)
    off = dt.exponent_bias + dt.mantissa_bits
    ue_min = 1 - off if dt.name == "F16" else -(1 << 20)
    want = mask is not None
    scratch = () if getattr(k, "NAME", None) == "native" else (np.empty_like(ra), np.empty_like(rb))  # numba's
    ints, sd, sb, mx = k.probe16(ra, rb, dt.name == "BF16", tab, tols32, lo, hi, np.uint16(emask), shift, gap << shift,
                                 emin << shift, off, ue_min, _ULP_EDGES32, mask if want else np.empty(0, bool), want,
                                 *scratch)
    n_ch, n_rel, nf, nan, n_slow, n_band = (int(x) for x in ints[:6])
    if base_norm:
        st.sumsq_base = float(sb)
    st.changed = n_ch
    st.ulp_hist[0] = st.numel - n_ch
    if n_ch == 0:
        return True
    n = n_ch - n_slow  # the entries whose float32 difference is exact
    st.atol_changed += ints[6 : 6 + tols.size]
    st.rel_changed += n_rel
    ge = ints[6 + k.MAX_TOLS :].tolist()  # entries at or past each ULP edge: the buckets are their differences
    hist = st.ulp_hist
    hist[1] += n - nf - ge[0]
    for j in range(len(ULP_EDGES) - 1):
        hist[2 + j] += ge[j] - ge[j + 1]
    hist[len(ULP_EDGES) + 1] += ge[-1]
    hist[-1] += nf
    if n:
        st.max_abs = max(st.max_abs, float(np.uint32(mx).view(np.float32)))
        st.sumsq_delta += float(sd)
    st.nonfinite += nf
    if n_slow or n_band:
        slow, band = k.rare16(ra, rb, dt.name == "BF16", tab, lo, hi, np.uint16(emask), gap << shift, emin << shift)
        if band.size:  # |Δ|/max(|w0|,|w1|) within one float32 ULP of η: settled exactly
            fa, fb = widen(ra[band], dt), widen(rb[band], dt)
            m = np.maximum(np.abs(fa), np.abs(fb))
            st.rel_changed += sum(_exact_absdiff(float(x), float(y)) > Fraction(eta) * Fraction(float(z))
                                  for x, y, z in zip(fa, fb, m))
        if slow.size:  # exponents too far apart for an exact float32 difference
            _slow(widen(ra[slow], dt), widen(rb[slow], dt), ra[slow], dt, tols, eta, st)
    return True


@lru_cache(maxsize=64)
def _params16(name: str, tols: tuple, eta: float, slots: int):
    """What the compiled pass needs beside the chunk: the dtype's value table, the tolerances rounded down to float32
    and padded with +inf, and the float32 band around η (as :func:`_fast16` uses them)."""
    tab = widen32(np.arange(1 << 16, dtype=np.uint16), DTYPES[name])
    tols32 = np.full(slots, np.inf, np.float32)
    tols32[: len(tols)] = [_round_down_f32(t) for t in tols]
    lo = _round_down_f32(eta)
    return tab, tols32, lo, np.nextafter(lo, np.float32(np.inf))


def probe_chunk(
    ra: np.ndarray,
    rb: np.ndarray,
    da: DType,
    db: DType,
    tols: np.ndarray,
    eta: float,
    mask_criterion: tuple[str, float] | None = None,
    base_norm: bool = True,
    keep: dict | None = None,
    compiled: bool = False,
) -> tuple[ChunkStats, np.ndarray | None]:
    """All probes for one chunk. ``tols`` must be sorted ascending and unique. ``compiled``: a same-dtype bf16/fp16
    chunk goes through the compiled pass of :mod:`.kernels` where it is installed (the same counts).

    Returns the stats and, when ``mask_criterion`` is given, the boolean changed-mask of the chunk. With a
    ``keep`` dict, the general path leaves its changed indices and float64 values there (``idx``, ``fa``,
    ``fb``) and skips the ULP histogram, for a caller that takes ULPs in another grid (quantized storage).
    """
    st = ChunkStats(numel=int(ra.size), atol_changed=np.zeros(tols.size, np.int64))
    mask = np.zeros(ra.size, dtype=bool) if mask_criterion is not None else None
    fast16 = da.name == db.name and da.name in _FAST16 and (mask_criterion is None or mask_criterion[0] == "bitwise")
    if fast16 and compiled and _compiled16(ra, tols, st, mask, da, eta, rb, base_norm):
        return st, mask
    if base_norm:
        with np.errstate(over="ignore", invalid="ignore"):
            st.sumsq_base = sumsq(ra, da)
    if fast16:
        idx = changed_index(ra, rb)
        sa, sb = ra[idx], rb[idx]
        n = idx.size
        st.changed = int(n)
        st.ulp_hist[0] = st.numel - n
        if mask is not None:
            mask[idx] = True
        if n == 0:
            return st, mask
        tols32 = [_round_down_f32(float(t)) for t in tols]
        exact, _ = _fast16(sa, sb, da, tols32, eta, st)
        if not exact.all():  # rare: exponents too far apart for an exact float32 difference
            rest = ~exact
            _slow(widen(sa[rest], da), widen(sb[rest], db), sa[rest], da, tols, eta, st)
        return st, mask
    idx, fa, fb = differing(ra, rb, da, db)
    n = idx.size
    st.changed = int(n)
    st.ulp_hist[0] = st.numel - n
    if n == 0:
        return st, mask
    if keep is not None:
        keep.update(idx=idx, fa=fa, fb=fb)
    probe_changed(st, idx, fa, fb, ra[idx], da, tols, eta, mask_criterion, mask, ulp=keep is None)
    return st, mask


def probe_changed(st: ChunkStats, idx, fa, fb, sa, da, tols, eta, mask_criterion, mask, ulp: bool = True) -> None:
    """The value probes of a chunk's changed entries (indices ``idx``, float64 values ``fa``/``fb``, raw base bits
    ``sa`` for the ULP histogram), and their entries of ``mask`` under ``mask_criterion``."""
    relm, absd = _slow(fa, fb, sa, da, tols, eta, st, ulp=ulp)
    if mask is not None:
        kind, val = mask_criterion
        if kind == "bitwise":
            mask[idx] = True
        elif kind == "atol":
            mask[idx[atol_exceed(absd, fa, fb, np.array([val])) > 0]] = True
        else:
            mask[idx[relm if val == eta else rel_changed_mask(absd, fa, fb, val)]] = True


def ulp_bucket_index(r: np.ndarray, finite: np.ndarray) -> np.ndarray:
    """The ULP_LABELS bucket of each changed entry moved by ``r`` ULPs (non-finite ones in the last bucket)."""
    b = np.searchsorted(ULP_EDGES, np.where(finite, r, 0.0), side="right") + 1
    b[~finite] = len(ULP_LABELS) - 1
    return b


def ulp_buckets(r: np.ndarray, finite: np.ndarray) -> np.ndarray:
    """Counts per ULP_LABELS bucket of changed entries moved by ``r`` ULPs (non-finite ones in the last bucket):
    one comparison pass per edge."""
    n = r.size
    nf = n - int(np.count_nonzero(finite))
    rf = r if nf == 0 else np.where(finite, r, 0.0)
    ge = [int(np.count_nonzero(rf >= e)) for e in ULP_EDGES.tolist()]
    hist = np.zeros(len(ULP_LABELS), np.int64)
    hist[1] = n - nf - ge[0]
    for j in range(len(ULP_EDGES) - 1):
        hist[2 + j] = ge[j] - ge[j + 1]
    hist[len(ULP_EDGES) + 1] = ge[-1]
    hist[-1] = nf
    return hist


def _slow(fa, fb, sa, da, tols, eta, st: ChunkStats, ulp: bool = True):
    """Probes for changed elements in float64 (any dtype pair), exact ties settled exactly."""
    with np.errstate(invalid="ignore", over="ignore"):
        absd = np.abs(fb - fa)
    finite = np.isfinite(absd)
    n = absd.size
    st.nonfinite += int(n - np.count_nonzero(finite))
    st.atol_changed += atol_counts(absd, fa, fb, tols)
    relm = rel_changed_mask(absd, fa, fb, eta)
    st.rel_changed += int(np.count_nonzero(relm))
    if ulp:
        with np.errstate(over="ignore"):
            r = np.ldexp(np.where(finite, absd, 0.0), -ulp_exponent(sa, da).astype(np.int32))
        st.ulp_hist += ulp_buckets(r, finite)
    if finite.any():
        af = absd[finite]
        st.max_abs = max(st.max_abs, float(af.max()))
        st.sumsq_delta += dot(af)
    return relm, absd
