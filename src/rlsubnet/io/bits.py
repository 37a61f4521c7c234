"""The bit-level rules, in one place: the raw integer view of stored values, and what "changed" means.

A stored entry *changed* when its stored bits differ, except that +0 and -0 are the same value (floating
dtypes); NaN payloads compare bitwise. :mod:`rlsubnet.analysis`, :mod:`rlsubnet.masks` and
:mod:`rlsubnet.training` all use these functions instead of their own copies.
"""

from __future__ import annotations

import numpy as np

_NP_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def torch_raw(t) -> np.ndarray:
    """The raw unsigned-integer view (numpy, no copy where possible) of a CPU torch tensor's bits, flattened."""
    import torch

    t = t.detach().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    t = t.contiguous()
    int_view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(int_view).numpy().view(_NP_RAW[t.element_size()])


def stored_raw(p, dtype) -> np.ndarray:
    """Raw bits of a tensor as it would be stored in torch ``dtype`` (flattened, on the CPU)."""
    return torch_raw(p.detach().to("cpu", dtype))


def sign_mask(raw: np.ndarray):
    return raw.dtype.type(1 << (8 * raw.dtype.itemsize - 1))


def is_zero(raw: np.ndarray, is_float: bool = True) -> np.ndarray:
    """True where the bits encode +0 or -0 (floats) or 0 (integers)."""
    if is_float:
        return (raw & ~sign_mask(raw)) == 0
    return raw == 0


def changed(ra: np.ndarray, rb: np.ndarray, is_float: bool = True) -> np.ndarray:
    """Boolean mask of entries whose stored bits differ (+0 and -0 equal for floats)."""
    neq = ra != rb
    if is_float and neq.any():
        idx = np.flatnonzero(neq)
        both0 = is_zero(ra[idx]) & is_zero(rb[idx])
        neq[idx[both0]] = False
    return neq


def changed_index(ra: np.ndarray, rb: np.ndarray, is_float: bool = True) -> np.ndarray:
    """Flat indices of entries whose stored bits differ (+0 and -0 equal for floats)."""
    idx = np.flatnonzero(ra != rb)
    if is_float and idx.size:
        both0 = is_zero(ra[idx]) & is_zero(rb[idx])
        if both0.any():
            idx = idx[~both0]
    return idx
