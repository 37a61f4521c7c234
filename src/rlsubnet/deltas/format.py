"""The ``rlsubnet-patch/1`` and ``/2`` format: what changed between two checkpoints, as values, in one file.

FORMAT.md is the normative specification; this docstring summarises it.

Layout (all integers little-endian)::

    b"RLSPATC1"                       8-byte magic
    blob blob ... blob                zstd frames (with content checksums), back to back
    header                            UTF-8 JSON (below), as one zstd frame
    u64 header length, b"RLSPEND1"    16-byte trailer (the compressed header's length)

Every tensor is cut into chunks of ``header["chunk"]`` elements of its row-major flattened storage. For
each chunk with at least one changed entry (stored bits differ: +0 → -0 is a change here, a patch is
exact) there are two blobs:

- **positions**, relative to the chunk start, in whichever encoding compresses smaller:
  ``bitmap`` (``numpy.packbits(changed, bitorder="little")``, ⌈count/8⌉ bytes), ``delta-u8`` (gaps
  ``g[0] = i[0]``, ``g[k] = i[k] - i[k-1] - 1``, one byte each, when every gap is below 255) or
  ``delta-esc`` (one byte per gap, a byte 255 meaning "the next u32 of the tail"; the tail of u32 gaps
  follows the ``changed`` bytes); ``delta-u16``/``delta-u32`` are read, not written; ``null`` positions
  (every entry of the chunk changed) have no blob;
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
                              "values": {"enc", "planes", "off", "len", "raw"}}]}],   # every tensor, changed or not
     "files": [{"name", "off", "len", "raw", "sha256"}],   # the tuned checkpoint's files a checkpoint needs
     "files_left_out": [str],                              # the other files of its folder (not carried)
     "sizes": {"positions", "values", "files", "header", "plain"},
     "source": {"base": str, "tuned": str}, ...}           # unknown keys are ignored by readers

A tensor digest is ``sha256`` of its raw stored bytes (version 1: ``base_sha256``/``result_sha256``), or in
version 2 the kind the header's ``"digest"`` names (``base_digest``/``result_digest``): ``sha256`` or ``mix64``
(a sum of per-entry terms, updated from the changed entries alone: :func:`mix64`). A checkpoint hash is the
kind, ``":"``, and ``sha256`` of the lines ``name|dtype|shape|tensor_digest`` of its tensors sorted by name. ``plain`` is the size of the plain
encoding (int32 positions + raw values, what verl's ``delta_sharded`` sends).

The reader (:class:`PatchReader`) trusts nothing: the header's size is bounded before it is decompressed
(:func:`header_limits`), every blob is decompressed through a stream capped at its recorded size
(:func:`bounded_decompress`), every rule is an explicit check, and the checkpoint hashes are recomputed
from the tensor list.
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


class DeltaError(InputError):
    """A payload that does not apply to the target (wrong base, corrupt, or not reproducing its result)."""


FORMAT = "rlsubnet-patch/1"  # tensor digests are sha256 (patch files, and live payloads with digest="sha256")
FORMAT_2 = "rlsubnet-patch/2"  # the header names its tensor digest: "sha256" or "mix64" (live payloads by default)
FORMATS = (FORMAT, FORMAT_2)
DIGESTS = ("sha256", "mix64")
MAGIC = b"RLSPATC1"
END = b"RLSPEND1"
CHUNK = 1 << 20
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_DELTA = {"delta-u8": np.uint8, "delta-u16": np.uint16, "delta-u32": np.uint32}
POSITION_ENCODINGS = ("bitmap", "delta-esc", *_DELTA)


def tensor_line(name: str, dtype: str, shape, digest: str) -> str:
    return f"{name}|{dtype}|{list(shape)}|{digest}\n"


def checkpoint_hash(entries: list[tuple[str, str, tuple, str]], kind: str = "sha256") -> str:
    """sha256 over ``name|dtype|shape|tensor_digest`` lines sorted by name, prefixed by the tensor digest's kind."""
    h = hashlib.sha256()
    for name, dt, shape, digest in sorted(entries):
        h.update(tensor_line(name, dt, shape, digest).encode())
    return f"{kind}:" + h.hexdigest()


