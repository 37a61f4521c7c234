"""Quantized storage, recognised and dequantized exactly: the checkpoint as the model computes with it.

The frontier checkpoints RL is run on store most weights quantized (DeepSeek-V3/R1, Qwen3-FP8, Kimi K2,
GLM-4.5-FP8: fp8 with one scale per 128×128 block; llm-compressor's compressed-tensors: fp8 with a
per-tensor or per-channel scale; gpt-oss: MXFP4 experts). A quantized parameter is two stored tensors, and
neither is a parameter on its own: comparing the fp8 bytes counts codes, not values, and counting the
scale tensors counts numbers the model never multiplies by an input. This module recognises each layout
(from ``config.json``'s ``quantization_config``, and from the tensors themselves where a config is
missing), and :class:`ValueCheckpoint` presents every quantized parameter under the name transformers
gives it once dequantized, with its exact float64 values (an fp8 or e2m1 code times a float32, bf16 or
power-of-two scale is exact in float64), streaming chunk by chunk like any tensor.

Formats (value of entry ``i`` of a parameter of shape ``[..., R, C]``):

- ``fp8-block`` (``quant_method: "fp8"``, ``weight_block_size: [bm, bn]``): ``X.weight`` float8_e4m3fn
  ``[R, C]`` times ``X.weight_scale_inv[r // bm, c // bn]`` (float32 or bf16; partial blocks at the edges);
- ``fp8-tensor`` / ``fp8-channel`` / ``fp8-block`` (compressed-tensors ``float-quantized``): ``X.weight``
  times ``X.weight_scale`` of shape ``[]``/``[1]``, ``[R, 1]`` or ``[⌈R/bm⌉, ⌈C/bn⌉]``;
- ``mxfp4`` (``quant_method: "mxfp4"``): ``P_blocks`` uint8 ``[..., R, G, 16]`` holds two e2m1 codes a
  byte, low nibble first; ``P_scales`` uint8 ``[..., R, G]`` one E8M0 exponent per 32 values (bias 127);
  ``P`` is ``[..., R, G·32]`` (the files' row order; transformers transposes the last two dimensions of
  gpt-oss's ``gate_up_proj``/``down_proj`` when it loads them).

Anything else that says it is quantized (GPTQ, AWQ, bitsandbytes, int4 compressed-tensors, ...) is refused
in one sentence, never compared as raw bytes. Activation scales (``input_scale``) are not parameters and
are left out of the parameter view.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .checkpoint import Checkpoint, TensorInfo
from .dtypes import _E4M3, DTYPES
from .errors import InputError

SUPPORTED = ("fp8", "mxfp4", "compressed-tensors")
# e2m1 (fp4) values of the 16 nibbles: sign, 2 exponent bits (bias 1), 1 mantissa bit
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float64)
_NAN_E4M3 = np.isnan(_E4M3)


def _ulp_table(values: np.ndarray, exp_of, mant_bits: int, bias: int) -> np.ndarray:
    codes = np.arange(values.size)
    e = exp_of(codes)
    return np.ldexp(1.0, np.maximum(e, 1) - bias - mant_bits)


# the spacing of the code grid at each code (the ULP of the stored value, before the scale)
ULP_E4M3 = _ulp_table(_E4M3, lambda c: (c >> 3) & 0xF, 3, 7)
ULP_E2M1 = _ulp_table(E2M1, lambda c: (c >> 1) & 0x3, 1, 1)


def _half_gap(values: np.ndarray) -> np.ndarray:
    """Per code: half the distance to its nearest neighbour in the grid (an update smaller than that, with the
    scale held fixed, rounds back to the code)."""
    finite = np.sort(np.unique(values[np.isfinite(values)]))
    out = np.full(values.size, np.inf)
    for i, v in enumerate(values):
        if not np.isfinite(v):
            continue
        j = int(np.searchsorted(finite, v))
        gaps = [finite[j] - finite[j - 1]] if j > 0 else []
        if j + 1 < finite.size:
            gaps.append(finite[j + 1] - finite[j])
        out[i] = min(gaps) / 2 if gaps else np.inf
    return out


@lru_cache(maxsize=2)
def half_gap_table(fmt: str) -> np.ndarray:
    """``_half_gap`` of the format's code grid (mxfp4: E2M1; otherwise E4M3), computed on first use, not at import."""
    return _half_gap(E2M1 if fmt == "mxfp4" else _E4M3)


