"""Writes the test vectors of FORMAT.md (run from the repository root; the output is checked in).

    python tests/vectors/make_vectors.py

``base.json``, ``step1.json``, ``step2.json``: tensors as ``{"dtype", "shape", "hex"}`` (the raw little-endian
bytes); ``p1.rlspatch`` turns base into step1 and ``p2.rlspatch`` step1 into step2 (a chain, ``rlsubnet-patch/1``);
``p2-mix64.rlspatch`` is p2's change as ``rlsubnet-patch/2`` with mix64 tensor digests;
``expected.json``: for each patch its hashes, and per tensor its changed count, the chunk encodings used and
the updates ``iter_updates`` yields (flat indices, new bits as hex). Every dtype of the format, 0-d and empty
tensors, -0 / NaN / ±inf, every written position encoding (all, bitmap, delta-u8, delta-esc) and every value
encoding (raw, xor, sub, each with and without byte planes) occur.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent / "src"))

from rlsubnet.deltas.format import (  # noqa: E402
    CHUNK,
    Encoder,
    PatchWriter,
    _planes,
    checkpoint_hash,
    digest_keys,
    iter_updates,
    tensor_digest,
)
from rlsubnet.io.dtypes import DTYPES  # noqa: E402

WIDTH = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class Forced(Encoder):
    """Cycles through every value encoding (and byte planes) so that each appears in the vectors."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._cycle = itertools.cycle([("raw", False), ("xor", False), ("sub", False), ("raw", True), ("xor", True), ("sub", True)])

    def values(self, new, old):
        enc, planes = next(self._cycle)
        size = new.dtype.itemsize
        planes = planes and size > 1
        raw = {"raw": new, "xor": new ^ old, "sub": (new - old).astype(new.dtype)}[enc].tobytes()
        c = self.compress(_planes(raw, size) if planes else raw)
        return enc, planes, c, len(raw)


def tensors(rng):
    f = lambda dt, shape: rng.standard_normal(shape).astype(dt)
    out = {
        "bf16.all": (f(np.float32, (4, 16)).view(np.uint32) >> 16).astype(np.uint16),
        "f16.special": np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.5, -2.25, 65504.0], np.float16).view(np.uint16),
        "f32.sparse_gaps": f(np.float32, (3000,)).view(np.uint32),
        "f64.scalar": np.array(3.25, np.float64).reshape(()).view(np.uint64),
        "f8e4m3.codes": rng.integers(0, 256, 64, dtype=np.uint8),
        "f8e5m2.codes": rng.integers(0, 256, 40, dtype=np.uint8),
        "i8": rng.integers(-128, 128, 33, dtype=np.int8).view(np.uint8),
        "u8": rng.integers(0, 256, 33, dtype=np.uint8),
        "i16": rng.integers(-2**15, 2**15, 20, dtype=np.int16).view(np.uint16),
        "u16": rng.integers(0, 2**16, 20, dtype=np.uint16),
        "i32": rng.integers(-2**31, 2**31, 20, dtype=np.int32).view(np.uint32),
        "u32": rng.integers(0, 2**32, 20, dtype=np.uint32),
        "i64": rng.integers(-2**63, 2**63 - 1, 10, dtype=np.int64).view(np.uint64),
        "u64": rng.integers(0, 2**63, 10, dtype=np.uint64),
        "bool": (rng.random(50) < 0.5).astype(np.uint8),
        "empty": np.zeros(0, np.uint32),
        "empty2d": np.zeros((3, 0), np.uint16),
        "bf16.dense_half": (f(np.float32, (1024,)).view(np.uint32) >> 16).astype(np.uint16),
        "bf16.unchanged": (f(np.float32, (7,)).view(np.uint32) >> 16).astype(np.uint16),
    }
    dtypes = {"bf16.all": "BF16", "f16.special": "F16", "f32.sparse_gaps": "F32", "f64.scalar": "F64", "f8e4m3.codes": "F8_E4M3",
              "f8e5m2.codes": "F8_E5M2", "i8": "I8", "u8": "U8", "i16": "I16", "u16": "U16", "i32": "I32", "u32": "U32",
              "i64": "I64", "u64": "U64", "bool": "BOOL", "empty": "F32", "empty2d": "BF16", "bf16.dense_half": "BF16",
              "bf16.unchanged": "BF16"}
    return {k: (dtypes[k], v) for k, v in out.items()}


