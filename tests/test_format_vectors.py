"""FORMAT.md's test vectors, read two ways: by rlsubnet's reader, and by a reader written here from FORMAT.md
alone (zstandard, numpy and json; nothing of rlsubnet's decoding). Both must turn base.json into step1.json and
step1.json into step2.json, bit for bit, and agree with expected.json."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import zstandard

from rlsubnet.deltas.format import PatchReader, checkpoint_hash, iter_updates

V = Path(__file__).parent / "vectors"
WIDTH = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "I16": 2, "U16": 2,
         "I32": 4, "U32": 4, "I64": 8, "U64": 8, "BOOL": 1}
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def load(name):
    return {n: (t["dtype"], np.frombuffer(bytes.fromhex(t["hex"]), UINT[WIDTH[t["dtype"]]]).reshape(t["shape"]).copy())
            for n, t in json.loads((V / f"{name}.json").read_text()).items()}


M64 = (1 << 64) - 1


def spec_mix64(bits) -> str:
    """FORMAT.md §6's mix64, entry by entry in Python integers."""
    total = 0
    for i, b in enumerate(int(x) for x in np.asarray(bits).reshape(-1)):
        x = b ^ ((i * 0x9E3779B97F4A7C15) & M64)
        x ^= x >> 33
        x = (x * 0xFF51AFD7ED558CCD) & M64
        x ^= x >> 33
        x = (x * 0xC4CEB9FE1A85EC53) & M64
        x ^= x >> 33
        total = (total + x) & M64
    return f"{total:016x}"


def spec_digest(header: dict, bits) -> str:
    if header["format"] == "rlsubnet-patch/1" or header["digest"] == "sha256":
        return hashlib.sha256(np.ascontiguousarray(bits).tobytes()).hexdigest()
    assert header["digest"] == "mix64"
    return spec_mix64(bits)


def spec_apply(path: Path, tensors: dict) -> dict:
    """Apply a patch as FORMAT.md describes it."""
    data = path.read_bytes()
    assert data[:8] == b"RLSPATC1" and data[-8:] == b"RLSPEND1"
    (n,) = struct.unpack("<Q", data[-16:-8])
    header = json.loads(zstandard.ZstdDecompressor().decompress(data[len(data) - 16 - n : -16]))
    blob = lambda b: zstandard.ZstdDecompressor().decompress(data[b["off"] : b["off"] + b["len"]]) if b["raw"] else b""
    out = {}
    v1 = header["format"] == "rlsubnet-patch/1"
    assert v1 or header["format"] == "rlsubnet-patch/2"
    base_key, result_key = ("base_sha256", "result_sha256") if v1 else ("base_digest", "result_digest")
    for t in header["tensors"]:
        dt, arr = tensors[t["name"]]
        w = WIDTH[t["dtype"]]
        flat = arr.reshape(-1).copy()
        assert spec_digest(header, flat) == t[base_key], t["name"]
        for c in t["chunks"]:
            old = flat[c["start"] : c["start"] + c["count"]]
            p = c["positions"]
            if p is None:
                idx = np.arange(c["count"])
            elif p["enc"] == "bitmap":
                idx = np.flatnonzero(np.unpackbits(np.frombuffer(blob(p), np.uint8), count=c["count"], bitorder="little"))
            elif p["enc"] == "delta-esc":
                raw = blob(p)
                g = np.frombuffer(raw[: c["changed"]], np.uint8).astype(np.int64)
                esc = np.flatnonzero(g == 255)
                g[esc] = np.frombuffer(raw[c["changed"] :], np.uint32)
                idx = np.cumsum(g + 1) - 1
            else:
                g = np.frombuffer(blob(p), {"delta-u8": np.uint8, "delta-u16": np.uint16, "delta-u32": np.uint32}[p["enc"]]).astype(np.int64)
                idx = np.cumsum(g + 1) - 1
            v = c["values"]
            raw = blob(v)
            if v["planes"]:
                raw = np.frombuffer(raw, np.uint8).reshape(w, -1).T.tobytes()
            vals = np.frombuffer(raw, UINT[w])
            o = old[idx]
            new = {"raw": vals, "xor": vals ^ o, "sub": (o + vals).astype(o.dtype)}[v["enc"]]
            old[idx] = new
        assert spec_digest(header, flat) == t[result_key], t["name"]
        out[t["name"]] = (dt, flat.reshape(arr.shape))
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k][0] == b[k][0] and np.array_equal(a[k][1], b[k][1]) for k in a)


