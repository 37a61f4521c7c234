"""The compiled kernels behind :mod:`.kernels` (imported only where numba is installed).

``probe16`` evaluates every probe of :func:`.probes._fast16` on every entry of a 16-bit chunk in one loop without
branches (so that it vectorises): unchanged entries are masked out of every count. Up to ``MAX_TOLS`` tolerances
(unused slots are +inf) and the ten ULP edges are separate scalar accumulators for the same reason.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

NAME = "numba"
MAX_TOLS = 8
_OPTS = dict(cache=True, nogil=True, fastmath={"reassoc", "contract"}, error_model="numpy", boundscheck=False)
_FLT_MAX = np.float32(np.finfo(np.float32).max)


@intrinsic
def _as_f32(typingctx, x):
    """The float32 whose bits are the uint32 ``x``."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return sig, codegen


@intrinsic
def _f32_bits(typingctx, x):
    """The bits of the float32 ``x`` as a uint32."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return sig, codegen


@njit(**_OPTS)
def _value(code, is_bf16, tab):
    if is_bf16:
        return _as_f32(np.uint32(code) << np.uint32(16))
    return tab[code]


@njit(**_OPTS)
def _sumsq(ra, is_bf16, tab):
    """Σ w0² of the chunk in float64 (a loop the compiler vectorises)."""
    s = 0.0
    if is_bf16:
        for i in range(ra.size):
            x = _as_f32(np.uint32(ra[i]) << np.uint32(16))
            s += np.float64(x) * np.float64(x)
    else:
        for i in range(ra.size):
            x = tab[ra[i]]
            s += np.float64(x) * np.float64(x)
    return s


@njit(**_OPTS)
def _compact(ra, rb, ca, cb, mask, want_mask):
    """The codes of the changed entries (bits differ, not ±0) into ``ca``/``cb``; their count. Without a branch: every
    pair is written at the next free place, which moves on only when it changed."""
    k = 0
    if want_mask:
        for i in range(ra.size):
            a = ra[i]
            b = rb[i]
            ca[k] = a
            cb[k] = b
            neq = (a != b) & (((a | b) & np.uint16(0x7FFF)) != 0)
            mask[i] = neq
            k += neq
    else:
        for i in range(ra.size):
            a = ra[i]
            b = rb[i]
            ca[k] = a
            cb[k] = b
            k += (a != b) & (((a | b) & np.uint16(0x7FFF)) != 0)
    return k


@njit(**_OPTS)
def probe16(ra, rb, is_bf16, tab, tols, lo, hi, emask, shift, gap_s, emin_s, ulp_off, ue_min, edges, mask, want_mask,
            ca, cb):
    """Counts of one chunk: (ints, sumsq_delta, sumsq_base, max |Δ|). ``ca``/``cb``: scratch of the chunk's size.

    ints = [changed, bf16-relative changed, non-finite, NaN, not exact in float32, in the relative band,
    exceed tol 0..MAX_TOLS-1, |Δ|/ULP ≥ edge 0..9]; from "non-finite" on only the changed entries whose float32
    difference is exact ("fast") count, and the band entries are left out of the relative count. Each count is its
    own scalar accumulator (a histogram indexed per entry stalls on its own stores)."""
    sb = _sumsq(ra, is_bf16, tab)
    n = _compact(ra, rb, ca, cb, mask, want_mask)
    t0, t1, t2, t3, t4, t5, t6, t7 = tols[0], tols[1], tols[2], tols[3], tols[4], tols[5], tols[6], tols[7]
    e0, e1, e2, e3, e4, e5, e6, e7, e8, e9 = (edges[0], edges[1], edges[2], edges[3], edges[4], edges[5], edges[6],
                                              edges[7], edges[8], edges[9])
    n_rel = n_nf = n_nan = n_slow = n_band = 0
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0
    g0 = g1 = g2 = g3 = g4 = g5 = g6 = g7 = g8 = g9 = 0
    sd = 0.0
    mx = np.uint32(0)
    for i in range(n):
        a = ca[i]
        b = cb[i]
        fa = _value(a, is_bf16, tab)
        fb = _value(b, is_bf16, tab)
        ea = np.int32(a & emask)
        eb = np.int32(b & emask)
        fast = (abs(ea - eb) <= gap_s) & (ea >= emin_s)
        absd = abs(fb - fa)
        nan = absd != absd
        fin = absd <= _FLT_MAX
        n_slow += not fast
        w = fast
        n_nf += w & (not fin)
        n_nan += w & nan
        x = np.float32(np.inf) if nan else absd  # NaN exceeds every tolerance
        a0 += w & (x > t0)
        a1 += w & (x > t1)
        a2 += w & (x > t2)
        a3 += w & (x > t3)
        a4 += w & (x > t4)
        a5 += w & (x > t5)
        a6 += w & (x > t6)
        a7 += w & (x > t7)
        q = absd / max(abs(fa), abs(fb))
        qfin = abs(q) <= _FLT_MAX
        inband = (q >= lo) & (q <= hi)
        n_band += w & inband
        n_rel += w & (not inband) & ((q > hi) | (not qfin))
        ue = max((ea >> shift) - ulp_off, ue_min)
        ad = absd if (fin & fast) else np.float32(0.0)
        r = ad * _as_f32(np.uint32((127 - ue) << 23))
        g0 += r >= e0
        g1 += r >= e1
        g2 += r >= e2
        g3 += r >= e3
        g4 += r >= e4
        g5 += r >= e5
        g6 += r >= e6
        g7 += r >= e7
        g8 += r >= e8
        g9 += r >= e9
        sd += np.float64(ad) * np.float64(ad)
        mx = max(mx, _f32_bits(ad))  # |Δ| ≥ 0: its bits order as its values
    ints = np.array([n, n_rel, n_nf, n_nan, n_slow, n_band, a0, a1, a2, a3, a4, a5, a6, a7,
                     g0, g1, g2, g3, g4, g5, g6, g7, g8, g9], dtype=np.int64)
    return ints, sd, sb, mx


@njit(**_OPTS)
def rare16(ra, rb, is_bf16, tab, lo, hi, emask, gap_s, emin_s):
    """Indices of the changed entries ``probe16`` left out: (not exact in float32, in the relative band)."""
    slow = []
    band = []
    for i in range(ra.size):
        a = ra[i]
        b = rb[i]
        if a == b or ((a | b) & np.uint16(0x7FFF)) == 0:
            continue
        ea = np.int32(a & emask)
        eb = np.int32(b & emask)
        if not ((abs(ea - eb) <= gap_s) & (ea >= emin_s)):
            slow.append(i)
            continue
        fa = _value(a, is_bf16, tab)
        fb = _value(b, is_bf16, tab)
        absd = abs(fb - fa)
        q = absd / max(abs(fa), abs(fb))
        if (q >= lo) & (q <= hi):
            band.append(i)
    return np.array(slow, dtype=np.int64), np.array(band, dtype=np.int64)


@njit(**_OPTS)
def floor16(ra, rb, frozen, mant, bins, exp_n, exp_c):
    """The precision floor of a 16-bit chunk: (frozen entries, of which changed); per-exponent counts added to
    ``exp_n`` / ``exp_c``. ``frozen`` is the per-code table (uint8)."""
    nf = 0
    nfc = 0
    for i in range(ra.size):
        a = ra[i]
        b = rb[i]
        neq = (a != b) & (((a | b) & np.uint16(0x7FFF)) != 0)
        f = frozen[a]
        nf += f
        nfc += f & neq
        e = (np.int64(a) >> mant) & (bins - 1)
        exp_n[e] += 1
        exp_c[e] += neq
    return nf, nfc
