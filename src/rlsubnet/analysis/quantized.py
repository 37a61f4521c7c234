"""Probes of quantized parameters: what moved, the codes or the scales, and by how many ULPs of the grid.

A quantized parameter's value is a code times a scale. RL can move a value by moving its code, by
rescaling its block (every value of the block moves while few codes do), or both; ``diff`` reports both
views. The ULP histogram of a quantized parameter is taken in its stored grid (the code grid's spacing at
the base code, times the base scale), and the precision floor holds the scale fixed: an entry is frozen
when every value within Σlr rounds back to its code.

Two quantized sides of one format are compared on their codes first (one byte a weight): where the scales
of the two checkpoints agree, only entries whose codes differ can differ in value, and every probe of such an
entry is a function of its two codes and its scale (looked up per code pair, counted from a histogram of the
pairs); in a rescaled block, an entry whose code stayed is a function of its block and its code (counted from
a histogram of (block, code)). Only entries whose code moved inside a rescaled block, and parameters whose
scales are not all positive and finite, are probed one by one from their float64 values. Either way
``changed`` and every count are exact (``tests/test_quantized.py`` checks them against the diff of the
dequantized float64 pair).
"""

from __future__ import annotations

import numpy as np

from ..io.dtypes import DTYPES, dot
from ..io.quant import _E4M3, E2M1, ULP_E2M1, ULP_E4M3, QuantSpec, ValueCheckpoint, grid_half_gap, grid_ulp, requantize
from .probes import ULP_EDGES, ULP_LABELS, ChunkStats, atol_exceed, differing, probe_changed, rel_changed_mask, ulp_buckets

_F64 = DTYPES["F64"]
_SQUARES32 = {False: np.square(_E4M3).astype(np.float32), True: np.square(E2M1).astype(np.float32)}  # code values², exact in float32
# code² + code'² of two neighbouring codes, per pair of codes read as one uint16 (fp8: 2 × 8 bits; the sum rounded
# once in float32, as the dot's own sums are)
_PAIR_SQUARES32 = (_SQUARES32[False][np.arange(65536) & 0xFF] + _SQUARES32[False][np.arange(65536) >> 8]).astype(np.float32)


def quant_spec(ck, name: str) -> QuantSpec | None:
    return ck.quant.get(name) if isinstance(ck, ValueCheckpoint) else None


def same_format(ca, cb, name_a: str, name_b: str) -> bool:
    qa, qb = quant_spec(ca, name_a), quant_spec(cb, name_b)
    return qa is not None and qb is not None and qa.format == qb.format and qa.block == qb.block and qa.shape == qb.shape


