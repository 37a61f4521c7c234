"""Probes of quantized parameters: what moved, the codes or the scales, and by how many ULPs of the grid.

A quantized parameter's value is a code times a scale. RL can move a value by moving its code, by
rescaling its block (every value of the block moves while few codes do), or both; ``diff`` reports both
views. The ULP histogram of a quantized parameter is taken in its stored grid (the code grid's spacing at
the base code, times the base scale), and the precision floor holds the scale fixed: an entry is frozen
when every value within Σlr rounds back to its code.

Two quantized sides of one format are compared on their codes first (one byte a weight): where the scales
of the two checkpoints agree, only entries whose codes differ can differ in value, so values are computed
for those alone; where scales differ, every value of the chunk is computed. Either way ``changed`` is exact.
"""

from __future__ import annotations

import numpy as np

from ..io.dtypes import DTYPES
from ..io.quant import _E4M3, E2M1, QuantSpec, ValueCheckpoint, grid_half_gap, grid_ulp, requantize
from .probes import ULP_LABELS, ChunkStats, differing, probe_changed, ulp_buckets

_F64 = DTYPES["F64"]
_SQUARES32 = {False: np.square(_E4M3).astype(np.float32), True: np.square(E2M1).astype(np.float32)}  # code values², exact in float32


def quant_spec(ck, name: str) -> QuantSpec | None:
    return ck.quant.get(name) if isinstance(ck, ValueCheckpoint) else None


def same_format(ca, cb, name_a: str, name_b: str) -> bool:
    qa, qb = quant_spec(ca, name_a), quant_spec(cb, name_b)
    return qa is not None and qb is not None and qa.format == qb.format and qa.block == qb.block and qa.shape == qb.shape


def _grid_hist(st: ChunkStats, spec: QuantSpec, count: int, idx, fa, fb, codes_c, scale_c) -> None:
    """The ULP histogram in the stored grid of the base value (``codes_c``/``scale_c``: of the changed entries)."""
    hist = np.zeros(len(ULP_LABELS), np.int64)
    hist[0] = count - idx.size
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        r = np.abs(fb - fa) / grid_ulp(spec, codes_c, scale_c)
    hist += ulp_buckets(r, np.isfinite(r))
    st.ulp_hist = hist


def _floor(st: ChunkStats, spec: QuantSpec, idx, codes_a, scale_a, lr_sum: float | None) -> None:
    if lr_sum is not None:
        frozen = grid_half_gap(spec, codes_a, scale_a) > lr_sum
        st.frozen += int(np.count_nonzero(frozen))
        st.changed_frozen += int(np.count_nonzero(frozen[idx]))


def quant_chunk(ca: ValueCheckpoint, cb: ValueCheckpoint, name_a: str, name_b: str, start: int, count: int,
                tols: np.ndarray, eta: float, crit, lr_sum: float | None) -> tuple[ChunkStats, np.ndarray | None]:
    """All probes of one chunk of a parameter quantized in the same format on both sides.

    Only entries whose code moved or whose scale changed can change value: exact float64 values are computed
    for those alone (the base norm is summed over the whole chunk)."""
    spec = ca.quant[name_a]
    table = E2M1 if spec.format == "mxfp4" else _E4M3
    st = ChunkStats(numel=count, atol_changed=np.zeros(tols.size, np.int64))
    codes_a, codes_b = ca.read_codes(name_a, start, count), cb.read_codes(name_b, start, count)
    moved = codes_a != codes_b
    st.codes_changed = int(np.count_nonzero(moved))
    grid_a = ca.scales(name_a)
    if start == 0:  # the scale tensors, compared once per parameter (they are small)
        sa, sb = ca.read_scales_raw(name_a), cb.read_scales_raw(name_b)
        st.scales_changed = int(np.count_nonzero(sa != sb)) if sa.shape == sb.shape else int(max(sa.size, sb.size))
    with np.errstate(invalid="ignore", over="ignore"):  # the base norm Σ code² · scale², one float32 BLAS dot
        st.sumsq_base = float(np.dot(_SQUARES32[spec.format == "mxfp4"][codes_a],
                                     ca.expand(name_a, np.square(grid_a, dtype=np.float32), start, count)))
    same = ca.same_scales(cb, name_a, name_b)
    if not same:  # and the entries of rescaled blocks (rows, groups), whatever their codes
        rescaled = np.flatnonzero((grid_a != cb.scales(name_b)).reshape(-1))
        if rescaled.size:
            moved[ca.entries_of_scales(name_a, rescaled, start, count)] = True
    cand = np.flatnonzero(moved)
    sa_c = ca.scale_at(name_a, start + cand)
    sb_c = sa_c if same else cb.scale_at(name_b, start + cand)
    with np.errstate(invalid="ignore", over="ignore"):
        fa, fb = table[codes_a[cand]] * sa_c, table[codes_b[cand]] * sb_c
        diff = ~((fa == fb) | (np.isnan(fa) & np.isnan(fb)))  # +0 equals -0; two NaNs are equal
    idx, fa, fb, sa_c = cand[diff], fa[diff], fb[diff], sa_c[diff]
    st.changed = int(idx.size)
    st.ulp_hist[0] = count - idx.size
    mask = np.zeros(count, dtype=bool) if crit is not None else None
    if idx.size:
        probe_changed(st, idx, fa, fb, None, _F64, tols, eta, crit, mask, ulp=False)
    _grid_hist(st, spec, count, idx, fa, fb, codes_a[idx], sa_c)
    if lr_sum is not None:
        _floor(st, spec, idx, codes_a, ca.scale_of(name_a, start, count), lr_sum)
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
