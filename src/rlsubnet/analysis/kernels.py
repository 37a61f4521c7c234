"""One compiled pass per chunk for 16-bit float pairs: the C extension ``_native`` (built by ``pip install``), else numba.

The numpy probes of :mod:`.probes` make about 25 passes over a chunk (compare, gather the changed entries, widen,
count every tolerance, the relative test, the ULP buckets, the norms). Here the same numbers come from two loops: the
changed entries are gathered (with AVX-512 where the CPU has it), then every probe is evaluated on them without a
branch, so the compiler vectorises it. The rare entries whose answer needs more than float32 (exponents too far apart
for an exact float32 difference, and relative quotients within one float32 ULP of η) are only counted in that loop;
when there are any, :func:`rare16` lists them and :mod:`.probes` settles them exactly, as before. Counts are those of
the numpy path, entry for entry; the two sums of squares are accumulated in float64 here (float32 there), so the L2
norms may differ from the numpy path's in their last digits.

Two builds of the pass: the C extension ``rlsubnet.analysis._native`` (``src/rlsubnet/analysis/_native.c``, built
when rlsubnet is installed where a C compiler is; loading it costs a ``dlopen``), used for every size; where it was not
built, the numba kernels of :mod:`._jit` (``pip install 'rlsubnet[fast]'``), whose loading costs about 0.4 s a process,
so they are used only for pairs of at least ``MIN_ENTRIES`` 16-bit entries. ``RLSUBNET_JIT=1`` turns the compiled pass
on for any size, ``RLSUBNET_JIT=0`` off; ``RLSUBNET_JIT=numba`` takes numba even where the extension is built. Without
either the numpy path is used.
"""

from __future__ import annotations

import os

import numpy as np

MIN_ENTRIES = 1 << 29  # 16-bit entries (about 2 GB of a pair's reads) from which numba's pass pays for its loading
_K: dict = {}  # the compiled kernels per kind, once loaded; False when unavailable


class Native:
    """The C extension behind the signatures of :mod:`._jit` (``probe16``, ``rare16``, ``floor16``)."""

    NAME = "native"

    def __init__(self, mod):
        self._m = mod
        self.MAX_TOLS = mod.MAX_TOLS
        self.ISA = mod.ISA

    def probe16(self, ra, rb, is_bf16, tab, tols, lo, hi, emask, shift, gap_s, emin_s, ulp_off, ue_min, edges, mask,
                want_mask, ca=None, cb=None):
        """(ints, sumsq_delta, sumsq_base, max |Δ| bits) as :func:`._jit.probe16` (``ca``/``cb`` unused)."""
        ints, sd, sb, mx = self._m.probe16(
            np.ascontiguousarray(ra, np.uint16), np.ascontiguousarray(rb, np.uint16), bool(is_bf16),
            np.ascontiguousarray(tab, np.float32), np.ascontiguousarray(tols, np.float32), float(lo), float(hi),
            int(emask), int(shift), int(gap_s), int(emin_s), int(ulp_off), int(ue_min),
            np.ascontiguousarray(edges, np.float32), mask.view(np.uint8) if want_mask else None)
        return np.array(ints, np.int64), sd, sb, mx

    @staticmethod
    def rare16(ra, rb, is_bf16, tab, lo, hi, emask, gap_s, emin_s):
        """Indices of the changed entries the pass left out: (not exact in float32, in the relative band)."""
        idx = np.flatnonzero((ra != rb) & (((ra | rb) & np.uint16(0x7FFF)) != 0))
        a, b = ra[idx], rb[idx]
        ea, eb = (a & np.uint16(emask)).astype(np.int32), (b & np.uint16(emask)).astype(np.int32)
        fast = (np.abs(ea - eb) <= int(gap_s)) & (ea >= int(emin_s))
        if is_bf16:
            fa, fb = (a.astype(np.uint32) << 16).view(np.float32), (b.astype(np.uint32) << 16).view(np.float32)
        else:
            fa, fb = tab[a], tab[b]
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            q = np.abs(fb - fa) / np.maximum(np.abs(fa), np.abs(fb))
            band = fast & (q >= lo) & (q <= hi)
        return idx[~fast].astype(np.int64), idx[band].astype(np.int64)

    def floor16(self, ra, rb, frozen, mant, bins, exp_n, exp_c):
        return self._m.floor16(np.ascontiguousarray(ra, np.uint16), np.ascontiguousarray(rb, np.uint16),
                               np.ascontiguousarray(frozen, np.uint8), int(mant), int(bins), exp_n, exp_c)


def _load(kind: str):
    if kind not in _K:
        try:
            if kind == "native":
                from . import _native

                _K[kind] = Native(_native)
            else:
                from . import _jit

                _K[kind] = _jit
        except ImportError:
            _K[kind] = False
    return _K[kind] or None


def use_for(entries: int) -> bool:
    """Whether a pass over ``entries`` 16-bit entries should use the compiled kernels (see the module's text)."""
    mode = os.environ.get("RLSUBNET_JIT", "auto")
    if mode == "0":
        return False
    if mode != "numba" and _load("native") is not None:
        return True
    if mode != "1" and entries < MIN_ENTRIES:
        return False
    return kernels() is not None


def kernels():
    """The compiled kernels: the C extension where it is built (unless ``RLSUBNET_JIT=numba``), else numba's
    (:mod:`._jit`), else None."""
    if os.environ.get("RLSUBNET_JIT") != "numba":
        k = _load("native")
        if k is not None:
            return k
    return _load("numba")
