"""The subnetwork as data: a bit mask per parameter, its file format, and set algebra.

File format ``rlsubnet-mask/1`` (a safetensors file):

- one 1-D ``uint8`` tensor per parameter name, holding the mask bits packed with
  ``numpy.packbits(bits, bitorder="little")`` over the row-major flattened parameter; the padding bits of
  the last byte are zero;
- string metadata: ``format`` = ``rlsubnet-mask/1``; ``shapes`` = JSON ``{name: shape}``; ``criterion``
  (``bitwise``, ``atol:1e-05``, ``bf16rel:0.001``, or how the mask was made, e.g. ``random-global``);
  ``base`` and ``tuned`` (the checkpoint paths) with ``base_fingerprint`` and ``tuned_fingerprint``
  (content fingerprints, see :meth:`rlsubnet.io.Checkpoint.fingerprint`); ``counts`` = JSON
  ``{name: ones}`` (informational: readers recompute counts from the bits).

One bit per parameter on disk; :meth:`Subnetwork.bool_tensor` hands one byte per parameter to training. A mask
too large for one process is a folder of parts written by the workers (:mod:`rlsubnet.io.mask_shards`);
:meth:`Subnetwork.load` opens both.
"""

from __future__ import annotations

import json
import os
from math import prod
from typing import Iterable

import numpy as np

from ..io.atomic import write_with
from ..io.checkpoint import require_regular
from ..io.errors import InputError
from ..io.mask_shards import FORMAT, read_index, read_parts


def popcount(packed: np.ndarray) -> int:
    return int(np.bitwise_count(packed).sum(dtype=np.int64))


def _clear_padding(packed: np.ndarray, numel: int) -> np.ndarray:
    r = numel % 8
    if r and packed.size:
        packed[-1] &= np.uint8((1 << r) - 1)
    return packed


