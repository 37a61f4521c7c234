"""Storage dtypes: their raw bit views, exact widening to float64, and the ULP of a stored value.

Tensors are read as raw unsigned integers of their storage width. Comparisons of bits happen on those
views; values are widened to float64, which represents every bf16, fp16, fp32 and fp8 value exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    """One storage dtype as the safetensors format names it."""

    name: str  # safetensors code, e.g. "BF16"
    torch_name: str  # e.g. "bfloat16"
    itemsize: int
    raw: type  # numpy unsigned view of the storage bits
    is_float: bool
    mantissa_bits: int = 0  # explicit fraction bits of the format
    exponent_bias: int = 0
    exponent_bits: int = 0

    @property
    def sign_mask(self) -> int:
        return 1 << (8 * self.itemsize - 1)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in [
        DType("BF16", "bfloat16", 2, np.uint16, True, 7, 127, 8),
        DType("F16", "float16", 2, np.uint16, True, 10, 15, 5),
        DType("F32", "float32", 4, np.uint32, True, 23, 127, 8),
        DType("F64", "float64", 8, np.uint64, True, 52, 1023, 11),
        DType("F8_E4M3", "float8_e4m3fn", 1, np.uint8, True, 3, 7, 4),
        DType("F8_E5M2", "float8_e5m2", 1, np.uint8, True, 2, 15, 5),
        DType("I8", "int8", 1, np.uint8, False),
        DType("U8", "uint8", 1, np.uint8, False),
        DType("I16", "int16", 2, np.uint16, False),
        DType("U16", "uint16", 2, np.uint16, False),
        DType("I32", "int32", 4, np.uint32, False),
        DType("U32", "uint32", 4, np.uint32, False),
        DType("I64", "int64", 8, np.uint64, False),
        DType("U64", "uint64", 8, np.uint64, False),
        DType("BOOL", "bool", 1, np.uint8, False),
    ]
}
TORCH_TO_CODE = {d.torch_name: d.name for d in DTYPES.values()}

_SIGNED = {"I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64}


def _e4m3_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = codes & 0x7
    val = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7))
    val = sign * val
    val[(codes & 0x7F) == 0x7F] = np.nan
    return val


_E4M3 = _e4m3_table()


def widen(raw: np.ndarray, dtype: DType) -> np.ndarray:
    """Exact float64 values of raw storage bits."""
    n = dtype.name
    if n == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if n == "F16":
        return raw.view(np.float16).astype(np.float64)
    if n == "F32":
        return raw.view(np.float32).astype(np.float64)
    if n == "F64":
        return raw.view(np.float64)
    if n == "F8_E4M3":
        return _E4M3[raw]
    if n == "F8_E5M2":
        return (raw.astype(np.uint16) << 8).view(np.float16).astype(np.float64)
    if n in _SIGNED:
        return raw.view(_SIGNED[n]).astype(np.float64)
    return raw.astype(np.float64)


def widen32(raw: np.ndarray, dtype: DType) -> np.ndarray:
    """Float32 values of raw bits (exact for 16-bit and 8-bit floats); used for fast norms."""
    n = dtype.name
    if n == "BF16":
        return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if n == "F16":
        return raw.view(np.float16).astype(np.float32)
    if n == "F32":
        return raw.view(np.float32)
    return widen(raw, dtype).astype(np.float32)


def ulp_exponent(raw: np.ndarray, dtype: DType) -> np.ndarray:
    """log2 of the ULP of each stored value (the spacing of the format at that value).

    For integer dtypes the ULP is 1 (exponent 0).
    """
    if not dtype.is_float:
        return np.zeros(raw.shape, dtype=np.int64)
    emask = (1 << dtype.exponent_bits) - 1
    e = (raw.astype(np.int64) >> dtype.mantissa_bits) & emask
    return np.maximum(e, 1) - dtype.exponent_bias - dtype.mantissa_bits


def dot(x: np.ndarray) -> float:
    """Σ x² without BLAS: OpenBLAS may spin extra threads per call, which starves parallel workers."""
    return float(np.einsum("i,i->", x, x))


def sumsq(raw: np.ndarray, dtype: DType) -> float:
    """Sum of squares of the stored values (float32 products, float32 BLAS accumulation per call)."""
    if dtype.name == "BF16" and raw.size % 2 == 0:
        u = raw.view(np.uint32)  # two bf16 values per word: widen both halves without a copy per element
        hi = (u & np.uint32(0xFFFF0000)).view(np.float32)
        lo = (u << np.uint32(16)).view(np.float32)
        return dot(hi) + dot(lo)
    x = widen32(raw, dtype)
    return dot(x)


def _magnitude(u: np.ndarray, dtype: DType) -> np.ndarray:
    """Exact float64 value of non-negative magnitude bits ``u`` (no sign bit); the first code past the largest
    finite value (infinity's bits) is read as the power of two it would be, which is what rounding uses."""
    v = widen(u.astype(dtype.raw), dtype)
    inf_code = ((1 << dtype.exponent_bits) - 1) << dtype.mantissa_bits
    at_inf = u == inf_code
    if at_inf.any():
        v = np.where(at_inf, np.ldexp(1.0, (1 << dtype.exponent_bits) - 1 - dtype.exponent_bias), v)
    return v


def below_floor(raw: np.ndarray, dtype: DType, bound: float) -> np.ndarray:
    """True where every value within ``bound`` of the stored value rounds back to it (nearest-even).

    That is, no update of size |δ| ≤ ``bound`` can change the stored entry: ``bound`` must be smaller than
    the half-gap to each neighbour, or equal to it when the stored value has an even last mantissa bit
    (ties go to even). Exact: the half-gaps are powers of two computed in float64. Non-finite values and
    integer dtypes are never below the floor. Only for IEEE-like float dtypes (bf16, fp16, fp32, fp64).
    """
    if not dtype.is_float or dtype.name.startswith("F8") or dtype.name == "F64":
        return np.zeros(raw.shape, bool)
    r = raw.astype(np.int64)
    sign = np.int64(dtype.sign_mask)
    u = r & ~sign
    inf_code = ((1 << dtype.exponent_bits) - 1) << dtype.mantissa_bits
    finite = u < inf_code
    u = np.where(finite, u, 0)
    w = _magnitude(u, dtype)
    up = _magnitude(u + 1, dtype) - w  # gap to the next larger magnitude
    down = np.where(u > 0, w - _magnitude(np.maximum(u - 1, 0), dtype), up)  # zero: symmetric around 0
    half = np.minimum(up, down) / 2.0
    even = (r & 1) == 0
    b = float(bound)
    return finite & ((b < half) | ((b == half) & even))
