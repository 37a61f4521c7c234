"""The safetensors header, parsed by hand with checks equal to the library's ``Metadata::validate``.

Why by hand: the engine reads flat element ranges of a tensor with ``pread`` into preallocated buffers and
handles bf16 as raw ``uint16`` without torch; ``safe_open`` maps the whole file and needs a framework for
bf16. So the header (a few KB of JSON) is parsed here, each rule an explicit branch with its own sentence:
the 8-byte length and the library's limit of 100,000,000 bytes (``N_MAX``), a JSON object without duplicate
keys, ``__metadata__`` mapping strings to strings, known dtypes, non-negative integer shapes whose size
matches the byte range, and byte ranges contiguous from 0 covering the data exactly (no gap, no overlap,
no trailing bytes).
"""

from __future__ import annotations

import json
import os
import struct
from math import prod

from .dtypes import DTYPES
from .errors import InputError
from .guard import require_regular
from .index import TensorInfo

MAX_HEADER = 100_000_000  # the safetensors library's own limit (N_MAX = 100_000_000 bytes, not 100 MiB)


def read_safetensors_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; returns its tensors and metadata.

    Checks the header length, the JSON, every dtype name and shape, that every tensor's byte range has
    the size its shape and dtype imply, lies inside the file and overlaps no other tensor.
    """
    require_regular(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            return parse_safetensors_header(path, size, lambda a, b: os.pread(fh.fileno(), b - a, a))
    except OSError as e:
        raise InputError(f"{path}: cannot read file ({e.strerror}).") from None


def parse_safetensors_header(path: str, size: int, read_range) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The checks of :func:`read_safetensors_header` on any storage: ``read_range(a, b)`` returns bytes ``[a, b)``
    of the file (a local ``pread`` or an object-storage range request); at most 8 + the checked header length
    are read."""
    head = read_range(0, min(8, size))
    if len(head) < 8:
        raise InputError(f"{path}: not a safetensors file (shorter than its 8-byte header length).")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER:
        raise InputError(f"{path}: corrupt safetensors file (header length {n} exceeds the limit of {MAX_HEADER} bytes).")
    if 8 + n > size:
        raise InputError(f"{path}: corrupt or truncated safetensors file (header length {n} exceeds the file).")
    raw = read_range(8, 8 + n)
    if len(raw) != n:
        raise InputError(f"{path}: file is truncated while reading its header.")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise InputError(f"{path}: corrupt safetensors header (key {printable_key(e.key)} appears twice).") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InputError(f"{path}: corrupt safetensors file (its header is not valid JSON).") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors file (its header is not a JSON object).")
    meta = header.pop("__metadata__", None)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InputError(f"{path}: corrupt safetensors file (__metadata__ must map strings to strings).")
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    ranges = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise InputError(f"{path}: corrupt safetensors header (entry '{name}' is not an object).")
        dt = entry.get("dtype")
        if not isinstance(dt, str) or dt not in DTYPES:
            raise InputError(f"{path}: unsupported or invalid dtype {dt!r} for tensor '{name}'.")
        shape = entry.get("shape")
        offs = entry.get("data_offsets")
        if (
            not isinstance(shape, list)
            or not all(type(s) is int and 0 <= s < 2**48 for s in shape)
            or not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int for o in offs)
        ):
            raise InputError(f"{path}: corrupt safetensors header (bad shape or data_offsets for '{name}').")
        b, e = offs
        dtype = DTYPES[dt]
        if not (0 <= b <= e <= data_len):
            raise InputError(f"{path}: corrupt or truncated safetensors file (tensor '{name}' lies outside the file).")
        if e - b != prod(shape) * dtype.itemsize:
            raise InputError(
                f"{path}: corrupt safetensors header (tensor '{name}' has {e - b} bytes, its shape needs "
                f"{prod(shape) * dtype.itemsize})."
            )
        ranges.append((b, e, name))
        tensors[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + b)
    # as the safetensors library requires: byte ranges contiguous from 0, covering the data exactly
    end, prev = 0, None
    for b, e, name in sorted(ranges):
        if b < end:
            raise InputError(f"{path}: corrupt safetensors header (tensors '{prev}' and '{name}' overlap).")
        if b > end:
            raise InputError(f"{path}: corrupt safetensors header (a gap of {b - end} bytes before tensor '{name}').")
        end, prev = e, name
    if end != data_len:
        raise InputError(f"{path}: corrupt safetensors file ({data_len - end} bytes after the last tensor's data).")
    return tensors, meta


class _Duplicate(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list) -> dict:
    d = {}
    for k, v in pairs:
        if k in d:
            raise _Duplicate(k)
        d[k] = v
    return d


def printable_key(k: str) -> str:
    return repr(k[:80])


# -- .bin ---------------------------------------------------------------------------------------------