# -- mix64: a tensor digest that a sparse change updates in time proportional to the change ---------------------
# mix64(T) = Σ_i fmix64(bits_i XOR (i · K)) mod 2^64 over the flat (row-major) entries of T, with bits_i the
# entry's stored bits zero-extended to 64 and fmix64 MurmurHash3's 64-bit finaliser. A sum of per-entry terms:
# changing entries S from old to new bits turns the digest d into d − Σ_S term(i, old_i) + Σ_S term(i, new_i),
# so a live chain verifies each step in time proportional to what changed (as LtHash, Lewi et al. 2019, does for
# replicated databases). It detects accidental divergence (a missed or repeated step, a corrupted value, a base
# that differs where the payload writes); it is not a cryptographic hash and does not resist forgery.
_MIX_K = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xFF51AFD7ED558CCD)
_MIX_2 = np.uint64(0xC4CEB9FE1A85EC53)
_MIX_S = np.uint64(33)
_MASK64 = (1 << 64) - 1
_MIX_BLOCK = 1 << 14  # entries per vector pass: 128 KiB of uint64 per buffer, cache-sized
_MIX_STEPS = np.arange(_MIX_BLOCK, dtype=np.uint64) * _MIX_K  # j·K for the positions of one block


def _mix_sum(x: np.ndarray, bits: np.ndarray, tmp: np.ndarray) -> int:
    """Σ fmix64(x XOR bits) mod 2^64, with ``x`` (positions · K, overwritten) and ``tmp`` uint64 buffers."""
    if bits.dtype.kind != "u":  # zero-extended as the unsigned integer of its width, never sign-extended
        bits = bits.view(_UINT[bits.dtype.itemsize])
    np.copyto(tmp, bits, casting="unsafe")
    x ^= tmp
    for m in (_MIX_1, _MIX_2, None):
        np.right_shift(x, _MIX_S, out=tmp)
        x ^= tmp
        if m is not None:
            x *= m
    return int(x.sum(dtype=np.uint64))


def _mix_blocks(n: int, bits: np.ndarray, positions) -> int:
    """Σ of the terms of ``n`` entries, block by block; ``positions(s, x)`` fills ``x`` with the flat positions · K of
    the block starting at entry ``s``."""
    m = min(n, _MIX_BLOCK)
    x, tmp = np.empty(m, np.uint64), np.empty(m, np.uint64)
    total = 0
    for s in range(0, n, _MIX_BLOCK):
        xx = x[: min(_MIX_BLOCK, n - s)]
        positions(s, xx)
        total += _mix_sum(xx, bits[s : s + xx.size], tmp[: xx.size])
    return total & _MASK64


def mix64_terms(idx: np.ndarray, bits: np.ndarray) -> int:
    """Σ fmix64(bits XOR idx·K) mod 2^64 over the given flat positions and their stored bits (any unsigned width)."""

    def positions(s: int, x: np.ndarray) -> None:
        np.copyto(x, idx[s : s + x.size], casting="unsafe")
        x *= _MIX_K

    return _mix_blocks(idx.size, bits, positions)


def mix64(bits: np.ndarray, start: int = 0) -> int:
    """The mix64 sum of a run of a tensor's flat entries (raw unsigned bits) beginning at flat position ``start``."""
    flat = bits.reshape(-1)

    def positions(s: int, x: np.ndarray) -> None:  # (start + s + j)·K
        np.add(_MIX_STEPS[: x.size], np.uint64(((start + s) * 0x9E3779B97F4A7C15) & _MASK64), out=x)

    return _mix_blocks(flat.size, flat, positions)


def mix64_update(digest: str, idx: np.ndarray, old: np.ndarray, new: np.ndarray) -> str:
    """The digest after the entries at flat positions ``idx`` change from bits ``old`` to ``new``."""
    d = int(digest, 16) - mix64_terms(idx, old) + mix64_terms(idx, new)
    return f"{d & _MASK64:016x}"


class TensorHasher:
    """A tensor digest fed with the tensor's raw bytes in order (``update(buffer)``), as hashlib's objects are."""

    def __init__(self, kind: str, itemsize: int):
        self.kind, self.itemsize = kind, itemsize
        self._h = hashlib.sha256() if kind == "sha256" else None
        self._sum, self._n = 0, 0

    def update(self, buf) -> None:
        if self._h is not None:
            self._h.update(buf)
            return
        a = np.frombuffer(buf, _UINT[self.itemsize])
        self._sum += mix64(a, self._n)
        self._n += a.size

    def hexdigest(self) -> str:
        return self._h.hexdigest() if self._h is not None else f"{self._sum & _MASK64:016x}"


