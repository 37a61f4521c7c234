"""The precision floor: entries that no update of the run's size could move, and the sparsity above them.

With Σlr (the largest distance an Adam-like update can move an entry over a run), an entry whose stored
value is so large that every value within Σlr rounds back to it is *frozen by precision*: its staying
unchanged says nothing about the run. The floor is the share of such entries; a sparsity travels with it
and with the sparsity of the entries above it (``paper-facts.md`` §7).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from ..io.bits import changed_index
from ..io.dtypes import DType, below_floor
from .kernels import kernels
from .probes import ChunkStats

if TYPE_CHECKING:  # results imports this module for FloorSummary
    from .results import DiffResult


@dataclass
class FloorSummary:
    """The floor of one set of entries (a tensor, a module kind, the model)."""

    lr_sum: float
    frozen: int  # entries no update of size ≤ lr_sum could move
    fraction: float  # frozen / numel
    changed_above_floor: int
    changed_below_floor: int  # frozen entries that changed anyway (a larger update, or another cause)
    sparsity_above_floor: float | None  # unchanged share of the entries above the floor; None when there are none

    @classmethod
    def of(cls, numel: int, changed: int, frozen: int, changed_frozen: int, lr_sum: float) -> FloorSummary:
        above = numel - frozen
        ch_above = changed - changed_frozen
        return cls(lr_sum, frozen, frozen / numel if numel else 0.0, ch_above, changed_frozen,
                   1 - ch_above / above if above else None)

    def to_dict(self) -> dict:
        return asdict(self)


def floor_probe(ra: np.ndarray, rb: np.ndarray, da: DType, db: DType, bound: float, st: ChunkStats,
                compiled: bool = False) -> None:
    """The precision floor of a chunk: base entries that no update of size ≤ ``bound`` could move, how many of
    those changed anyway, and entries and changes per exponent field of the base value (``compiled``: 16-bit chunks
    in one compiled pass where :mod:`.kernels` is installed)."""
    if not da.is_float or da.name != db.name or da.name not in ("BF16", "F16", "F32"):
        return
    bins = 1 << da.exponent_bits
    k = kernels() if compiled and ra.dtype.itemsize == 2 else None
    if k is not None:  # one compiled pass: the per-code table looked up, the exponent fields counted
        st.exp_numel, st.exp_changed = np.zeros(bins, np.int64), np.zeros(bins, np.int64)
        frozen, changed_frozen = k.floor16(ra, rb, _frozen_codes(da.name, float(bound)).view(np.uint8), da.mantissa_bits,
                                           bins, st.exp_numel, st.exp_changed)
        st.frozen += int(frozen)
        st.changed_frozen += int(changed_frozen)
        return
    idx = changed_index(ra, rb)
    if ra.dtype.itemsize == 2:  # 65,536 codes: one histogram of the chunk's codes and a table per code say it all
        frozen_code = _frozen_codes(da.name, float(bound))
        hist = np.bincount(ra, minlength=1 << 16)
        hist_changed = np.bincount(ra[idx], minlength=1 << 16)
        st.frozen += int(hist[frozen_code].sum())
        st.changed_frozen += int(hist_changed[frozen_code].sum())
        # a code is sign | exponent | mantissa: the exponent field is its middle axis
        st.exp_numel = hist.reshape(2, bins, -1).sum(axis=(0, 2)).astype(np.int64)
        st.exp_changed = hist_changed.reshape(2, bins, -1).sum(axis=(0, 2)).astype(np.int64)
        return
    frozen = below_floor(ra, da, bound)
    st.frozen += int(np.count_nonzero(frozen))
    st.changed_frozen += int(np.count_nonzero(frozen[idx]))
    e = (ra >> ra.dtype.type(da.mantissa_bits)) & ra.dtype.type(bins - 1)
    st.exp_numel = np.bincount(e, minlength=bins).astype(np.int64)
    st.exp_changed = np.bincount(e[idx], minlength=bins).astype(np.int64)


@lru_cache(maxsize=32)
def _frozen_codes(dtype_name: str, bound: float) -> np.ndarray:
    """``below_floor`` of every code of a 16-bit float dtype (a 64 KiB table, computed once per dtype and bound)."""
    from ..io.dtypes import DTYPES

    return below_floor(np.arange(1 << 16, dtype=np.uint16), DTYPES[dtype_name], bound)


def attach_floor(result: DiffResult, pairs, stats, lr_sum: float) -> None:
    """Attach the precision floor (global, per tensor, per module kind) and the per-exponent table."""
    by_name = {p.name: p for p in pairs}
    tot = [0, 0, 0, 0]
    kinds: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    exp: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for t in result.tensors:
        s = stats[t.name]
        t.floor = FloorSummary.of(t.numel, t.changed, s.frozen, s.changed_frozen, lr_sum)
        for acc in (tot, kinds[t.kind]):
            acc[0] += t.numel
            acc[1] += t.changed
            acc[2] += s.frozen
            acc[3] += s.changed_frozen
        if s.exp_numel is not None:
            dt = by_name[t.name].a.dtype
            for field in np.flatnonzero(s.exp_numel):
                key = (dt.name, int(field))
                exp[key][0] += int(s.exp_numel[field])
                exp[key][1] += int(s.exp_changed[field])
    result.floor = FloorSummary.of(*tot, lr_sum)
    for g in result.by_module:
        g.floor = FloorSummary.of(*kinds[g.key], lr_sum)
    from ..io.dtypes import DTYPES

    rows = []
    for (dname, field), (n, c) in sorted(exp.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        dt = DTYPES[dname]
        e = None if field == 0 else field - dt.exponent_bias  # |w0| in [2^e, 2^(e+1)); None: zero or subnormal
        rows.append({"dtype": dt.torch_name, "exponent": e, "numel": n, "changed": c, "changed_fraction": c / n if n else 0.0})
    result.by_exponent = rows