class Subnetwork:
    """A mask over the parameters of one model: which entries are in the subnetwork (bit = 1).

    Loads lazily from a mask file (bits are read per tensor on first use). Supports ``|`` (union),
    ``&`` (intersection), ``-`` (difference) and ``~`` (complement), density per tensor and overall,
    seeded random masks of matched density, and boolean tensors for training.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], bits: dict[str, np.ndarray] | None = None,
                 meta: dict[str, str] | None = None, path: str | None = None, source: str | None = None,
                 parts: dict[str, list[dict]] | None = None):
        self.shapes = {k: tuple(int(x) for x in v) for k, v in shapes.items()}
        self._bits: dict[str, np.ndarray] = dict(bits or {})
        self._parts = parts  # a sharded mask: each parameter's parts, read on use and not kept (bounded memory)
        self.meta = dict(meta or {})
        self.path = path
        self._source = source
        self._counts: dict[str, int] = {}

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> Subnetwork:
        """Open a mask file with ``safe_open``; validates its format, shapes and sizes before use.

        Counts are always recomputed from the bits (the ``counts`` metadata is informational and not
        trusted); a padding bit that is set, a shape that is not a list of non-negative integers, or a
        tensor whose size does not match its shape is refused. Nothing larger than the file is allocated.
        """
        from safetensors import SafetensorError, safe_open

        p = os.fspath(path)
        if not os.path.exists(p):
            raise InputError(f"{p}: no such mask file.")
        if os.path.isdir(p) and not os.path.islink(p):
            shapes, parts, meta = read_index(p)
            return cls(shapes, meta=meta, path=p, parts=parts)
        require_regular(p)
        try:
            with safe_open(p, framework="numpy") as f:
                meta = f.metadata() or {}
                stored = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise InputError(f"{p}: not a valid mask file ({msg}).") from None
        if meta.get("format") != FORMAT:
            raise InputError(f"{p}: not an rlsubnet mask (metadata format is {meta.get('format')!r}, expected {FORMAT!r}).")
        try:
            shapes = json.loads(meta.get("shapes", ""))
        except (ValueError, RecursionError):
            raise InputError(f"{p}: corrupt mask file (the 'shapes' metadata is not valid JSON).") from None
        if not isinstance(shapes, dict) or not all(
            isinstance(v, list) and all(type(x) is int and 0 <= x < 2**48 for x in v) for v in shapes.values()
        ):
            raise InputError(f"{p}: corrupt mask file (the 'shapes' metadata must map names to lists of non-negative integers).")
        shapes = {k: tuple(v) for k, v in shapes.items()}
        if set(shapes) != set(stored):
            raise InputError(f"{p}: corrupt mask file (its 'shapes' metadata and its tensors name different parameters).")
        for name, (dt, shape) in stored.items():
            need = (prod(shapes[name]) + 7) // 8
            if dt not in ("U8", "uint8") or len(shape) != 1 or shape[0] != need:
                raise InputError(f"{p}: corrupt mask file (tensor '{name}' should be {need} packed uint8 bytes).")
        return cls(shapes, meta=meta, path=p, source=p)

    @classmethod
    def from_diff(cls, result, criterion: str = "bitwise") -> Subnetwork:
        """The mask a diff collected (``diff(..., mask_criterion=...)``)."""
        if result.mask_bits is None:
            raise ValueError("the diff was run without mask_criterion")
        shapes = {t.name: tuple(t.shape) for t in result.tensors}
        meta = {"criterion": criterion, "base": result.base, "tuned": result.tuned}
        for k, v in (result.fingerprints or {}).items():
            meta[f"{k}_fingerprint"] = v
        return cls(shapes, result.mask_bits, meta)

    @classmethod
    def from_checkpoints(cls, base: str | os.PathLike, tuned: str | os.PathLike, criterion: str = "bitwise", **kw) -> Subnetwork:
        """Build the mask of updated parameters (Conjecture 1) from two checkpoints in one pass."""
        from ..analysis.diff import diff

        res = diff(base, tuned, atol=[0.0], mask_criterion=criterion, **kw)
        return cls.from_diff(res, criterion)

    @classmethod
    def full(cls, shapes: dict[str, tuple[int, ...]], value: bool = True) -> Subnetwork:
        bits = {}
        for n, s in shapes.items():
            numel = prod(s)
            b = np.full((numel + 7) // 8, 0xFF if value else 0, np.uint8)
            bits[n] = _clear_padding(b, numel)
        return cls(shapes, bits, {"criterion": "full" if value else "empty"})

    @classmethod
    def from_bool(cls, masks: dict[str, np.ndarray | object], meta: dict | None = None) -> Subnetwork:
        """From boolean arrays (numpy or torch) keyed by parameter name."""
        shapes, bits = {}, {}
        for n, m in masks.items():
            a = m.detach().cpu().numpy() if hasattr(m, "detach") else np.asarray(m)
            shapes[n] = tuple(a.shape)
            bits[n] = np.packbits(a.reshape(-1).astype(bool), bitorder="little")
        return cls(shapes, bits, meta)

    # -- access --------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def numel(self, name: str | None = None) -> int:
        if name is not None:
            return int(prod(self.shapes[name]))
        return sum(int(prod(s)) for s in self.shapes.values())

    def packed(self, name: str) -> np.ndarray:
        """Packed bits of one parameter (little bit order)."""
        b = self._bits.get(name)
        if b is None and self._parts is not None and name in self._parts:
            n = self.numel(name)
            b = read_parts(self.path, name, self._parts[name], n)
            if n % 8 and b.size and b[-1] >> (n % 8):
                raise InputError(f"{self.path}: corrupt mask (padding bits after the last entry of '{name}' are set).")
            return b
        if b is None:
            if self._source is None or name not in self.shapes:
                raise KeyError(name)
            from safetensors import safe_open

            with safe_open(self._source, framework="numpy") as f:
                b = np.ascontiguousarray(f.get_tensor(name), dtype=np.uint8)
            n = self.numel(name)
            if n % 8 and b.size and b[-1] >> (n % 8):
                raise InputError(f"{self.path}: corrupt mask file (padding bits after the last entry of '{name}' are set).")
            self._bits[name] = b
        return b

    def bits(self, name: str, start: int = 0, count: int | None = None) -> np.ndarray:
        """Unpacked boolean bits of elements ``[start, start+count)``; ``start`` a multiple of 8."""
        n = self.numel(name)
        count = n - start if count is None else count
        assert start % 8 == 0
        pk = self.packed(name)[start // 8 : (start + count + 7) // 8]
        return np.unpackbits(pk, count=count, bitorder="little").view(bool)

    def array(self, name: str) -> np.ndarray:
        """Boolean numpy array of one parameter's mask, shaped like the parameter."""
        return self.bits(name).reshape(self.shapes[name])

    def bool_tensor(self, name: str, device=None):
        """Boolean torch tensor (one byte per entry) of one parameter's mask."""
        import torch

        return torch.from_numpy(self.array(name).copy()).to(device) if device else torch.from_numpy(self.array(name).copy())

    def count(self, name: str | None = None) -> int:
        """Number of entries in the subnetwork (for one parameter, or all)."""
        if name is None:
            return sum(self.count(n) for n in self.shapes)
        if name not in self._counts:
            self._counts[name] = popcount(self.packed(name))
        return self._counts[name]

    def density(self, name: str | None = None) -> float:
        n = self.numel(name)
        return self.count(name) / n if n else 0.0

    def densities(self) -> dict[str, float]:
        return {n: self.density(n) for n in self.shapes}

    def digest(self) -> str:
        """A hash of the mask's content (names, shapes and bits), independent of its metadata."""
        import hashlib

        h = hashlib.sha256()
        for n in sorted(self.shapes):
            h.update(f"{n}|{self.shapes[n]}\n".encode())
            h.update(self.packed(n).tobytes())
        return h.hexdigest()[:16]

    # -- algebra -------------------------------------------------------------------------------------
    def _check_same(self, other: Subnetwork, what: str) -> None:
        if self.shapes != other.shapes:
            a, b = set(self.shapes), set(other.shapes)
            diff = sorted(a ^ b)
            detail = f"parameter '{diff[0]}' is in only one" if diff else "some parameter shapes differ"
            raise InputError(f"{self.path or 'mask'} and {other.path or 'mask'}: cannot {what} masks over different parameters ({detail}).")

    def _combine(self, other: Subnetwork, op, label: str) -> Subnetwork:
        self._check_same(other, label)
        bits = {n: op(self.packed(n), other.packed(n)) for n in self.shapes}
        return Subnetwork(self.shapes, bits, {"criterion": f"{label}({self.meta.get('criterion', '?')},{other.meta.get('criterion', '?')})"})

    def __or__(self, other: Subnetwork) -> Subnetwork:
        return self._combine(other, np.bitwise_or, "union")

    def __and__(self, other: Subnetwork) -> Subnetwork:
        return self._combine(other, np.bitwise_and, "intersection")

    def __sub__(self, other: Subnetwork) -> Subnetwork:
        return self._combine(other, lambda a, b: a & ~b, "difference")

    def __invert__(self) -> Subnetwork:
        bits = {n: _clear_padding(~self.packed(n), self.numel(n)) for n in self.shapes}
        return Subnetwork(self.shapes, bits, {"criterion": f"complement({self.meta.get('criterion', '?')})"})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Subnetwork) or self.shapes != other.shapes:
            return False
        return all(np.array_equal(self.packed(n), other.packed(n)) for n in self.shapes)

    def random_like(self, seed: int = 0, per_tensor: bool = False) -> Subnetwork:
        """A uniformly random mask with exactly the same number of ones, globally or per tensor."""
        rng = np.random.default_rng(seed)
        names = self.names
        if per_tensor:
            counts = [self.count(n) for n in names]
        else:
            counts = rng.multivariate_hypergeometric([self.numel(n) for n in names], self.count()).tolist()
        bits = {}
        for n, c in zip(names, counts):
            numel = self.numel(n)
            b = np.zeros(numel, bool)
            b[rng.choice(numel, size=int(c), replace=False)] = True
            bits[n] = np.packbits(b, bitorder="little")
        return Subnetwork(self.shapes, bits, {"criterion": f"random-{'tensor' if per_tensor else 'global'}", "seed": str(seed)})

    # -- writing -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the mask file atomically (format ``rlsubnet-mask/1``)."""
        from safetensors.numpy import save_file

        meta = {k: str(v) for k, v in self.meta.items()}
        meta["format"] = FORMAT
        meta["shapes"] = json.dumps({n: list(s) for n, s in self.shapes.items()})
        meta["counts"] = json.dumps({n: self.count(n) for n in self.shapes})
        meta.setdefault("criterion", "unknown")
        meta.setdefault("base", "")
        meta.setdefault("tuned", "")
        tensors = {n: np.ascontiguousarray(self.packed(n)) for n in self.shapes}
        write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), suffix=".safetensors")
        self.path = str(path)

    def __repr__(self) -> str:
        return f"Subnetwork({len(self.shapes)} tensors, {self.numel():,} params, density {self.density():.4%})"


def load_masks(paths: Iterable[str]) -> list[Subnetwork]:
    return [Subnetwork.load(p) for p in paths]
