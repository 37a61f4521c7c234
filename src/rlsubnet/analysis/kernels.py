"""One compiled pass per chunk for 16-bit float pairs (``pip install 'rlsubnet[fast]'``: numba).

The numpy probes of :mod:`.probes` make about 25 passes over a chunk (compare, gather the changed entries, widen,
count every tolerance, the relative test, the ULP buckets, the norms). Here the same numbers come from one loop
that the compiler vectorises: every entry is widened and every probe evaluated, unchanged entries masked out, so
there is no gather and no branch. The rare entries whose answer needs more than float32 (exponents too far apart
for an exact float32 difference, and relative quotients within one float32 ULP of η) are only counted in that
loop; when there are any, a second loop lists them and :mod:`.probes` settles them exactly, as before. Counts are
those of the numpy path, entry for entry; the two sums of squares are accumulated in float64 here (float32 there),
so the L2 norms may differ from the numpy path's in their last digits.

Loading the kernels costs about 0.4 s a process (importing numba, reading its cache), and they save about 1.5 ns an
entry per worker, so :func:`use_for` turns them on only for pairs of at least ``MIN_ENTRIES`` 16-bit entries;
``RLSUBNET_JIT=1`` turns them on for any size, ``RLSUBNET_JIT=0`` off. Without numba the numpy path is used.
"""

from __future__ import annotations

import os

MIN_ENTRIES = 1 << 29  # 16-bit entries (about 2 GB of a pair's reads) from which the compiled pass pays for its loading
_K = None  # the compiled kernels, once loaded; False when unavailable


def use_for(entries: int) -> bool:
    """Whether a pass over ``entries`` 16-bit entries should use the compiled kernels (see the module's text)."""
    mode = os.environ.get("RLSUBNET_JIT", "auto")
    if mode == "0":
        return False
    if mode != "1" and entries < MIN_ENTRIES:
        return False
    return kernels() is not None


def kernels():
    """The compiled kernels (the module :mod:`._jit`), or None where numba is missing."""
    global _K
    if _K is None:
        try:
            from . import _jit
        except ImportError:
            _K = False
        else:
            _K = _jit
    return _K or None
