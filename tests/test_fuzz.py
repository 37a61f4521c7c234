"""Property-based and fuzz tests of the reader and the mask loader (hypothesis, bounded budget).

Random headers, offsets, shapes, dtypes, index files and mask metadata must give either a correct result
or the clean :class:`InputError`: never another exception, a hang, or an allocation larger than the file.
"Correct" is judged against the safetensors library itself: whatever it accepts we must read to the same
bits, and whatever we accept it must accept too.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open

from rlsubnet.io import InputError, open_checkpoint
from rlsubnet.io.checkpoint import read_safetensors_header
from rlsubnet.masks import Subnetwork

from conftest import join_payload, split_payload

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])
VALID = ["F32", "F16", "BF16", "F64", "I8", "U8", "I32", "I64", "BOOL", "F8_E4M3"]
DTYPES = VALID * 3 + ["X9", 7, None]
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1, "I32": 4, "I64": 8, "BOOL": 1, "F8_E4M3": 1}

names = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12)
shapes = st.one_of(st.lists(st.integers(min_value=0, max_value=6), max_size=3),
                   st.lists(st.integers(min_value=-2, max_value=6), max_size=3))


@st.composite
def headers(draw):
    """Mostly-valid headers with random corruptions: wrong sizes, gaps, overlaps, bad dtypes and shapes."""
    n = draw(st.integers(1, 4))
    entries, off = {}, 0
    for _ in range(n):
        dt = draw(st.sampled_from(DTYPES))
        shape = draw(shapes)
        numel = int(np.prod(shape)) if shape else 1
        size = max(numel, 0) * ITEMSIZE.get(dt, 1) if isinstance(dt, str) else 4
        begin = off + draw(st.sampled_from([0] * 12 + [1, -1]))
        end = begin + size + draw(st.sampled_from([0] * 12 + [1, -1]))
        off = max(off, end)
        e = {"dtype": dt, "shape": shape, "data_offsets": [begin, end]}
        if draw(st.integers(0, 40)) == 0:
            e = draw(st.sampled_from([[], "x", {"dtype": "F32"}, {"dtype": "F32", "shape": [1], "data_offsets": [0]},
                                      {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}]))
        entries[draw(names)] = e
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.sampled_from([{"a": "b"}, {"a": 1}, [], None]))
    data_len = off + draw(st.sampled_from([0] * 8 + [3, -1]))
    return entries, max(data_len, 0)


def _write(path: Path, header, data_len: int, length_delta: int = 0, raw: bytes | None = None) -> None:
    h = raw if raw is not None else json.dumps(header).encode()
    data = bytes(np.random.default_rng(len(h)).integers(0, 256, data_len, dtype=np.uint8))
    path.write_bytes(struct.pack("<Q", max(len(h) + length_delta, 0)) + h + data)


def _library_view(path: Path) -> dict | None:
    """What the safetensors library reads from the file (raw bytes per tensor), or None if it refuses it."""
    try:
        out = {}
        with safe_open(str(path), framework="numpy") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (sl.get_dtype(), tuple(sl.get_shape()))
        return out
    except (SafetensorError, Exception):  # the library raises several types; any refusal counts
        return None


@FUZZ
@given(hdr=headers(), delta=st.sampled_from([0] * 8 + [1, -1, 10**6]))
def test_reader_agrees_with_the_library_or_refuses_cleanly(tmp_path, hdr, delta):
    header, data_len = hdr
    f = tmp_path / "model.safetensors"
    _write(f, header, data_len, delta)
    lib = _library_view(f)
    try:
        tensors, _ = read_safetensors_header(str(f))
    except InputError:
        ours = None
    else:
        ours = {k: (t.dtype.name, t.shape) for k, t in tensors.items()}
    event("accepted" if ours is not None else "refused")
    if ours is not None:
        # we accept only what the library accepts, and read the same table
        assert lib is not None, (header, data_len, delta)
        assert {k: v[1] for k, v in ours.items()} == {k: v[1] for k, v in lib.items()}
        # and the bytes we read are the library's
        if not ours:
            return
        with open_checkpoint(f) as ck, safe_open(str(f), framework="numpy") as g:
            for k, t in ck.tensors.items():
                if t.dtype.name in ("U8", "I8", "I32", "I64", "F32", "F64", "F16"):
                    assert ck.read(k).tobytes() == g.get_tensor(k).tobytes()


@FUZZ
@given(raw=st.binary(max_size=64), n=st.integers(0, 2**64 - 1))
def test_random_bytes_never_crash(tmp_path, raw, n):
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", n) + raw)
    try:
        read_safetensors_header(str(f))
    except InputError:
        pass


@FUZZ
@given(wm=st.dictionaries(names, st.one_of(st.sampled_from(["a.safetensors", "../a.safetensors", "/etc/passwd",
                                                             "..a.safetensors", "sub/../a.safetensors", "", ".",
                                                             "nope.safetensors", "a.safetensors\\x"]),
                                          st.integers(), st.none(), st.lists(st.integers(), max_size=1)),
                          max_size=3),
       wrap=st.sampled_from(["map", "list", "none", "str"]))
def test_index_files_fuzz(tmp_path, wm, wrap):
    from safetensors.numpy import save_file

    d = tmp_path / "ck"
    d.mkdir(exist_ok=True)
    save_file({"w": np.zeros(3, np.float32)}, str(d / "a.safetensors"))
    body = {"map": {"weight_map": wm}, "list": [wm], "none": {"weight_map": None}, "str": "x"}[wrap]
    (d / "model.safetensors.index.json").write_text(json.dumps(body))
    try:
        ck = open_checkpoint(d)
    except InputError:
        return
    # accepted: every indexed file is inside the folder, and the tensors are the shard's
    assert set(ck.tensors) == {"w"} and all(Path(f).resolve().parent == d.resolve() for f in ck.files)


@st.composite
def masks(draw):
    n = draw(st.integers(1, 3))
    tensors, shapes_meta = {}, {}
    for i in range(n):
        shape = draw(st.lists(st.integers(0, 40), min_size=0, max_size=2))
        numel = int(np.prod(shape)) if shape else 1
        nbytes = (numel + 7) // 8 + draw(st.sampled_from([0, 0, 0, 1, -1]))
        bits = draw(st.binary(min_size=max(nbytes, 0), max_size=max(nbytes, 0)))
        name = f"t{i}"
        tensors[name] = np.frombuffer(bits, np.uint8).copy()
        claimed = draw(st.sampled_from([shape, shape, shape, [2**36], [-8, -1], [1.5], "x", [2**20, 2**20]]))
        shapes_meta[name] = claimed
    meta = {"format": draw(st.sampled_from(["rlsubnet-mask/1", "rlsubnet-mask/1", "other"])),
            "shapes": draw(st.sampled_from([json.dumps(shapes_meta), json.dumps(shapes_meta), "{", "[]"])),
            "counts": json.dumps({k: draw(st.integers(-10**18, 10**18)) for k in tensors})}
    return tensors, meta


@FUZZ
@given(m=masks())
def test_mask_loader_fuzz(tmp_path, m):
    from safetensors.numpy import save_file

    tensors, meta = m
    f = tmp_path / "m.safetensors"
    save_file(tensors, str(f), metadata=meta)
    size = f.stat().st_size
    tracemalloc.start()
    try:
        try:
            sub = Subnetwork.load(f)
            counts = {n: sub.count(n) for n in sub.names}
            dens = sub.density()
        except InputError:
            return
        finally:
            peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * size + (1 << 20)  # allocation bounded by the file, not by what its metadata claims
    for n, t in tensors.items():  # counts are the bits', whatever the metadata says
        numel = int(np.prod(sub.shapes[n]))
        assert counts[n] == int(np.unpackbits(t, bitorder="little")[:numel].sum())
    assert 0.0 <= dens <= 1.0


@pytest.mark.parametrize("shape", [[2**36], [2**18, 2**18]])
def test_huge_claimed_mask_allocates_nothing(tmp_path, shape):
    from safetensors.numpy import save_file

    f = tmp_path / "h.safetensors"
    save_file({"w": np.zeros(4096, np.uint8)}, str(f),
              metadata={"format": "rlsubnet-mask/1", "shapes": json.dumps({"w": shape}), "counts": "{}"})
    tracemalloc.start()
    try:
        with pytest.raises(InputError):
            Subnetwork.load(f)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# -- patches and live payloads (issue 15) ------------------------------------------------------------------
def _valid_payload():
    """(payload bytes, the state dict it applies to) of a live delta touching two tensors."""
    import torch

    from rlsubnet.deltas import DeltaPublisher

    g = torch.Generator().manual_seed(0)
    sd = {"a": torch.randn(300, generator=g).bfloat16(), "b": torch.randn(5, 7, generator=g), "c": torch.zeros(3, dtype=torch.int32)}
    base = {k: v.clone() for k, v in sd.items()}
    pub = DeltaPublisher(sd, dtype=None, chunk=64)
    sd["a"][::7] += 1
    sd["b"][1, :] *= 2
    return pub.delta(), base


_PAYLOAD, _BASE = _valid_payload()
_VALUES = st.one_of(st.integers(-3, 3), st.sampled_from([2**31, 2**63, -(2**40), 10**30]), st.none(), st.text(max_size=3),
                    st.lists(st.integers(0, 3), max_size=2), st.booleans(), st.floats(allow_nan=True))


@st.composite
def payloads(draw):
    """A valid payload with random corruptions: header fields set to hostile values, bytes flipped, frames swapped
    for others that decompress to other sizes (bombs in miniature), or truncation."""
    blobs, h = split_payload(_PAYLOAD)
    kind = draw(st.sampled_from(["field", "field", "flip", "frame", "truncate", "none"]))
    if kind == "field":
        t = draw(st.sampled_from(h["tensors"]))
        where = t
        if t["chunks"] and draw(st.booleans()):
            c = draw(st.sampled_from(t["chunks"]))
            where = c
            if draw(st.booleans()):
                where = c["values"] if c["positions"] is None or draw(st.booleans()) else c["positions"]
        key = draw(st.sampled_from(sorted(where)))
        where[key] = draw(_VALUES)
        return join_payload(blobs, h)
    if kind == "frame":
        t = draw(st.sampled_from([t for t in h["tensors"] if t["chunks"]]))
        v = draw(st.sampled_from(t["chunks"]))["values"]
        size = draw(st.sampled_from([0, 1, v["raw"] - 1, v["raw"] + 1, 10**6]))
        frame = zstandard.ZstdCompressor(write_content_size=draw(st.booleans())).compress(b"\1" * size)
        v["off"], v["len"] = len(blobs), len(frame)
        return join_payload(blobs + frame, h)
    data = bytearray(_PAYLOAD)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    return bytes(data)


@FUZZ
@given(payload=payloads())
def test_live_payloads_apply_exactly_or_refuse_in_bounded_memory(payload):
    from rlsubnet.deltas import DeltaError, apply_delta

    target = {k: v.clone() for k, v in _BASE.items()}
    tracemalloc.start()
    try:
        try:
            apply_delta(target, payload)
            ok = True
        except DeltaError:
            ok = False
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    event("applied" if ok else "refused")
    assert peak < 8 * (1 << 20) + 64 * len(payload), peak
    if not ok:  # a refused payload leaves the target as it was
        assert all(v.equal(_BASE[k]) for k, v in target.items())


@FUZZ
@given(payload=payloads())
def test_patch_reader_reads_every_chunk_or_refuses(tmp_path, payload):
    """Patch files go through the same reader; every chunk of an accepted patch decodes or is refused cleanly."""
    from rlsubnet.deltas.format import PatchReader
    from rlsubnet.io.bits import torch_raw

    f = tmp_path / "p.rlspatch"
    f.write_bytes(payload)
    tracemalloc.start()
    try:
        try:
            with PatchReader(f) as r:
                for t in r.header["tensors"]:
                    old = torch_raw(_BASE[t["name"]]) if t["name"] in _BASE else None
                    for c in t["chunks"]:
                        if old is not None and old.size >= c["start"] + c["count"]:
                            r.apply_chunk(c, old[c["start"] : c["start"] + c["count"]])
                    for fd in r.header["files"]:
                        r.file_data(fd)
        except InputError:
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * (1 << 20) + 64 * len(payload), peak