def step(ts, rng, k):
    out = {}
    for name, (dt, v) in ts.items():
        w = v.copy().reshape(-1)
        n = w.size
        if n == 0 or name == "bf16.unchanged":
            pass
        elif name == "bf16.all":
            w ^= np.uint16(1)  # every entry: positions "all"
        elif name == "f16.special":
            w[[0, 2, 4]] = np.array([-0.0, -np.inf, 1.0], np.float16).view(np.uint16)  # +0 -> -0 is a change of bits
        elif name == "f32.sparse_gaps":
            w[[5, 600, 1500 + k, 2999]] ^= np.uint32(1)  # gaps ≥ 255: delta-esc
        elif name == "bf16.dense_half":
            w[rng.random(n) < 0.5] += np.uint16(1)  # dense: bitmap
        elif name == "bool":
            w[[1, 2, 3]] ^= np.uint8(1)
        else:
            w[rng.choice(n, max(1, n // 4), replace=False)] += w.dtype.type(1 + k)  # small gaps: delta-u8 (wraps for unsigned)
        out[name] = (dt, w.reshape(v.shape))
    return out


def to_json(ts):
    return {n: {"dtype": dt, "shape": list(v.shape), "hex": v.tobytes().hex()} for n, (dt, v) in ts.items()}


def entries(ts, kind="sha256"):
    return [(n, dt, tuple(v.shape), tensor_digest(v.reshape(-1), kind)) for n, (dt, v) in ts.items()]


def write_patch(path, a, b, chunk, digest="sha256"):
    import io

    buf = io.BytesIO()
    w = PatchWriter(buf, level=3, chunk=chunk, digest=digest)
    w.enc = Forced(3)
    for name in sorted(a):
        dt, old = a[name]
        new = b[name][1]
        t = w.begin_tensor(name, dt, old.shape)
        o, nw = old.reshape(-1), new.reshape(-1)
        for s in range(0, o.size, chunk):
            w.chunk_update(t, s, o[s : s + chunk], nw[s : s + chunk])
        t[w.keys[0]] = tensor_digest(old.reshape(-1), digest)
        t[w.keys[1]] = tensor_digest(new.reshape(-1), digest)
    w.add_file("config.json", b'{"model_type": "vectors"}\n')
    h = w.finish(checkpoint_hash(entries(a, digest), digest), checkpoint_hash(entries(b, digest), digest),
                 source={"base": "base.json", "tuned": path.stem})
    path.write_bytes(buf.getvalue())
    return h


def main():
    rng = np.random.default_rng(2026)
    base = tensors(rng)
    s1 = step(base, rng, 0)
    s2 = step(s1, rng, 1)
    expected = {"chunk": 512}
    for name, ts in (("base", base), ("step1", s1), ("step2", s2)):
        (HERE / f"{name}.json").write_text(json.dumps(to_json(ts), indent=1) + "\n")
    for pname, a, b, digest in (("p1", base, s1, "sha256"), ("p2", s1, s2, "sha256"), ("p2-mix64", s1, s2, "mix64")):
        h = write_patch(HERE / f"{pname}.rlspatch", a, b, expected["chunk"], digest)
        old = {n: v.reshape(-1) for n, (_, v) in a.items()}
        ups = {n: {"indices": idx.tolist(), "values_hex": vals.tobytes().hex()}
               for n, _, _, idx, vals in iter_updates(HERE / f"{pname}.rlspatch", old=lambda n, i, o=old: o[n][i])}
        expected[pname] = {"format": h["format"], "digest": digest, "parent": h["parent"], "result": h["result"]["hash"],
                           "digests": {t["name"]: [t[k] for k in digest_keys(h["format"])] for t in h["tensors"]},
                           "changed": {t["name"]: t["changed"] for t in h["tensors"]},
                           "positions": sorted({c["positions"]["enc"] if c["positions"] else "all" for t in h["tensors"] for c in t["chunks"]}),
                           "values": sorted({c["values"]["enc"] + ("+planes" if c["values"]["planes"] else "") for t in h["tensors"] for c in t["chunks"]}),
                           "updates": ups}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print({k: (v["positions"], v["values"]) for k, v in expected.items() if k != "chunk"})


assert CHUNK and DTYPES  # the imports the format relies on
if __name__ == "__main__":
    main()