@dataclass(frozen=True)
class QuantSpec:
    """One quantized parameter: which stored tensors hold it and how to read its values."""

    name: str  # the parameter's name once dequantized (transformers')
    format: str  # fp8-block | fp8-channel | fp8-tensor | mxfp4
    codes: str  # stored tensor of codes (fp8 bytes, or uint8 pairs of e2m1 nibbles)
    scales: str  # stored tensor of scales
    shape: tuple[int, ...]  # the parameter's shape
    block: tuple[int, ...]  # entries one scale covers: (bm, bn) for blocks, (1, C) per channel, the shape per tensor, (32,) for mxfp4

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict:
        return {"format": self.format, "block": list(self.block), "codes": self.codes, "scales": self.scales}


def _qconfig(ck: Checkpoint) -> dict | None:
    cfg = ck.config or {}
    q = cfg.get("quantization_config")
    if q is None and isinstance(cfg.get("text_config"), dict):
        q = cfg["text_config"].get("quantization_config")
    return q if isinstance(q, dict) else None


def detect(ck: Checkpoint) -> dict[str, QuantSpec]:
    """The quantized parameters of a checkpoint (empty for an unquantized one); refuses unknown formats."""
    q = _qconfig(ck)
    method = q.get("quant_method") if q else None
    where = f"{ck.root}/config.json"
    if method is not None and method not in SUPPORTED:
        raise InputError(f"{where}: quantization method {method!r} is not supported (rlsubnet reads fp8 with block, channel or "
                         "tensor scales, compressed-tensors float-quantized, and MXFP4); refusing to compare its stored bytes as values.")
    if method == "compressed-tensors" and q.get("format") not in ("float-quantized", "naive-quantized", None):
        raise InputError(f"{where}: compressed-tensors format {q.get('format')!r} is not supported (only float-quantized fp8).")
    t = ck.tensors
    specs: dict[str, QuantSpec] = {}
    block_cfg = q.get("weight_block_size") if q else None
    for name, info in t.items():
        if info.dtype.name in ("F8_E4M3",) and name.endswith(".weight"):
            for sfx in ("_scale_inv", "_scale"):
                sname = name + sfx
                if sname in t:
                    specs[name] = _fp8_spec(name, info, sname, t[sname], block_cfg, where)
                    break
        m = re.match(r"^(.*)_blocks$", name)
        if m and info.dtype.name == "U8" and f"{m.group(1)}_scales" in t:
            specs[m.group(1)] = _mxfp4_spec(m.group(1), info, t[f"{m.group(1)}_scales"], where)
    if method is not None and not specs:
        raise InputError(f"{where}: says the weights are quantized ({method}) but no quantized tensor pair was found "
                         "(fp8 X.weight beside X.weight_scale_inv / X.weight_scale, or P_blocks beside P_scales).")
    for name in t:  # quantized layouts rlsubnet does not read, found by their tensors
        if re.search(r"(^|\.)(qweight|qzeros|g_idx|weight_packed|SCB|absmax)$", name):
            raise InputError(f"{ck.path}: tensor '{name}' belongs to a quantization format rlsubnet does not read "
                             "(GPTQ, AWQ, int4 packed or bitsandbytes); refusing to compare its stored bytes as values.")
    return specs


def _fp8_spec(name: str, info: TensorInfo, sname: str, sinfo: TensorInfo, block_cfg, where: str) -> QuantSpec:
    if sinfo.dtype.name not in ("F32", "BF16", "F16"):
        raise InputError(f"{where}: scale tensor '{sname}' is {sinfo.dtype.name}; fp8 scales are float32, bf16 or float16.")
    shape = info.shape
    if len(shape) != 2:
        raise InputError(f"{where}: fp8 tensor '{name}' has shape {list(shape)}; scaled fp8 weights are matrices.")
    R, C = shape
    ss = tuple(sinfo.shape)
    if len(ss) == 2 and (block_cfg or sname.endswith("_scale_inv")):  # DeepSeek-style block scales (a small matrix may have one block)
        if block_cfg and len(block_cfg) == 2:
            bm, bn = int(block_cfg[0]), int(block_cfg[1])
        else:  # no config: the block size the scale grid implies (128 where it fits, as every release uses)
            bm = 128 if math.ceil(R / 128) == ss[0] else math.ceil(R / ss[0])
            bn = 128 if math.ceil(C / 128) == ss[1] else math.ceil(C / ss[1])
        if bm >= 1 and bn >= 1 and (math.ceil(R / bm), math.ceil(C / bn)) == ss:
            return QuantSpec(name, "fp8-block", name, sname, shape, (bm, bn))
    if ss in ((), (1,)) or math.prod(ss) == 1:
        return QuantSpec(name, "fp8-tensor", name, sname, shape, (R, C))
    if ss == (R, 1) or ss == (R,):
        return QuantSpec(name, "fp8-channel", name, sname, shape, (1, C))
    if len(ss) == 2:  # compressed-tensors "block" strategy: a grid of block scales without a config block size
        bm, bn = math.ceil(R / ss[0]), math.ceil(C / ss[1])
        if (math.ceil(R / bm), math.ceil(C / bn)) == ss:
            return QuantSpec(name, "fp8-block", name, sname, shape, (bm, bn))
    raise InputError(f"{where}: scale tensor '{sname}' {list(ss)} does not fit fp8 tensor '{name}' {list(shape)} "
                     "(expected one scale, one per row, or one per block).")


