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
from .probes import ULP_LABELS, ChunkStats, atol_exceed, differing, probe_changed, rel_changed_mask, ulp_bucket_index, ulp_buckets

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
        bucket = ulp_bucket_index(np.where(finite, self.d, 0.0) / np.repeat(ulp, n), finite)
        bucket[~self.neq] = 0
        self.bucket = bucket
        self._rel: dict[float, np.ndarray] = {}
        self._info: dict[float, np.ndarray] = {}

    def rel(self, eta: float) -> np.ndarray:
        """Per pair: |Δ| > η·max(|w0|,|w1|) exactly (the scale cancels), for changed pairs only."""
        hit = self._rel.get(eta)
        if hit is None:
            hit = self._rel[eta] = rel_changed_mask(self.d, self.a, self.b, eta) & self.neq
        return hit

    def info(self, eta: float) -> np.ndarray:
        """Per pair, one byte: the ULP bucket (bits 0-3), relative criterion (bit 4), non-finite (bit 5), value
        changed (bit 6), so one lookup and one 128-bin histogram count every scale-free probe of a chunk."""
        hit = self._info.get(eta)
        if hit is None:
            hit = self._info[eta] = (self.bucket | (self.rel(eta) << 4) | (self.nonfinite << 5) | (self.neq << 6)).astype(np.uint8)
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
    p = np.take(codes_a, cand).astype(np.intp) * tab.n + np.take(codes_b, cand)
    info = np.take(tab.info(eta), p, mode="wrap")
    h = np.bincount(info, minlength=128)
    if h[:64].any():  # rare: +0 against -0, or NaN against NaN (value unchanged)
        keep = info >= 64
        cand, p, scale_c, info = cand[keep], p[keep], scale_c[keep], info[keep]
        h[:64] = 0
    bits = np.arange(128)
    nonfinite = int(h[(bits & 32) > 0].sum())
    st.changed += int(cand.size)
    st.nonfinite += nonfinite
    st.rel_changed += int(h[(bits & 16) > 0].sum())
    st.ulp_hist += np.bincount(bits & 15, weights=h)[: len(ULP_LABELS)].astype(np.int64)  # buckets 0-12
    with np.errstate(invalid="ignore"):
        absd = np.take(tab.d, p, mode="wrap") * scale_c  # exact
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
    blocks = _block_rows(spec, start, count)
    with np.errstate(invalid="ignore", over="ignore"):
        if blocks is not None and spec.block[1] % 2 == 0:  # whole block rows: sum per row and block, then per block
            rows, br0 = blocks
            bm, bn = spec.block
            nb = spec.shape[-1] // bn
            sq = np.take(_PAIR_SQUARES32, codes.view(np.uint16), mode="wrap")  # take: indices in range, no checks
            per_row = np.einsum("ijk->ij", sq.reshape(rows, nb, bn // 2))
            per_block = np.add.reduceat(per_row, np.arange(0, rows, bm), axis=0)
            return float(np.sum(per_block * s2.reshape(-1, nb)[br0 : br0 + per_block.shape[0]], dtype=np.float64))
        if spec.format != "mxfp4" and ca.pairs_share_scales(name, start, count):
            sq = np.take(_PAIR_SQUARES32, codes.view(np.uint16), mode="wrap")
            return float(np.dot(sq, ca.expand(name, s2, start, count, pairs=True)))
        sq = np.take(_SQUARES32[spec.format == "mxfp4"], codes, mode="wrap")
        return float(np.dot(sq, ca.expand(name, s2, start, count)))


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


def _code_hist_probe(st: ChunkStats, spec: QuantSpec, hist: np.ndarray, sa_w: np.ndarray, sb_w: np.ndarray, tols,
                     eta: float, crit) -> tuple[np.ndarray, np.ndarray | None]:
    """Probe entries whose code stayed in rescaled blocks from ``hist``, their count per (block, code) (flat,
    block-major; the block's positive, finite scales went from ``sa_w`` to ``sb_w``): each (block, code) present
    is probed once and counted with its weight. Returns per (block, code): changed, and (with ``crit``) selected
    by the mask criterion."""
    table = E2M1 if spec.format == "mxfp4" else _E4M3
    n = table.size
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
    bucket = ulp_bucket_index(r, np.isfinite(r))
    st.ulp_hist += np.bincount(bucket, weights=wts, minlength=len(ULP_LABELS)).astype(np.int64)
    if finite.any():
        st.max_abs = max(st.max_abs, float(absd[finite].max()))
        st.sumsq_delta += float(np.dot(wts[finite], np.square(absd[finite])))
    flags = np.zeros(hist.size, bool)
    flags[u] = True
    picked = None
    if crit is not None:
        kind, val = crit
        picked = flags
        if kind != "bitwise":
            picked = np.zeros(hist.size, bool)
            picked[u] = (atol_exceed(absd, fa, fb, np.array([val])) > 0) if kind == "atol" else (
                relm if val == eta else rel_changed_mask(absd, fa, fb, val))
    return flags, picked


def _rescaled_by_code(st: ChunkStats, spec: QuantSpec, idx: np.ndarray, pos: np.ndarray, sa_w: np.ndarray,
                      sb_w: np.ndarray, codes_a, codes_b, ca: ValueCheckpoint, cb: ValueCheckpoint, name_a: str,
                      name_b: str, start: int, tols, eta, crit, mask, want_idx: bool) -> np.ndarray:
    """The probes of the entries ``idx`` of rescaled blocks (``pos``: each one's block, whose positive, finite
    scales went from ``sa_w`` to ``sb_w``). An entry whose code stayed moves from E[c]·sa to E[c]·sb: every probe
    is a function of (block, code), so those entries are counted from one histogram of (block, code)
    (:func:`_code_hist_probe`); entries whose code moved as well go by value. Returns the indices whose value
    changed (with ``want_idx``; else those of the moved codes only)."""
    n = 16 if spec.format == "mxfp4" else 256
    xa, xb = codes_a[idx], codes_b[idx]
    stay = xa == xb
    moved = idx[~stay]
    idx, key = idx[stay], pos[stay] * n + xa[stay]
    flags, picked = _code_hist_probe(st, spec, np.bincount(key, minlength=sa_w.size * n), sa_w, sb_w, tols, eta, crit)
    changed = idx[flags[key]] if want_idx else np.zeros(0, np.int64)
    if mask is not None:
        mask[idx[picked[key]]] = True
    if moved.size:
        byv = _by_value(st, spec, moved, codes_a, codes_b, ca.scale_at(name_a, start + moved),
                        cb.scale_at(name_b, start + moved), tols, eta, crit, mask)
        changed = np.concatenate([changed, byv])
    return changed


def block_row_chunk(spec: QuantSpec, chunk: int) -> int | None:
    """Chunks of whole block rows for an fp8-block parameter (about ``chunk`` entries, at least one block row), so
    each rescaled block is a slice of one chunk; None (the default chunks) for other layouts."""
    if spec.format != "fp8-block" or spec.shape[-1] % spec.block[1] or (len(spec.shape) > 2 and spec.shape[-2] % spec.block[0]):
        return None
    per = spec.shape[-1] * spec.block[0]  # a multiple of 8 whenever the block height is
    return max(1, chunk // per) * per if per % 8 == 0 else None


def _block_rows(spec: QuantSpec, start: int, count: int) -> tuple[int, int] | None:
    """(rows in the chunk, its first block row) when the chunk holds whole block rows of an fp8-block parameter whose
    rows split into whole blocks (the chunks ``diff`` gives such parameters), else None."""
    if spec.format != "fp8-block":
        return None
    C = spec.shape[-1]
    bm, bn = spec.block
    if C % bn or start % (C * bm) or count % C or (len(spec.shape) > 2 and spec.shape[-2] % bm):
        return None
    return count // C, start // (C * bm)


def _rescaled_blocks(st: ChunkStats, spec: QuantSpec, which: np.ndarray, grid_a: np.ndarray, grid_b: np.ndarray,
                     codes_a, codes_b, moved, rows: int, br0: int, ca: ValueCheckpoint, cb: ValueCheckpoint, name_a: str,
                     name_b: str, start: int, tols, eta, crit, mask, want_idx: bool) -> np.ndarray:
    """:func:`_rescaled_by_code` for a chunk of whole block rows: each rescaled block is a slice of the chunk (no
    index per entry); its entries leave ``moved`` (the code-pair candidates). Same counts, same return."""
    C = spec.shape[-1]
    bm, bn = spec.block
    nb = C // bn
    br, bcol = np.divmod(which, nb)
    sel = (br >= br0) & (br < br0 + -(-rows // bm))
    which, br, bcol = which[sel], br[sel], bcol[sel]
    if which.size == 0:
        return np.zeros(0, np.int64)
    A2, B2, M2 = codes_a.reshape(rows, C), codes_b.reshape(rows, C), moved.reshape(rows, C)
    slices = [(slice((r - br0) * bm, min((r - br0 + 1) * bm, rows)), slice(c * bn, (c + 1) * bn)) for r, c in zip(br.tolist(), bcol.tolist())]
    hist = np.zeros((which.size, 256), np.int64)
    movers = []
    for j, (rs, cs) in enumerate(slices):
        A, B = A2[rs, cs], B2[rs, cs]
        stay = A == B
        M2[rs, cs] = False
        hist[j] = np.bincount(A[stay], minlength=256)
        mv = np.flatnonzero(~stay)
        if mv.size:
            ri, ci = np.divmod(mv, bn)
            movers.append((rs.start + ri) * C + cs.start + ci)
    flags, picked = _code_hist_probe(st, spec, hist.reshape(-1), grid_a.reshape(-1)[which], grid_b.reshape(-1)[which],
                                     tols, eta, crit)
    parts = []
    if want_idx or mask is not None:
        flags, picked = flags.reshape(which.size, 256), None if picked is None else picked.reshape(which.size, 256)
        for j, (rs, cs) in enumerate(slices):
            A = A2[rs, cs]
            stay = A == B2[rs, cs]
            if want_idx:
                ri, ci = np.nonzero(stay & flags[j][A])
                parts.append((rs.start + ri) * C + cs.start + ci)
            if mask is not None:
                ri, ci = np.nonzero(stay & picked[j][A])
                mask[(rs.start + ri) * C + cs.start + ci] = True
    if movers:
        mv = np.concatenate(movers)
        parts.append(_by_value(st, spec, mv, codes_a, codes_b, ca.scale_at(name_a, start + mv), cb.scale_at(name_b, start + mv),
                               tols, eta, crit, mask))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


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
    positive = ca.scales_positive(name_a) and (same or cb.scales_positive(name_b))
    want_idx = lr_sum is not None  # the floor needs the changed entries themselves; the counts do not
    blocks = _block_rows(spec, start, count) if positive else None
    rescaled, parts = np.zeros(0, np.int64), []
    if not same:  # the entries of rescaled blocks (rows, groups), whatever their codes
        grid_b = cb.scales(name_b)
        which = np.flatnonzero((grid_a != grid_b).reshape(-1))
        if which.size and blocks is not None:
            parts.append(_rescaled_blocks(st, spec, which, grid_a, grid_b, codes_a, codes_b, moved, *blocks, ca, cb, name_a, name_b,
                                          start, tols, eta, crit, mask, want_idx))
        elif which.size:
            rescaled, pos = ca.entries_of_scales(name_a, which, start, count, ids=True)
            moved[rescaled] = False
    cand = np.flatnonzero(moved)
    scale_c = _scales_at(ca, name_a, start, count, cand)
    if ca.scales_positive(name_a):
        parts.append(_by_pairs(st, _pair_tables(spec.format), cand, codes_a, codes_b, scale_c, tols, eta, crit, mask))
    else:
        parts.append(_by_value(st, spec, cand, codes_a, codes_b, scale_c, scale_c, tols, eta, crit, mask))
    if rescaled.size and positive:
        parts.append(_rescaled_by_code(st, spec, rescaled, pos, grid_a.reshape(-1)[which], grid_b.reshape(-1)[which],
                                       codes_a, codes_b, ca, cb, name_a, name_b, start, tols, eta, crit, mask, want_idx))
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
