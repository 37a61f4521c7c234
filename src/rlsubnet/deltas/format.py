"""The ``rlsubnet-patch/1`` format: what changed between two checkpoints, as values, in one file.

Layout (all integers little-endian)::

    b"RLSPATC1"                       8-byte magic
    blob blob ... blob                zstd frames (with content checksums), back to back
    header                            UTF-8 JSON (below), as one zstd frame
    u64 header length, b"RLSPEND1"    16-byte trailer (the compressed header's length)

Every tensor is cut into chunks of ``header["chunk"]`` elements of its row-major flattened storage. For
each chunk with at least one changed entry (stored bits differ: +0 → -0 is a change here, a patch is
exact) there are two blobs:

- **positions**, relative to the chunk start, in whichever encoding compresses smaller:
  ``bitmap`` (``numpy.packbits(changed, bitorder="little")``, ⌈count/8⌉ bytes) or ``delta-u8``/``-u16``/
  ``-u32`` (gaps ``g[0] = i[0]``, ``g[k] = i[k] - i[k-1] - 1``, in the narrowest unsigned width that holds
  them); ``all`` (every entry changed) has no blob;
- **values**, the new stored bits of the changed entries, as ``raw`` (the new bits), ``xor`` (new XOR base)
  or ``sub`` (new − base modulo 2^bits), optionally as byte ``planes`` (all first bytes, then all second
  bytes, ...), whichever compresses smaller.

A blob is ``{"off", "len", "raw"}``: its byte offset from the start of the file, its compressed length and
its decompressed length. Values, never arithmetic deltas of floats: applying a patch is exact and a chain
of patches never drifts.

Header::

    {"format": "rlsubnet-patch/1", "chunk": int,
     "parent": "sha256:..." ,                  # = base.hash: the checkpoint this patch applies to
     "base": {"hash": str}, "result": {"hash": str},
     "tensors": [{"name", "dtype", "shape", "base_sha256", "result_sha256", "changed",
                  "chunks": [{"start", "count", "changed", "positions": {"enc", "off", "len", "raw"} | null,
                              "values": {"enc", "planes", "off", "len", "raw"}}]}],
     "files": [{"name", "off", "len", "raw", "sha256"}],   # the tuned checkpoint's non-tensor files
     "sizes": {"positions", "values", "files", "header", "total", "plain", "tuned_checkpoint"},
     "source": {"base": str, "tuned": str}}

A tensor hash is ``sha256`` of its raw stored bytes; a checkpoint hash is ``sha256`` of the lines
``name|dtype|shape|tensor_sha256`` of its tensors sorted by name. ``plain`` is the size of the plain
encoding (int32 positions + raw values, what verl's ``delta_sharded`` sends).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from ..io.errors import InputError

FORMAT = "rlsubnet-patch/1"
MAGIC = b"RLSPATC1"
END = b"RLSPEND1"
CHUNK = 1 << 20
MAX_HEADER = 256 * 1024 * 1024
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_DELTA = {"delta-u8": np.uint8, "delta-u16": np.uint16, "delta-u32": np.uint32}


def tensor_line(name: str, dtype: str, shape, digest: str) -> str:
    return f"{name}|{dtype}|{list(shape)}|{digest}\n"


def checkpoint_hash(entries: list[tuple[str, str, tuple, str]]) -> str:
    """sha256 over ``name|dtype|shape|tensor_sha256`` lines sorted by name."""
    h = hashlib.sha256()
    for name, dt, shape, digest in sorted(entries):
        h.update(tensor_line(name, dt, shape, digest).encode())
    return "sha256:" + h.hexdigest()


# -- encoding one chunk --------------------------------------------------------------------------------------
def _planes(b: bytes, itemsize: int) -> bytes:
    if itemsize == 1 or not b:
        return b
    return np.frombuffer(b, np.uint8).reshape(-1, itemsize).T.tobytes()


def _unplanes(b: bytes, itemsize: int) -> bytes:
    if itemsize == 1 or not b:
        return b
    return np.frombuffer(b, np.uint8).reshape(itemsize, -1).T.tobytes()


@dataclass
class Encoder:
    """Chooses the smallest encoding of each stream and compresses it (zstd with frame checksums)."""

    level: int = 3
    _c: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import zstandard

        self._c = zstandard.ZstdCompressor(level=self.level, write_checksum=True)

    def compress(self, b: bytes) -> bytes:
        return self._c.compress(b)

    def positions(self, idx: np.ndarray, count: int) -> tuple[str, bytes, int] | None:
        """(encoding, compressed, raw length) for sorted chunk-relative indices; None for ``all``."""
        if idx.size == count:
            return None
        gaps = np.diff(idx, prepend=-1) - 1
        mx = int(gaps.max()) if gaps.size else 0
        if mx < 255:
            cands = [("delta-u8", gaps.astype(np.uint8).tobytes())]
        else:  # one byte per gap, 255 escaping to a u32 in the tail: most gaps of sparse updates fit a byte
            big = gaps >= 255
            cands = [("delta-esc", np.where(big, 255, gaps).astype(np.uint8).tobytes() + gaps[big].astype(np.uint32).tobytes())]
        if idx.size > count // 64:  # a bitmap can only win when the set is dense enough
            bm = np.zeros(count, bool)
            bm[idx] = True
            cands.append(("bitmap", np.packbits(bm, bitorder="little").tobytes()))
        best = min(((e, self.compress(r), len(r)) for e, r in cands), key=lambda x: len(x[1]))
        return best

    def values(self, new: np.ndarray, old: np.ndarray) -> tuple[str, bool, bytes, int]:
        """(encoding, planes, compressed, raw length) of the new bits of the changed entries."""
        size = new.dtype.itemsize
        cands = {"raw": new.tobytes(), "xor": (new ^ old).tobytes(), "sub": (new - old).tobytes()}
        best = None
        for enc, raw in cands.items():
            for planes in ((False, True) if size > 1 else (False,)):
                c = self.compress(_planes(raw, size) if planes else raw)
                if best is None or len(c) < len(best[2]):
                    best = (enc, planes, c, len(raw))
        return best  # type: ignore[return-value]


def decode_positions(enc: str | None, raw: bytes, count: int, changed: int) -> np.ndarray:
    if enc is None or enc == "all":
        return np.arange(count, dtype=np.int64)
    if enc == "bitmap":
        if len(raw) != (count + 7) // 8:
            raise ValueError("bitmap length")
        idx = np.flatnonzero(np.unpackbits(np.frombuffer(raw, np.uint8), count=count, bitorder="little"))
    elif enc in _DELTA:
        g = np.frombuffer(raw, _DELTA[enc]).astype(np.int64)
        idx = np.cumsum(g + 1) - 1
    elif enc == "delta-esc":
        if len(raw) < changed:
            raise ValueError("positions length")
        g = np.frombuffer(raw, np.uint8, count=changed).astype(np.int64)
        esc = np.flatnonzero(g == 255)
        if len(raw) != changed + 4 * esc.size:
            raise ValueError("positions length")
        g[esc] = np.frombuffer(raw, np.uint32, offset=changed).astype(np.int64)
        idx = np.cumsum(g + 1) - 1
    else:
        raise ValueError(f"unknown positions encoding {enc!r}")
    if idx.size != changed or (idx.size and (idx[0] < 0 or idx[-1] >= count)):
        raise ValueError("positions do not match the chunk")
    return idx


def decode_values(enc: str, planes: bool, raw: bytes, old: np.ndarray) -> np.ndarray:
    size = old.dtype.itemsize
    if len(raw) != old.size * size:
        raise ValueError("values length")
    v = np.frombuffer(_unplanes(raw, size) if planes else raw, old.dtype)
    if enc == "raw":
        return v
    if enc == "xor":
        return v ^ old
    if enc == "sub":
        return (old + v).astype(old.dtype)
    raise ValueError(f"unknown values encoding {enc!r}")


# -- writing ----------------------------------------------------------------------------------------------
class PatchWriter:
    """Writes a patch to a binary stream in one pass: blobs as they come, the header at the end."""

    def __init__(self, fh: BinaryIO, level: int = 3, chunk: int = CHUNK):
        self.fh = fh
        self.enc = Encoder(level)
        self.chunk = chunk
        self.pos = 0
        self.tensors: list[dict] = []
        self.files: list[dict] = []
        self.sizes = {"positions": 0, "values": 0, "files": 0, "plain": 0}
        self._write(MAGIC)

    def _write(self, b: bytes) -> dict:
        off = self.pos
        self.fh.write(b)
        self.pos += len(b)
        return {"off": off, "len": len(b)}

    def begin_tensor(self, name: str, dtype: str, shape) -> dict:
        t = {"name": name, "dtype": dtype, "shape": list(shape), "changed": 0, "chunks": []}
        self.tensors.append(t)
        return t

    def chunk_update(self, t: dict, start: int, old: np.ndarray, new: np.ndarray) -> int:
        """Record one chunk of tensor ``t`` (raw bits before and after); returns how many entries changed."""
        idx = np.flatnonzero(old != new)
        if idx.size == 0:
            return 0
        c = {"start": start, "count": int(old.size), "changed": int(idx.size), "positions": None}
        p = self.enc.positions(idx, old.size)
        if p is not None:
            enc, comp, raw = p
            c["positions"] = {"enc": enc, **self._write(comp), "raw": raw}
            self.sizes["positions"] += len(comp)
        enc, planes, comp, raw = self.enc.values(new[idx], old[idx])
        c["values"] = {"enc": enc, "planes": planes, **self._write(comp), "raw": raw}
        self.sizes["values"] += len(comp)
        self.sizes["plain"] += int(idx.size) * (4 + old.dtype.itemsize)
        t["chunks"].append(c)
        t["changed"] += int(idx.size)
        return int(idx.size)

    def add_file(self, name: str, data: bytes) -> None:
        comp = self.enc.compress(data)
        self.files.append({"name": name, **self._write(comp), "raw": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        self.sizes["files"] += len(comp)

    def finish(self, base_hash: str, result_hash: str, **extra) -> dict:
        header = {"format": FORMAT, "chunk": self.chunk, "parent": base_hash, "base": {"hash": base_hash},
                  "result": {"hash": result_hash}, "tensors": self.tensors, "files": self.files, **extra}
        header["sizes"] = dict(self.sizes)
        header["sizes"]["header"] = 0
        for _ in range(4):  # the header records its own compressed size: iterate to a fixed point
            comp = self.enc.compress(json.dumps(header, separators=(",", ":"), allow_nan=False).encode())
            if header["sizes"]["header"] == len(comp):
                break
            header["sizes"]["header"] = len(comp)
        self._write(comp)
        self._write(struct.pack("<Q", len(comp)) + END)
        header["sizes"]["total"] = self.pos
        return header


# -- reading ----------------------------------------------------------------------------------------------
class PatchReader:
    """A validated patch: its header, and its blobs decompressed on demand with bounded sizes."""

    def __init__(self, src: str | os.PathLike | bytes, name: str | None = None):
        import zstandard

        self.name = name or (str(src) if not isinstance(src, bytes) else "payload")
        if isinstance(src, bytes):
            self._fh: BinaryIO = io.BytesIO(src)
            size = len(src)
        else:
            from ..io.checkpoint import require_regular

            p = os.fspath(src)
            if not os.path.exists(p):
                raise InputError(f"{p}: no such patch file.")
            require_regular(p)
            self._fh = open(p, "rb")
            size = os.path.getsize(p)
        self.size = size
        self._d = zstandard.ZstdDecompressor()
        self.header = self._read_header()

    def _bad(self, why: str) -> InputError:
        return InputError(f"{self.name}: corrupt or truncated patch ({why}).")

    def _read_header(self) -> dict:
        fh, size = self._fh, self.size
        if size < 24:
            raise self._bad("shorter than its magic and trailer")
        fh.seek(0)
        if fh.read(8) != MAGIC:
            raise InputError(f"{self.name}: not an rlsubnet patch (wrong magic bytes).")
        fh.seek(size - 16)
        tail = fh.read(16)
        if tail[8:] != END:
            raise self._bad("its end marker is missing")
        (n,) = struct.unpack("<Q", tail[:8])
        if n > MAX_HEADER or n > size - 24:
            raise self._bad("header length exceeds the file")
        fh.seek(size - 16 - n)
        import zstandard

        try:
            text = zstandard.ZstdDecompressor().decompress(fh.read(n), max_output_size=MAX_HEADER)
            h = json.loads(text.decode("utf-8"))
        except (zstandard.ZstdError, UnicodeDecodeError, ValueError, RecursionError):
            raise self._bad("its header is not a zstd-compressed JSON object") from None
        if not isinstance(h, dict) or h.get("format") != FORMAT:
            raise InputError(f"{self.name}: not an {FORMAT} patch.")
        self._blob_end = size - 16 - n
        try:
            self._validate(h)
        except (KeyError, TypeError, ValueError, AssertionError):
            raise self._bad("its header is malformed") from None
        return h

    def _validate(self, h: dict) -> None:
        from ..io.dtypes import DTYPES

        chunk = h["chunk"]
        assert type(chunk) is int and 8 <= chunk <= 1 << 30
        assert isinstance(h["base"]["hash"], str) and isinstance(h["result"]["hash"], str)
        names = set()
        for t in h["tensors"]:
            assert isinstance(t["name"], str) and t["name"] not in names
            names.add(t["name"])
            dt = DTYPES[t["dtype"]]
            shape = t["shape"]
            assert isinstance(shape, list) and all(type(x) is int and x >= 0 for x in shape)
            numel = int(np.prod(shape)) if shape else 1
            assert isinstance(t["base_sha256"], str) and isinstance(t["result_sha256"], str)
            last = -1
            for c in t["chunks"]:
                start, count, ch = c["start"], c["count"], c["changed"]
                assert type(start) is int and start % chunk == 0 and start > last and count == min(chunk, numel - start) > 0
                assert type(ch) is int and 0 < ch <= count
                last = start
                p = c["positions"]
                if p is None:
                    assert ch == count
                else:
                    raw_max = max((count + 7) // 8, ch * 5)
                    self._check_blob(p, raw_max)
                v = c["values"]
                self._check_blob(v, ch * dt.itemsize)
                assert v["raw"] == ch * dt.itemsize and v["enc"] in ("raw", "xor", "sub") and isinstance(v["planes"], bool)
        for f in h["files"]:
            assert isinstance(f["name"], str) and os.path.basename(f["name"]) == f["name"] and f["name"] not in ("", ".", "..")
            self._check_blob(f, 1 << 30)

    def _check_blob(self, b: dict, raw_max: int) -> None:
        off, ln, raw = b["off"], b["len"], b["raw"]
        assert all(type(x) is int for x in (off, ln, raw))
        assert 8 <= off and ln >= 0 and off + ln <= self._blob_end and 0 <= raw <= raw_max

    def blob(self, b: dict) -> bytes:
        """Decompressed bytes of one blob; its size is checked against the header before and after."""
        import zstandard

        self._fh.seek(b["off"])
        comp = self._fh.read(b["len"])
        try:
            out = self._d.decompress(comp, max_output_size=max(b["raw"], 1)) if b["raw"] else b""
        except zstandard.ZstdError as e:
            raise self._bad(f"a data block does not decompress: {e}") from None
        if len(out) != b["raw"]:
            raise self._bad("a data block has the wrong length")
        return out

    def apply_chunk(self, c: dict, old: np.ndarray) -> np.ndarray:
        """The new raw bits of one chunk, from its old bits."""
        try:
            pos = c["positions"]
            idx = decode_positions(None if pos is None else pos["enc"], b"" if pos is None else self.blob(pos),
                                   old.size, c["changed"])
            v = c["values"]
            new = old.copy()
            new[idx] = decode_values(v["enc"], v["planes"], self.blob(v), old[idx])
        except ValueError as e:
            raise self._bad(str(e)) from None
        return new

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> PatchReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def raw_dtype(itemsize: int):
    return _UINT[itemsize]