def _grid_counts(spec: QuantSpec, fa, fb, codes_c, scale_c) -> np.ndarray:
    """ULP-bucket counts of changed entries in the stored grid of the base value (``codes_c``/``scale_c``: of the
    changed entries); the "0" bucket is left to the caller."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        r = np.abs(fb - fa) / grid_ulp(spec, codes_c, scale_c)
    counts = ulp_buckets(r, np.isfinite(r))
    counts[0] = 0
    return counts


def _grid_hist(st: ChunkStats, spec: QuantSpec, count: int, idx, fa, fb, codes_c, scale_c) -> None:
    """The ULP histogram in the stored grid of the base value (``codes_c``/``scale_c``: of the changed entries)."""
    hist = _grid_counts(spec, fa, fb, codes_c, scale_c)
    hist[0] = count - idx.size
    st.ulp_hist = hist


def _floor(st: ChunkStats, spec: QuantSpec, idx, codes_a, scale_a, lr_sum: float | None) -> None:
    if lr_sum is not None:
        frozen = grid_half_gap(spec, codes_a, scale_a) > lr_sum
        st.frozen += int(np.count_nonzero(frozen))
        st.changed_frozen += int(np.count_nonzero(frozen[idx]))


class _PairTables:
    """Everything the probes need about a pair of codes under one common scale, for every pair at once.

    With the scale ``s > 0`` held by both sides, value-changed, the relative criterion, the non-finite flag and
    the ULP bucket in the base's grid depend on the two codes alone (|Δ| = |E[b] − E[a]|·s and ULP = U[a]·s), so
    they are looked up per pair (index ``a·n + b``; 256² pairs for fp8, 16² for e2m1) and counted from one
    histogram of the chunk's pairs; only the absolute tolerances need the scale, and |E[b] − E[a]|·s is exact
    in float64 (at most 21 significant bits times a float32 scale's 24)."""

    def __init__(self, table: np.ndarray, ulp: np.ndarray):
        n = table.size
        a, b = np.repeat(table, n), np.tile(table, n)
        self.n, self.a, self.b = n, a, b
        with np.errstate(invalid="ignore"):
            d = np.abs(b - a)
            self.neq = ~((a == b) | (np.isnan(a) & np.isnan(b)))  # +0 equals -0; two NaNs are equal
        self.d = np.where(self.neq, d, 0.0)  # NaN where exactly one side is NaN
        self.nonfinite = self.neq & ~np.isfinite(d)
        finite = np.isfinite(self.d)
        r = np.where(finite, self.d, 0.0) / np.repeat(ulp, n)
        bucket = np.searchsorted(ULP_EDGES, r, side="right") + 1
        bucket[~finite] = len(ULP_LABELS) - 1
        bucket[~self.neq] = 0
        self.bucket = bucket
        self._rel: dict[float, np.ndarray] = {}

    def rel(self, eta: float) -> np.ndarray:
        """Per pair: |Δ| > η·max(|w0|,|w1|) exactly (the scale cancels), for changed pairs only."""
        hit = self._rel.get(eta)
        if hit is None:
            hit = self._rel[eta] = rel_changed_mask(self.d, self.a, self.b, eta) & self.neq
        return hit


_TABLES: dict[str, _PairTables] = {}


def _pair_tables(fmt: str) -> _PairTables:
    key = "mxfp4" if fmt == "mxfp4" else "e4m3"
    t = _TABLES.get(key)
    if t is None:
        t = _TABLES[key] = _PairTables(E2M1, ULP_E2M1) if key == "mxfp4" else _PairTables(_E4M3, ULP_E4M3)
    return t


def _by_pairs(st: ChunkStats, tab: _PairTables, cand: np.ndarray, codes_a, codes_b, scale_c, tols: np.ndarray,
              eta: float, crit, mask) -> np.ndarray:
    """The probes of entries ``cand`` whose codes moved under one unchanged, positive, finite scale (``scale_c``:
    theirs). Returns the indices whose value changed."""
    p = codes_a[cand].astype(np.intp) * tab.n + codes_b[cand]
    if 4 * p.size < tab.neq.size:  # few pairs: look each one up
        keep = tab.neq[p]
        if not keep.all():  # rare: +0 against -0, or NaN against NaN
            cand, p, scale_c = cand[keep], p[keep], scale_c[keep]
        nonfinite = int(np.count_nonzero(tab.nonfinite[p]))
        st.rel_changed += int(np.count_nonzero(tab.rel(eta)[p]))
        st.ulp_hist += np.bincount(tab.bucket[p], minlength=len(ULP_LABELS))
    else:  # many: one histogram of the pairs, every count read from it
        hist = np.bincount(p, minlength=tab.n * tab.n)
        if np.dot(hist, ~tab.neq):
            keep = tab.neq[p]
            cand, p, scale_c = cand[keep], p[keep], scale_c[keep]
            hist = np.bincount(p, minlength=tab.n * tab.n)
        nonfinite = int(np.dot(hist, tab.nonfinite))
        st.rel_changed += int(np.dot(hist, tab.rel(eta)))
        st.ulp_hist += np.bincount(tab.bucket, weights=hist, minlength=len(ULP_LABELS)).astype(np.int64)
    st.changed += int(cand.size)
    st.nonfinite += nonfinite
    with np.errstate(invalid="ignore"):
        absd = tab.d[p] * scale_c  # exact
        for j, t in enumerate(tols):
            st.atol_changed[j] += int(np.count_nonzero(absd > t)) + nonfinite  # NaN exceeds every tolerance
    af = absd[np.isfinite(absd)] if nonfinite else absd
    if af.size:
        st.max_abs = max(st.max_abs, float(af.max()))
        st.sumsq_delta += dot(af)
    if mask is not None:
        kind, val = crit
        if kind == "bitwise":
            mask[cand] = True
        elif kind == "atol":
            with np.errstate(invalid="ignore"):
                mask[cand[~(absd <= val)]] = True
        else:
            mask[cand[tab.rel(val)[p]]] = True
    return cand


def _sumsq_base(ca: ValueCheckpoint, name: str, spec: QuantSpec, codes: np.ndarray, grid: np.ndarray, start: int,
                count: int) -> float:
    """Σ code² · scale² over the chunk, in float32 products (a norm, not a count). fp8 codes are read two at a
    time where neighbours share their scale: one table lookup and one scale per pair."""
    s2 = np.square(grid, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        if spec.format != "mxfp4" and ca.pairs_share_scales(name, start, count):
            return float(np.dot(_PAIR_SQUARES32[codes.view(np.uint16)], ca.expand(name, s2, start, count, pairs=True)))
        return float(np.dot(_SQUARES32[spec.format == "mxfp4"][codes], ca.expand(name, s2, start, count)))


def _scales_at(ck: ValueCheckpoint, name: str, start: int, count: int, idx: np.ndarray) -> np.ndarray:
    """The scales of the chunk's entries ``idx``: looked up one by one for a few, spread over the chunk for many."""
    if idx.size * 8 < count:
        return ck.scale_at(name, start + idx)
    return ck.scale_of(name, start, count)[idx]


def _by_value(st: ChunkStats, spec: QuantSpec, cand, codes_a, codes_b, sa_c, sb_c, tols, eta, crit, mask) -> np.ndarray:
    """The probes of entries ``cand`` from their exact float64 values (rescaled blocks, or scales that are not
    positive and finite; ``sa_c``/``sb_c``: their scales). Returns the indices whose value changed."""
    table = E2M1 if spec.format == "mxfp4" else _E4M3
    with np.errstate(invalid="ignore", over="ignore"):
        fa, fb = table[codes_a[cand]] * sa_c, table[codes_b[cand]] * sb_c
        diff = ~((fa == fb) | (np.isnan(fa) & np.isnan(fb)))  # +0 equals -0; two NaNs are equal
    idx, fa, fb, sa_c = cand[diff], fa[diff], fb[diff], sa_c[diff]
    st.changed += int(idx.size)
    if idx.size:
        probe_changed(st, idx, fa, fb, None, _F64, tols, eta, crit, mask, ulp=False)
        st.ulp_hist += _grid_counts(spec, fa, fb, codes_a[idx], sa_c)
    return idx


def _rescaled_by_code(st: ChunkStats, spec: QuantSpec, idx: np.ndarray, pos: np.ndarray, sa_w: np.ndarray,
                      sb_w: np.ndarray, codes_a, codes_b, ca: ValueCheckpoint, cb: ValueCheckpoint, name_a: str,
                      name_b: str, start: int, tols, eta, crit, mask) -> np.ndarray:
    """The probes of the entries ``idx`` of rescaled blocks (``pos``: each one's block, whose positive, finite
    scales went from ``sa_w`` to ``sb_w``). An entry whose code stayed moves from E[c]·sa to E[c]·sb: every probe
    is a function of (block, code), so those entries are counted from one histogram of (block, code) and probed
    once per pair present; entries whose code moved as well go by value. Returns the indices whose value changed."""
    table = E2M1 if spec.format == "mxfp4" else _E4M3
    n = table.size
    xa, xb = codes_a[idx], codes_b[idx]
    stay = xa == xb
    moved = idx[~stay]
    idx, key = idx[stay], pos[stay] * n + xa[stay]
    hist = np.bincount(key, minlength=sa_w.size * n)
    u = np.flatnonzero(hist)
    w, c = u // n, u % n
    with np.errstate(invalid="ignore", over="ignore"):
        fa, fb = table[c] * sa_w[w], table[c] * sb_w[w]
        diff = ~((fa == fb) | (np.isnan(fa) & np.isnan(fb)))  # zeros and NaNs stay equal under any scale
    u, w, c, fa, fb = u[diff], w[diff], c[diff], fa[diff], fb[diff]
    wts = hist[u]
    with np.errstate(invalid="ignore", over="ignore"):
        absd = np.abs(fb - fa)
    finite = np.isfinite(absd)
    st.changed += int(wts.sum())
    st.nonfinite += int(wts[~finite].sum())
    k = atol_exceed(absd, fa, fb, tols)
    bc = np.bincount(k, weights=wts, minlength=tols.size + 1).astype(np.int64)
    st.atol_changed += np.cumsum(bc[::-1])[::-1][1:]  # count(k > j) for each j
    relm = rel_changed_mask(absd, fa, fb, eta)
    st.rel_changed += int(wts[relm].sum())
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        r = absd / grid_ulp(spec, c, sa_w[w])
    rf = np.isfinite(r)
    bucket = np.searchsorted(ULP_EDGES, np.where(rf, r, 0.0), side="right") + 1
    bucket[~rf] = len(ULP_LABELS) - 1
    st.ulp_hist += np.bincount(bucket, weights=wts, minlength=len(ULP_LABELS)).astype(np.int64)
    if finite.any():
        st.max_abs = max(st.max_abs, float(absd[finite].max()))
        st.sumsq_delta += float(np.dot(wts[finite], np.square(absd[finite])))
    flags = np.zeros(hist.size, bool)  # per (block, code): changed
    flags[u] = True
    changed = idx[flags[key]]
    if mask is not None:
        kind, val = crit
        if kind != "bitwise":
            flags[:] = False
            flags[u] = (atol_exceed(absd, fa, fb, np.array([val])) > 0) if kind == "atol" else (
                relm if val == eta else rel_changed_mask(absd, fa, fb, val))
        mask[idx[flags[key]]] = True
    if moved.size:
        byv = _by_value(st, spec, moved, codes_a, codes_b, ca.scale_at(name_a, start + moved),
                        cb.scale_at(name_b, start + moved), tols, eta, crit, mask)
        changed = np.concatenate([changed, byv])
    return changed


def quant_chunk(ca: ValueCheckpoint, cb: ValueCheckpoint, name_a: str, name_b: str, start: int, count: int,
                tols: np.ndarray, eta: float, crit, lr_sum: float | None) -> tuple[ChunkStats, np.ndarray | None]:
    """All probes of one chunk of a parameter quantized in the same format on both sides.

    Only entries whose code moved or whose scale changed can change value. Entries whose codes moved under an
    unchanged scale are probed per code pair (:class:`_PairTables`); the entries of rescaled blocks from their
    exact float64 values. The base norm is summed over the whole chunk."""
    spec = ca.quant[name_a]
    st = ChunkStats(numel=count, atol_changed=np.zeros(tols.size, np.int64))
    codes_a, codes_b = ca.read_codes(name_a, start, count), cb.read_codes(name_b, start, count)
    moved = codes_a != codes_b
    st.codes_changed = int(np.count_nonzero(moved))
    grid_a = ca.scales(name_a)
    if start == 0:  # the scale tensors, compared once per parameter (they are small)
        sa, sb = ca.read_scales_raw(name_a), cb.read_scales_raw(name_b)
        st.scales_changed = int(np.count_nonzero(sa != sb)) if sa.shape == sb.shape else int(max(sa.size, sb.size))
    st.sumsq_base = _sumsq_base(ca, name_a, spec, codes_a, grid_a, start, count)
    mask = np.zeros(count, dtype=bool) if crit is not None else None
    same = ca.same_scales(cb, name_a, name_b)
    rescaled = np.zeros(0, np.int64)
    if not same:  # the entries of rescaled blocks (rows, groups), whatever their codes
        grid_b = cb.scales(name_b)
        which = np.flatnonzero((grid_a != grid_b).reshape(-1))
        if which.size:
            rescaled, pos = ca.entries_of_scales(name_a, which, start, count, ids=True)
            moved[rescaled] = False
    cand = np.flatnonzero(moved)
    if ca.scales_positive(name_a):
        scale_c = _scales_at(ca, name_a, start, count, cand)
        parts = [_by_pairs(st, _pair_tables(spec.format), cand, codes_a, codes_b, scale_c, tols, eta, crit, mask)]
    else:
        scale_c = _scales_at(ca, name_a, start, count, cand)
        parts = [_by_value(st, spec, cand, codes_a, codes_b, scale_c, scale_c, tols, eta, crit, mask)]
    if rescaled.size and ca.scales_positive(name_a) and cb.scales_positive(name_b):
        parts.append(_rescaled_by_code(st, spec, rescaled, pos, grid_a.reshape(-1)[which], grid_b.reshape(-1)[which],
                                       codes_a, codes_b, ca, cb, name_a, name_b, start, tols, eta, crit, mask))
    elif rescaled.size:
        parts.append(_by_value(st, spec, rescaled, codes_a, codes_b, _scales_at(ca, name_a, start, count, rescaled),
                               _scales_at(cb, name_b, start, count, rescaled), tols, eta, crit, mask))
    st.ulp_hist[0] = count - st.changed
    if lr_sum is not None:
        _floor(st, spec, np.concatenate(parts), codes_a, ca.scale_of(name_a, start, count), lr_sum)
    return st, mask


def quant_probe(st: ChunkStats, ra: np.ndarray, rb: np.ndarray, da, db, ca, cb, name_a: str, name_b: str,
                start: int, lr_sum: float | None, kept: dict | None = None) -> None:
    """The quantized views of a chunk where only one side is quantized (the value probes ran on float64 values;
    ``kept``: the changed indices and values :func:`probe_chunk` found). A quantized base against an
    unquantized tuned model also counts the changes that survive rounding the tuned values into base's grid."""
    qa = quant_spec(ca, name_a)
    if qa is None:
        return  # an unquantized base: its own ULPs and floor apply
    count = ra.size
    if kept and "idx" in kept:
        idx, fa, fb = kept["idx"], kept["fa"], kept["fb"]
    else:
        idx, fa, fb = differing(ra, rb, da, db)
    codes_a, scale_a, _ = ca.values(name_a, start, count)
    back = requantize(qa, fb, scale_a[idx])
    with np.errstate(invalid="ignore"):
        survive = (back != fa) & ~(np.isnan(back) & np.isnan(fa))
    st.survive_requantize += int(np.count_nonzero(survive))
    _grid_hist(st, qa, count, idx, fa, fb, codes_a[idx], scale_a[idx])
    _floor(st, qa, idx, codes_a, scale_a, lr_sum)