def _mxfp4_spec(param: str, info: TensorInfo, sinfo: TensorInfo, where: str) -> QuantSpec:
    bs, ss = tuple(info.shape), tuple(sinfo.shape)
    if len(bs) < 2 or bs[-1] != 16 or sinfo.dtype.name != "U8" or ss != bs[:-1]:
        raise InputError(f"{where}: MXFP4 tensors '{param}_blocks' {list(bs)} and '{param}_scales' {list(ss)} do not fit "
                         "(expected uint8 [..., G, 16] and uint8 [..., G]).")
    shape = (*bs[:-2], bs[-2] * 32)
    return QuantSpec(param, "mxfp4", f"{param}_blocks", f"{param}_scales", shape, (32,))


class ValueCheckpoint(Checkpoint):
    """A checkpoint with its quantized parameters presented by value (float64) under their own names, and
    their code and scale tensors hidden. ``storage`` is the checkpoint as stored (what patches carry)."""

    def __init__(self, storage: Checkpoint, specs: dict[str, QuantSpec]):
        super().__init__(storage.index)
        self.storage = storage
        self._fds = storage._fds  # one set of open files
        self.quant = specs
        hidden = {s.codes for s in specs.values()} | {s.scales for s in specs.values()}
        hidden |= {n for n in storage.tensors if n.endswith(".input_scale") and n[: -len(".input_scale")] + ".weight" in specs}
        f64 = DTYPES["F64"]
        self._tensors: dict[str, TensorInfo] = {}
        for n, info in storage.tensors.items():
            spec = specs.get(n)
            if spec is not None:
                self._tensors[n] = TensorInfo(n, f64, spec.shape, info.file)
            elif n not in hidden:
                self._tensors[n] = info
        for n, spec in specs.items():
            if n not in self._tensors:
                self._tensors[n] = TensorInfo(n, f64, spec.shape, storage.tensors[spec.codes].file)
        self._scales: dict[str, np.ndarray] = {}
        self._last: tuple | None = None
        self._same: dict = {}
        self._positive: dict[str, bool] = {}

    tensors = property(lambda self: self._tensors)

    def stored_dtype(self, name: str) -> str:
        """What a parameter is stored as: ``float8_e4m3fn``, ``mxfp4``, or its dtype."""
        spec = self.quant.get(name)
        if spec is None:
            return self._tensors[name].dtype.torch_name
        return "mxfp4" if spec.format == "mxfp4" else "float8_e4m3fn"

    def scales(self, name: str) -> np.ndarray:
        """The parameter's whole scale tensor as float64 (small: one per block, row or 32 values)."""
        s = self._scales.get(name)
        if s is None:
            spec = self.quant[name]
            sinfo = self.storage.tensors[spec.scales]
            raw = self.storage.read(spec.scales)
            if spec.format == "mxfp4":
                s = np.ldexp(1.0, raw.astype(np.int32) - 127)
            else:
                from .dtypes import widen

                s = widen(raw, sinfo.dtype)
            self._scales[name] = s
        return s

    def same_scales(self, other: ValueCheckpoint, name: str, other_name: str | None = None) -> bool:
        """Whether ``other`` stores bit-identical scales for this parameter (remembered per parameter)."""
        key = (id(other), name)
        hit = self._same.get(key)
        if hit is None:
            a, b = self.read_scales_raw(name), other.read_scales_raw(other_name or name)
            hit = self._same[key] = a.shape == b.shape and bool(np.array_equal(a, b))
        return hit

    def scales_positive(self, name: str) -> bool:
        """Whether every scale of the parameter is positive and finite (remembered per parameter)."""
        hit = self._positive.get(name)
        if hit is None:
            s = self.scales(name)
            hit = self._positive[name] = bool(np.all(np.isfinite(s) & (s > 0)))
        return hit

    def read_scales_raw(self, name: str) -> np.ndarray:
        spec = self.quant[name]
        return self.storage.read(spec.scales)

    def read_codes(self, name: str, start: int = 0, count: int | None = None) -> np.ndarray:
        """One code per weight (an fp8 byte, or an e2m1 nibble as a byte) of entries ``[start, start+count)``."""
        spec = self.quant[name]
        if count is None:
            count = spec.numel - start
        if spec.format != "mxfp4":
            return self.storage.read(spec.codes, start, count)
        lo, hi = start // 2, (start + count + 1) // 2
        b = self.storage.read(spec.codes, lo, hi - lo)
        nib = np.empty(2 * b.size, np.uint8)
        nib[0::2], nib[1::2] = b & 0x0F, b >> 4
        off = start - 2 * lo
        return nib[off : off + count]

    def scale_of(self, name: str, start: int, count: int) -> np.ndarray:
        """The scale that multiplies each entry of ``[start, start+count)`` (float64)."""
        return self.expand(name, self.scales(name), start, count)

    def expand(self, name: str, grid: np.ndarray, start: int, count: int, pairs: bool = False) -> np.ndarray:
        """Any per-scale array of the parameter (its scales, or which of them changed) spread over the entries
        ``[start, start+count)``, by repeating the few entries the range touches (no per-entry arithmetic).
        ``pairs``: one value per pair of neighbouring entries (``start``, ``count`` and every block width even,
        so no pair straddles two scales; see :meth:`pairs_share_scales`)."""
        spec = self.quant[name]
        g = grid.reshape(-1)
        k = 2 if pairs else 1
        start, count = start // k, count // k
        if spec.format == "fp8-tensor":
            return np.full(count, g[0])
        if spec.format == "mxfp4":
            w = 32 // k
            g0, g1 = start // w, (start + count - 1) // w + 1
            return np.repeat(g[g0:g1], w)[start - w * g0 : start - w * g0 + count]
        C = spec.shape[-1] // k
        r0, r1 = start // C, (start + count - 1) // C + 1
        off = start - r0 * C
        if spec.format == "fp8-channel":
            return np.repeat(g[r0:r1], C)[off : off + count]
        bm, bn = spec.block[0], spec.block[1] // k
        nb = math.ceil(C / bn)
        rows = g.reshape(-1, nb)[np.arange(r0, r1) // bm]  # the block row of every row in range
        out = np.empty((r1 - r0, nb, bn), g.dtype)
        out[...] = rows[:, :, None]  # one broadcast write per entry
        flat = out.reshape(r1 - r0, nb * bn)
        flat = flat.reshape(-1) if nb * bn == C else flat[:, :C].reshape(-1)
        return flat[off : off + count]

    def pairs_share_scales(self, name: str, start: int, count: int) -> bool:
        """Whether entries ``2k`` and ``2k+1`` of ``[start, start+count)`` always share one scale."""
        spec = self.quant[name]
        if start % 2 or count % 2:
            return False
        if spec.format == "fp8-tensor" or spec.format == "mxfp4":
            return True
        return spec.shape[-1] % 2 == 0 and (spec.format == "fp8-channel" or spec.block[1] % 2 == 0)

    def entries_of_scales(self, name: str, which: np.ndarray, start: int, count: int, ids: bool = False):
        """Chunk-relative indices of the entries of ``[start, start+count)`` that the scales ``which`` (flat
        indices into the scale tensor) multiply: cost proportional to those entries, not to the chunk. With
        ``ids``, also each entry's position in ``which`` (as ``(indices, positions)``)."""
        spec = self.quant[name]
        which = np.asarray(which, np.int64)
        none = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        if which.size == 0:
            return none if ids else none[0]
        if spec.format == "fp8-tensor":
            idx, pos = np.arange(count, dtype=np.int64), np.zeros(count, np.int64)
        elif spec.format in ("mxfp4", "fp8-channel"):
            w = 32 if spec.format == "mxfp4" else spec.shape[-1]
            sel = np.flatnonzero((which >= start // w) & (which <= (start + count - 1) // w))
            idx = (which[sel, None] * w + np.arange(w)).reshape(-1) - start
            pos = np.repeat(sel, w)
        elif which.size > 8:  # many blocks: spread their positions over the chunk, one write per entry
            local = np.full(self.scales(name).size, -1, np.int64)
            local[which] = np.arange(which.size)
            per = self.expand(name, local, start, count)
            idx = np.flatnonzero(per >= 0)
            return (idx, per[idx]) if ids else idx
        else:
            C = spec.shape[-1]
            r0, r1 = start // C, (start + count - 1) // C + 1
            bm, bn = spec.block
            nb = math.ceil(C / bn)
            parts, poss = [], []
            for j, wv in enumerate(which.tolist()):
                br, bc = divmod(wv, nb)
                lo_r, hi_r = max(br * bm, r0), min((br + 1) * bm, r1)
                if lo_r >= hi_r:
                    continue
                cols = np.arange(bc * bn, min((bc + 1) * bn, C))
                parts.append((np.arange(lo_r, hi_r)[:, None] * C + cols).reshape(-1) - start)
                poss.append(np.full(parts[-1].size, j, np.int64))
            if not parts:
                return none if ids else none[0]
            idx, pos = np.concatenate(parts), np.concatenate(poss)
        keep = (idx >= 0) & (idx < count)
        return (idx[keep], pos[keep]) if ids else idx[keep]

    def scale_at(self, name: str, flat: np.ndarray) -> np.ndarray:
        """The scales of the entries at flat indices ``flat`` (float64; cost proportional to ``flat``)."""
        spec = self.quant[name]
        s = self.scales(name).reshape(-1)
        if spec.format == "fp8-tensor":
            return np.full(flat.size, s[0])
        if spec.format == "mxfp4":
            return s[flat // 32]
        C = spec.shape[-1]
        r, c = flat // C, flat % C
        if spec.format == "fp8-channel":
            return s[r]
        bm, bn = spec.block
        return s[(r // bm) * math.ceil(C / bn) + c // bn]

    def values(self, name: str, start: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(codes, scales, exact float64 values) of entries ``[start, start+count)`` of a quantized parameter
        (the last chunk is remembered: the value probes and the code probes read it once)."""
        key = (name, start, count)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        spec = self.quant[name]
        codes = self.read_codes(name, start, count)
        scale = self.scale_of(name, start, count)
        table = E2M1 if spec.format == "mxfp4" else _E4M3
        with np.errstate(invalid="ignore", over="ignore"):
            v = table[codes] * scale
        self._last = (key, (codes, scale, v))
        return codes, scale, v

    def read(self, name: str, start: int = 0, count: int | None = None) -> np.ndarray:
        """Raw bits of ``[start, start+count)``: for a quantized parameter, of its exact float64 values."""
        if name not in self.quant:
            return self.storage.read(name, start, count)
        if count is None:
            count = self.quant[name].numel - start
        return self.values(name, start, count)[2].view(np.uint64)


def grid_ulp(spec: QuantSpec, codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The ULP of each stored value in its own grid: the code grid's spacing at the code, times its scale."""
    table = ULP_E2M1 if spec.format == "mxfp4" else ULP_E4M3
    return table[codes] * scale


def grid_half_gap(spec: QuantSpec, codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Half the distance from each stored value to its nearest neighbour in the grid (scale held fixed)."""
    table = half_gap_table("mxfp4" if spec.format == "mxfp4" else "e4m3")
    return table[codes] * scale


def requantize(spec: QuantSpec, values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The values the grid of ``spec`` holds nearest to ``values`` with the given scales (round to nearest,
    ties to the even code, saturating at the largest finite code): what quantizing a dequantized model back
    into its base's grid would store."""
    table = E2M1 if spec.format == "mxfp4" else _E4M3
    grid = np.sort(np.unique(np.abs(table[np.isfinite(table)])))
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.abs(values) / scale
    j = np.clip(np.searchsorted(grid, x), 1, grid.size - 1)
    lo, hi = grid[j - 1], grid[j]
    pick_hi = (x - lo > hi - x) | ((x - lo == hi - x) & (j % 2 == 0))  # grid index = code magnitude: ties to the even code
    q = np.where(pick_hi, hi, lo)
    q = np.where(x >= grid[-1], grid[-1], q)
    q = np.where(x <= 0, 0.0, q)
    out = np.copysign(q, values) * scale
    return np.where(np.isfinite(values), out, values)