def test_a_reader_written_from_the_spec_reproduces_the_vectors():
    base, s1, s2 = load("base"), load("step1"), load("step2")
    assert same(spec_apply(V / "p1.rlspatch", base), s1)
    assert same(spec_apply(V / "p2.rlspatch", s1), s2)
    assert same(spec_apply(V / "p2-mix64.rlspatch", s1), s2)  # rlsubnet-patch/2, mix64 digests


def test_rlsubnet_reader_and_expected_results():
    exp = json.loads((V / "expected.json").read_text())
    states = {"p1": (load("base"), load("step1")), "p2": (load("step1"), load("step2")), "p2-mix64": (load("step1"), load("step2"))}
    for p, (a, b) in states.items():
        with PatchReader(V / f"{p}.rlspatch") as r:
            h = r.header
            assert (h["format"], r.digest) == (exp[p]["format"], exp[p]["digest"])
            assert h["parent"] == exp[p]["parent"] == checkpoint_hash(
                [(n, dt, tuple(v.shape), spec_digest(h, v)) for n, (dt, v) in a.items()], r.digest)
            assert h["result"]["hash"] == exp[p]["result"]
            assert {t["name"]: list(r.digests(t)) for t in h["tensors"]} == exp[p]["digests"]
            assert all(exp[p]["digests"][n] == [spec_digest(h, a[n][1]), spec_digest(h, b[n][1])] for n in a)
            for t in h["tensors"]:
                flat = a[t["name"]][1].reshape(-1).copy()
                for c in t["chunks"]:
                    flat[c["start"] : c["start"] + c["count"]] = r.apply_chunk(c, flat[c["start"] : c["start"] + c["count"]])
                assert np.array_equal(flat, b[t["name"]][1].reshape(-1)), t["name"]
                assert t["changed"] == exp[p]["changed"][t["name"]] == int(np.count_nonzero(a[t["name"]][1] != b[t["name"]][1]))
        old = {n: v.reshape(-1) for n, (_, v) in a.items()}
        ups = {n: (idx, vals) for n, _, _, idx, vals in iter_updates(V / f"{p}.rlspatch", old=lambda n, i, o=old: o[n][i])}
        assert {n: {"indices": i.tolist(), "values_hex": v.tobytes().hex()} for n, (i, v) in ups.items()} == exp[p]["updates"]
        for n, (idx, vals) in ups.items():  # the updates alone rebuild the result
            flat = old[n].copy()
            flat[idx] = vals
            assert np.array_equal(flat, b[n][1].reshape(-1))
    assert {"all", "bitmap", "delta-u8", "delta-esc"} <= set(exp["p1"]["positions"])
    assert {"raw", "xor", "sub", "raw+planes", "xor+planes", "sub+planes"} <= set(exp["p1"]["values"])


def test_iter_updates_needs_the_base_for_relative_encodings_and_not_for_raw():
    import torch

    from rlsubnet.deltas import DeltaError, DeltaPublisher

    with pytest.raises(DeltaError, match="relative to its base"):
        list(iter_updates(V / "p1.rlspatch"))
    sd = {"w": torch.zeros(1000, dtype=torch.bfloat16)}
    pub = DeltaPublisher(sd, dtype=None, raw_values=True)
    sd["w"][[3, 700]] = 1.0
    ((name, dt, shape, idx, vals),) = list(iter_updates(pub.delta()))
    assert (name, dt, shape) == ("w", "BF16", (1000,)) and idx.tolist() == [3, 700]
    assert vals.tolist() == [0x3F80, 0x3F80]  # bf16 bits of 1.0