def tensor_digest(bits: np.ndarray, kind: str = "sha256") -> str:
    """The digest of a whole tensor from its raw unsigned bits (flattened, row-major)."""
    if kind == "sha256":
        return hashlib.sha256(np.ascontiguousarray(bits).data).hexdigest()
    return f"{mix64(bits):016x}"


def digest_keys(fmt: str) -> tuple[str, str]:
    """The tensor entry's (base, result) digest keys in a header of format ``fmt``."""
    return ("base_sha256", "result_sha256") if fmt == FORMAT else ("base_digest", "result_digest")


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
    value_encodings: tuple[str, ...] = ("raw", "xor", "sub")  # ("raw",): readable without the base's values
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

    SAMPLE = 1024  # values per candidate encoding when choosing among them for a larger set

    def values(self, new: np.ndarray, old: np.ndarray) -> tuple[str, bool, bytes, int]:
        """(encoding, planes, compressed, raw length) of the new bits of the changed entries: the candidate that
        compresses smallest (chosen on the first ``SAMPLE`` values when there are more, then compressed whole)."""
        size = new.dtype.itemsize

        def raw_of(enc: str, n: np.ndarray, o: np.ndarray) -> bytes:
            return {"raw": lambda: n.tobytes(), "xor": lambda: (n ^ o).tobytes(), "sub": lambda: (n - o).tobytes()}[enc]()

        cands = [(e, p) for e in self.value_encodings for p in ((False, True) if size > 1 else (False,))]
        if len(cands) > 1 and new.size > self.SAMPLE:
            k = self.SAMPLE
            cands = [min(cands, key=lambda ep: len(self.compress(_planes(raw_of(ep[0], new[:k], old[:k]), size) if ep[1]
                                                                 else raw_of(ep[0], new[:k], old[:k]))))]
        best = None
        for enc, planes in cands:
            raw = raw_of(enc, new, old)
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
@dataclass
class EncodedChunk:
    """One chunk's change, encoded and compressed, ready to be written: what workers send back."""

    start: int
    count: int
    changed: int
    itemsize: int
    positions: tuple[str, bytes, int] | None  # (encoding, compressed, raw length); None: every entry changed
    values: tuple  # (encoding, planes, compressed, raw length)


def encode_chunk(enc: Encoder, start: int, old: np.ndarray, new: np.ndarray, idx: np.ndarray | None = None) -> EncodedChunk | None:
    """The change of one chunk (raw bits before and after) encoded by ``enc``; None when nothing changed. Pure:
    the same inputs give the same bytes in any process. ``idx``: the changed positions, when already known."""
    if idx is None:
        idx = np.flatnonzero(old != new)
    if idx.size == 0:
        return None
    return EncodedChunk(start, int(old.size), int(idx.size), old.dtype.itemsize, enc.positions(idx, old.size),
                        enc.values(new[idx], old[idx]))


class PatchWriter:
    """Writes a patch to a binary stream in one pass: blobs as they come, the header at the end."""

    def __init__(self, fh: BinaryIO, level: int = 3, chunk: int = CHUNK, raw_values: bool = False, digest: str = "sha256"):
        if digest not in DIGESTS:
            raise ValueError(f"digest={digest!r}: expected one of {', '.join(DIGESTS)}")
        self.fh = fh
        self.digest = digest
        self.format = FORMAT if digest == "sha256" else FORMAT_2  # sha256 patches stay readable by every /1 reader
        self.keys = digest_keys(self.format)  # the tensor entry's (base, result) digest keys
        self.enc = Encoder(level, ("raw",) if raw_values else ("raw", "xor", "sub"))
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

    def chunk_update(self, t: dict, start: int, old: np.ndarray, new: np.ndarray, idx: np.ndarray | None = None) -> int:
        """Record one chunk of tensor ``t`` (raw bits before and after; ``idx`` its changed positions when known);
        returns how many entries changed."""
        return self.add_encoded(t, encode_chunk(self.enc, start, old, new, idx))

    def add_encoded(self, t: dict, e: EncodedChunk | None) -> int:
        """Write a chunk encoded by :func:`encode_chunk` (possibly in another process) into tensor ``t``; chunks of a
        tensor are added in order. The bytes written are those ``chunk_update`` would write."""
        if e is None:
            return 0
        c = {"start": e.start, "count": e.count, "changed": e.changed, "positions": None}
        if e.positions is not None:
            enc, comp, raw = e.positions
            c["positions"] = {"enc": enc, **self._write(comp), "raw": raw}
            self.sizes["positions"] += len(comp)
        enc, planes, comp, raw = e.values
        c["values"] = {"enc": enc, "planes": planes, **self._write(comp), "raw": raw}
        self.sizes["values"] += len(comp)
        self.sizes["plain"] += e.changed * (4 + e.itemsize)
        t["chunks"].append(c)
        t["changed"] += e.changed
        return e.changed

    def add_file(self, name: str, data: bytes) -> None:
        comp = self.enc.compress(data)
        self.files.append({"name": name, **self._write(comp), "raw": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        self.sizes["files"] += len(comp)

    def finish(self, base_hash: str, result_hash: str, **extra) -> dict:
        header = {"format": self.format, "chunk": self.chunk, "parent": base_hash, "base": {"hash": base_hash},
                  "result": {"hash": result_hash}, "tensors": self.tensors, "files": self.files, **extra}
        if self.format == FORMAT_2:
            header["digest"] = self.digest
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
MAX_HEADER_RAW = 256 * 1024 * 1024  # a decompressed header never exceeds this (a 671B model's patch lists ~700k chunks)
MAX_TENSORS = 1_000_000  # tensors one patch may list (DeepSeek-V3 has ~92,000)
MAX_SIDE_FILE = 64 * 1024 * 1024  # one non-tensor file carried by a patch
# names a carried file may not take: they would replace the weights or the index a patch has just verified
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json", ".rlspatch")
RESERVED_FILES = (".rlsubnet-output.json", "manifest.json")


def header_limits(compressed: int) -> tuple[int, int]:
    """(max decompressed bytes, bytes of JSON per object or array at least) for a header of ``compressed`` bytes.

    A genuine header is text around its objects: a tensor entry is about 200 bytes of JSON for 3 containers
    (its object, shape and chunk list), a chunk entry about 250 for 3, so there are more than 60 bytes per ``{``
    or ``[``; and it compresses a few times, up to a couple of hundred times where many tensors share one hash
    (zero-initialised biases, norms of ones). A bomb is the opposite: ``{},`` is 3 bytes per object and compresses
    ten-thousandfold. So the text may be at most 1 MiB + 256 × its compressed length (and 256 MiB), and must
    hold at least 24 bytes per container: a few kilobytes can never expand into gigabytes of Python objects.
    """
    return min(MAX_HEADER_RAW, (1 << 20) + 256 * compressed), 24


def bounded_decompress(comp: bytes, expected: int, what: str) -> bytes:
    """Decompress one zstd frame that must hold exactly ``expected`` bytes, never allocating more than that.

    python-zstandard's ``max_output_size`` is ignored when a frame records its content size, so the recorded
    size is checked against ``expected`` first, and the frame is then read through a stream with a hard cap of
    ``expected + 1`` bytes (which also catches a frame that records no size). Raises ``ValueError``.
    """
    import zstandard

    if expected == 0 and not comp:
        return b""
    try:
        size = zstandard.frame_content_size(comp)
    except zstandard.ZstdError:
        raise ValueError(f"{what} is not a zstd frame") from None
    if size not in (-1, expected):  # -1: the frame does not record its size
        raise ValueError(f"{what} records {size} bytes, the header says {expected}")
    out = read_capped(comp, expected, what)
    got = len(out)
    if got != expected:
        raise ValueError(f"{what} holds {'more' if got > expected else got} bytes, the header says {expected}")
    return out


def carried_name_problem(name) -> str | None:
    """Why ``name`` may not be a file carried by a patch (None when it may)."""
    if not isinstance(name, str) or not name:
        return "it is not a name"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "it contains control characters"
    if os.path.basename(name) != name or name in (".", "..") or name.startswith("."):
        return "it is not a plain visible file name"
    if name.endswith(WEIGHT_SUFFIXES) or name in RESERVED_FILES:
        return "it would replace the weights, an index or rlsubnet's own marker"
    return None


class _Bad(Exception):
    """A header rule broken (explicit checks: ``assert`` vanishes under ``python -O``)."""


def _need(cond: bool, why: str) -> None:
    if not cond:
        raise _Bad(why)


def _is_int(x) -> bool:
    return type(x) is int


class PatchReader:
    """A validated patch: its header, and its blobs decompressed on demand with bounded sizes.

    Before any blob is read the header is checked rule by rule: sizes within the file, chunks in order and
    in range, decompressed lengths bounded by what each chunk can hold, carried file names that cannot land on
    weights, and the recorded checkpoint hashes equal to the hashes computed from the tensors it lists.
    """

    def __init__(self, src: str | os.PathLike | bytes, name: str | None = None):
        self.name = name or (str(src) if not isinstance(src, bytes) else "payload")
        self._mem = None  # a payload in memory; a file is read with pread: blobs may be read from several threads
        if isinstance(src, bytes):
            self._fh: BinaryIO = io.BytesIO(src)
            self._mem = memoryview(src)
            size = len(src)
        else:
            from ..io.checkpoint import require_regular

            p = os.fspath(src)
            if not os.path.exists(p):
                raise InputError(f"{p}: no such patch file.")
            require_regular(p)
            self._fh = open(p, "rb")
            size = os.fstat(self._fh.fileno()).st_size
        self.size = size
        try:
            self.header = self._read_header()
        except BaseException:
            self._fh.close()
            raise

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
        if n > size - 24:
            raise self._bad("header length exceeds the file")
        self._blob_end = size - 16 - n
        raw_max, per_container = header_limits(n)
        fh.seek(self._blob_end)
        comp = fh.read(n)
        import zstandard

        try:
            rec = zstandard.frame_content_size(comp)
        except zstandard.ZstdError:
            raise self._bad("its header is not a zstd frame") from None
        if rec > raw_max:
            raise self._bad(f"its header would decompress to {rec} bytes, more than a header of this size may hold ({raw_max})")
        try:
            text = bounded_decompress(comp, rec, "its header") if rec >= 0 else read_capped(comp, raw_max, "its header")
        except ValueError as e:
            raise self._bad(str(e)) from None
        if len(text) > raw_max:
            raise self._bad(f"its header decompresses to more than a header of this size may hold ({raw_max} bytes)")
        containers = text.count(b"{") + text.count(b"[")
        if containers > 64 + len(text) // per_container:
            raise self._bad(f"its header holds {containers} objects in {len(text)} bytes, more than a patch header can "
                            f"(at most one per {per_container} bytes)")
        try:
            h = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise self._bad("its header is not a JSON object") from None
        if not isinstance(h, dict) or h.get("format") not in FORMATS:
            raise InputError(f"{self.name}: not an {FORMAT} or {FORMAT_2} patch.")
        self.digest = "sha256" if h["format"] == FORMAT else h.get("digest")
        if self.digest not in DIGESTS:
            raise self._bad(f"its tensor digest {str(self.digest)[:40]!r} is not one of {', '.join(DIGESTS)}")
        self.keys = digest_keys(h["format"])
        try:
            self._validate(h)
        except _Bad as e:
            raise self._bad(f"its header is malformed: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
            raise self._bad(f"its header is malformed: {type(e).__name__} {str(e)[:80]}") from None
        return h

    def _validate(self, h: dict) -> None:
        from ..io.dtypes import DTYPES

        chunk = h["chunk"]
        _need(_is_int(chunk) and 8 <= chunk <= 1 << 30, "chunk size")
        hexlen = 64 if self.digest == "sha256" else 16
        for k in ("parent",):
            _need(isinstance(h[k], str), k)
        _need(isinstance(h["base"], dict) and isinstance(h["result"], dict), "base/result")
        _need(isinstance(h["base"]["hash"], str) and isinstance(h["result"]["hash"], str), "hashes")
        _need(isinstance(h["sizes"], dict), "sizes")
        for k in ("positions", "values", "files", "header", "plain"):  # other keys are ignored (FORMAT.md §8)
            _need(_is_int(h["sizes"].get(k)) and h["sizes"][k] >= 0, f"sizes.{k}")
        _need(isinstance(h["tensors"], list) and len(h["tensors"]) <= MAX_TENSORS, "tensor list")
        _need(isinstance(h["files"], list), "file list")
        names = set()
        base_e, res_e = [], []
        for t in h["tensors"]:
            _need(isinstance(t, dict) and isinstance(t["name"], str) and t["name"] not in names, "tensor name")
            names.add(t["name"])
            _need(isinstance(t["dtype"], str) and t["dtype"] in DTYPES, f"dtype of '{t['name']}'")
            dt = DTYPES[t["dtype"]]
            shape = t["shape"]
            _need(isinstance(shape, list) and len(shape) <= 16 and all(_is_int(x) and 0 <= x < 1 << 48 for x in shape),
                  f"shape of '{t['name']}'")
            numel = 1
            for x in shape:
                numel *= x
            _need(numel < 1 << 48, f"size of '{t['name']}'")
            for k in self.keys:
                _need(isinstance(t[k], str) and len(t[k]) == hexlen and all(c in "0123456789abcdef" for c in t[k]), f"{k} of '{t['name']}'")
            _need(_is_int(t["changed"]) and 0 <= t["changed"] <= numel, f"changed count of '{t['name']}'")
            _need(isinstance(t["chunks"], list), f"chunks of '{t['name']}'")
            last, total = -1, 0
            for c in t["chunks"]:
                _need(isinstance(c, dict), "chunk")
                start, count, ch = c["start"], c["count"], c["changed"]
                _need(_is_int(start) and start % chunk == 0 and start > last and _is_int(count) and count == min(chunk, numel - start) > 0,
                      f"chunk at {start!r} of '{t['name']}'")
                _need(_is_int(ch) and 0 < ch <= count, f"changed count of a chunk of '{t['name']}'")
                last = start
                total += ch
                p = c["positions"]
                if p is None:
                    _need(ch == count, "positions")
                else:
                    _need(isinstance(p, dict) and p.get("enc") in POSITION_ENCODINGS, "positions encoding")
                    self._check_blob(p, max((count + 7) // 8, ch * 5))
                v = c["values"]
                _need(isinstance(v, dict) and v.get("enc") in ("raw", "xor", "sub") and isinstance(v.get("planes"), bool), "values encoding")
                self._check_blob(v, ch * dt.itemsize)
                _need(v["raw"] == ch * dt.itemsize, "values length")
            _need(total == t["changed"], f"changed count of '{t['name']}'")
            base_e.append((t["name"], t["dtype"], tuple(shape), t[self.keys[0]]))
            res_e.append((t["name"], t["dtype"], tuple(shape), t[self.keys[1]]))
        fnames = set()
        for f in h["files"]:
            _need(isinstance(f, dict), "file entry")
            why = carried_name_problem(f["name"])
            _need(why is None, f"carried file {f['name']!r}: {why}")
            _need(f["name"] not in fnames, "a carried file is listed twice")
            fnames.add(f["name"])
            _need(isinstance(f["sha256"], str) and len(f["sha256"]) == 64, "file hash")
            self._check_blob(f, MAX_SIDE_FILE)
        # the checkpoint hashes are what the listed tensors hash to, never taken on trust
        _need(h["base"]["hash"] == checkpoint_hash(base_e, self.digest), "its base hash is not the hash of the tensors it lists")
        _need(h["result"]["hash"] == checkpoint_hash(res_e, self.digest), "its result hash is not the hash of the tensors it lists")
        _need(h["parent"] == h["base"]["hash"], "its parent is not its base hash")

    def digests(self, t: dict) -> tuple[str, str]:
        """A tensor entry's (base, result) digests, of the kind ``self.digest``."""
        return t[self.keys[0]], t[self.keys[1]]

    def _check_blob(self, b: dict, raw_max: int) -> None:
        off, ln, raw = b["off"], b["len"], b["raw"]
        _need(all(_is_int(x) for x in (off, ln, raw)), "blob fields")
        _need(8 <= off and ln >= 0 and off + ln <= self._blob_end and 0 <= raw <= raw_max, "blob range")

    def blob(self, b: dict) -> bytes:
        """Decompressed bytes of one blob: never more than the (checked) size the header gives it."""
        off, ln = b["off"], b["len"]
        comp = self._mem[off : off + ln] if self._mem is not None else os.pread(self._fh.fileno(), ln, off)
        if not b["raw"]:
            return b""
        try:
            return bounded_decompress(comp, b["raw"], "a data block")
        except ValueError as e:
            raise self._bad(str(e)) from None

    def file_data(self, f: dict) -> bytes:
        """The bytes of a carried file, checked against its recorded sha256."""
        data = self.blob(f)
        if hashlib.sha256(data).hexdigest() != f["sha256"]:
            raise self._bad(f"file '{f['name']}' fails its hash")
        return data

    def chunk_positions(self, c: dict) -> np.ndarray:
        """Chunk-relative indices of a chunk's changed entries."""
        pos = c["positions"]
        try:
            return decode_positions(None if pos is None else pos["enc"], b"" if pos is None else self.blob(pos), c["count"], c["changed"])
        except ValueError as e:
            raise self._bad(str(e)) from None

    def chunk_values(self, c: dict, old_at: np.ndarray) -> np.ndarray:
        """New bits of a chunk's changed entries, from their old bits (ignored by the ``raw`` encoding)."""
        v = c["values"]
        try:
            return decode_values(v["enc"], v["planes"], self.blob(v), old_at)
        except ValueError as e:
            raise self._bad(str(e)) from None

    def apply_chunk(self, c: dict, old: np.ndarray) -> np.ndarray:
        """The new raw bits of one chunk, from its old bits."""
        if old.size != c["count"]:
            raise self._bad("a chunk does not match its tensor")
        idx = self.chunk_positions(c)
        new = old.copy()
        new[idx] = self.chunk_values(c, old[idx])
        return new

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> PatchReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_capped(comp: bytes, cap: int, what: str) -> bytes:
    """Decompress one zstd frame through a stream, stopping after ``cap + 1`` bytes (so a caller can tell
    "more than cap" without ever holding more); output buffers grow 1 MiB at a time with what the frame
    really yields, so a size claimed by a header costs nothing until the data is there. Raises ``ValueError``."""
    import zstandard

    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(comp), read_across_frames=False)
    parts, got = [], 0
    try:
        while got <= cap:
            b = reader.read(min(cap + 1 - got, 1 << 20))
            if not b:
                break
            parts.append(b)
            got += len(b)
    except zstandard.ZstdError as e:
        raise ValueError(f"{what} does not decompress: {e}") from None
    return b"".join(parts)


def iter_updates(payload: bytes | str | os.PathLike, old=None):
    """Yield ``(name, dtype, shape, indices, values)`` for every tensor a patch or live payload changes.

    ``dtype`` is the safetensors code (``"BF16"``), ``shape`` the tensor's shape, ``indices`` the flat int64
    positions (row-major, checkpoint coordinates) of the changed entries, and ``values`` their new stored bits
    as unsigned integers of the dtype's width (``uint16`` for BF16): the input a sparse weight patch (vLLM) or a
    delta receiver (verl) takes. Torch-free. Chunks encoded ``xor``/``sub`` are relative to the base:
    ``old(name, indices)`` must then return the base's bits at those positions (a payload written with
    ``raw_values=True`` never needs it). Everything is validated as :class:`PatchReader` validates it; the
    result hashes cannot be checked here (that needs the whole tensor), which ``apply_delta`` and
    ``patch apply`` do.
    """
    from ..io.dtypes import DTYPES

    with PatchReader(payload, name=None if not isinstance(payload, bytes) else "payload") as r:
        for t in r.header["tensors"]:
            if not t["chunks"]:
                continue
            raw_t = _UINT[DTYPES[t["dtype"]].itemsize]
            idx_parts, val_parts = [], []
            for c in t["chunks"]:
                at = r.chunk_positions(c) + c["start"]
                v = c["values"]
                if v["enc"] == "raw":
                    base = np.zeros(at.size, raw_t)
                elif old is None:
                    raise DeltaError(f"{r.name}: tensor '{t['name']}' is encoded relative to its base ({v['enc']}); "
                                     "pass old=(name, indices) -> base bits, or publish with raw_values=True.")
                else:
                    base = np.asarray(old(t["name"], at)).astype(raw_t, copy=False)
                val_parts.append(r.chunk_values(c, base))
                idx_parts.append(at)
            yield t["name"], t["dtype"], tuple(t["shape"]), np.concatenate(idx_parts), np.concatenate(val_parts)

