"""Patches (rlsubnet-patch/1) and live delta sync: bit-exact, hash-checked, refusing what does not apply."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rlsubnet.deltas import DeltaError, DeltaPublisher, apply_delta
from rlsubnet.deltas.format import CHUNK, PatchReader, checkpoint_hash, decode_positions
from rlsubnet.deltas.patch import apply, create, info, verify
from rlsubnet.io import InputError

from conftest import bits_view, bump_ulps, join_payload, run, save_folder, split_payload


def _model(seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return {"model.embed_tokens.weight": torch.randn(300, 64, generator=g).to(dtype),
            "model.layers.0.mlp.up_proj.weight": torch.randn(64, 64, generator=g).to(dtype),
            "model.layers.0.input_layernorm.weight": torch.ones(64, dtype=dtype),
            "model.layers.0.self_attn.q_proj.bias": torch.zeros(64, dtype=dtype)}


def _step(sd, frac, seed):
    """A copy with about ``frac`` of every tensor's entries moved by ±1-3 ULPs (and a -0 planted)."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in sd.items()}
    for v in out.values():
        n = v.numel()
        idx = torch.randperm(n, generator=g)[: max(1, int(frac * n))]
        bump_ulps(v, idx, int(torch.randint(1, 4, (1,), generator=g)))
    bits_view(out["model.layers.0.self_attn.q_proj.bias"]).view(-1)[7] = -32768  # +0 -> -0: a change in bits
    return out


def _bits(folder):
    return {k: bits_view(v).clone() for k, v in load_file(str(folder / "model.safetensors")).items()}


@pytest.mark.parametrize("frac", [0.001, 0.05, 0.5, 1.0])
def test_patch_roundtrip_bit_exact(tmp_path, frac):
    base = _model()
    tuned = _step(base, frac, 1)
    save_folder(tmp_path / "a", base, config={"model_type": "llama"})
    save_folder(tmp_path / "b", tuned, config={"model_type": "llama", "marker": 1})
    (tmp_path / "b" / "tokenizer_config.json").write_text('{"x": 1}')
    st = create(tmp_path / "a", tmp_path / "b", tmp_path / "p.rlspatch")
    planted = sum(int((bits_view(tuned[k]) != bits_view(base[k])).sum()) for k in base)
    assert st.changed == planted and st.total == (tmp_path / "p.rlspatch").stat().st_size
    apply(tmp_path / "a", [tmp_path / "p.rlspatch"], tmp_path / "out")
    got, want = _bits(tmp_path / "out"), _bits(tmp_path / "b")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["marker"] == 1
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"x": 1}'
    # the base's layout: the same header bytes
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    o = (tmp_path / "out" / "model.safetensors").read_bytes()
    n = int.from_bytes(a[:8], "little")
    assert o[: 8 + n] == a[: 8 + n]
    assert verify(tmp_path / "a", [tmp_path / "p.rlspatch"])["ok"]


def test_sharded_layout_and_chain(tmp_path):
    s0 = _model()
    s1 = _step(s0, 0.01, 1)
    s2 = _step(s1, 0.01, 2)
    for name, sd in (("s0", s0), ("s1", s1), ("s2", s2)):
        save_folder(tmp_path / name, sd, shards=2)
    create(tmp_path / "s0", tmp_path / "s1", tmp_path / "p1")
    create(tmp_path / "s1", tmp_path / "s2", tmp_path / "p2")
    apply(tmp_path / "s0", [tmp_path / "p1", tmp_path / "p2"], tmp_path / "out")
    for f in sorted((tmp_path / "s2").iterdir()):
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes(), f.name
    # out of order: one sentence, exit 2, nothing written
    r = run("patch", "apply", tmp_path / "s0", tmp_path / "p2", tmp_path / "p1", "-o", tmp_path / "bad", "-q")
    assert r.returncode == 2 and "chain out of order" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "bad").exists()


def test_wrong_base_and_corrupt_patch_refused(tmp_path):
    base = _model()
    tuned = _step(base, 0.02, 1)
    other = {k: v.clone() for k, v in base.items()}
    bump_ulps(other["model.layers.0.mlp.up_proj.weight"], torch.tensor([5]), 1)
    save_folder(tmp_path / "a", base)
    save_folder(tmp_path / "b", tuned)
    save_folder(tmp_path / "c", other)
    p = tmp_path / "p.rlspatch"
    assert run("patch", "create", tmp_path / "a", tmp_path / "b", "-o", p, "-q").returncode == 0
    r = run("patch", "apply", tmp_path / "c", p, "-o", tmp_path / "o1", "-q")
    assert r.returncode == 2 and "model.layers.0.mlp.up_proj.weight" in r.stderr and "not this patch's base" in r.stderr
    assert not (tmp_path / "o1").exists()
    assert run("patch", "verify", tmp_path / "a", p, "-q").returncode == 0
    data = p.read_bytes()
    (tmp_path / "trunc").write_bytes(data[: len(data) // 2])
    r = run("patch", "apply", tmp_path / "a", tmp_path / "trunc", "-o", tmp_path / "o2", "-q")
    assert r.returncode == 2 and "corrupt or truncated" in r.stderr and not (tmp_path / "o2").exists()
    # flip a byte inside a compressed block: zstd's checksum or the result hash catches it
    with PatchReader(p) as rd:
        blob = rd.header["tensors"][0]["chunks"][0]["values"]
    bad = bytearray(data)
    bad[blob["off"] + blob["len"] // 2] ^= 0xFF
    (tmp_path / "flip").write_bytes(bytes(bad))
    r = run("patch", "apply", tmp_path / "a", tmp_path / "flip", "-o", tmp_path / "o3", "-q")
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "o3").exists()
    r = run("patch", "info", p, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["changed"] > 0
    # the patch never lands on an input
    r = run("patch", "create", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "a" / "model.safetensors", "-q")
    assert r.returncode == 2 and "refusing" in r.stderr


def test_delta_encodings_beat_plain(tmp_path):
    base = _model()
    tuned = _step(base, 0.01, 3)
    save_folder(tmp_path / "a", base)
    save_folder(tmp_path / "b", tuned)
    st = create(tmp_path / "a", tmp_path / "b", tmp_path / "p")
    assert st.positions + st.values < st.plain
    i = info(tmp_path / "p")
    assert set(i["encodings"]["positions"]) <= {"delta-u8", "delta-esc", "bitmap", "all"}


def test_positions_roundtrip_property():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from rlsubnet.deltas.format import Encoder

    enc = Encoder()

    @settings(max_examples=60, deadline=None)
    @given(st.integers(1, 5000), st.data())
    def check(count, data):
        idx = np.array(sorted(data.draw(st.sets(st.integers(0, count - 1), min_size=1, max_size=count))), np.int64)
        p = enc.positions(idx, count)
        if p is None:
            assert idx.size == count
            return
        import zstandard

        raw = zstandard.ZstdDecompressor().decompress(p[1])
        assert np.array_equal(decode_positions(p[0], raw, count, idx.size), idx)

    check()


@pytest.mark.parametrize("digest", ["mix64", "sha256"])
def test_live_publisher_and_apply(tmp_path, digest):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 5))
    receiver = {n: p.detach().to(torch.bfloat16).clone() for n, p in model.named_parameters()}
    pub = DeltaPublisher(model, digest=digest)
    assert pub.hash.startswith(digest + ":")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(torch.randn(8, 40)).sum().backward()
        opt.step()
        opt.zero_grad()
        payload = pub.delta()
        assert PatchReader(payload).header["format"] == {"mix64": "rlsubnet-patch/2", "sha256": "rlsubnet-patch/1"}[digest]
        apply_delta(receiver, payload)
        for n, p in model.named_parameters():
            assert torch.equal(bits_view(receiver[n]), bits_view(p.detach().to(torch.bfloat16)))
    # a payload applied twice (or to the wrong state) raises and leaves the target unchanged
    before = {k: v.clone() for k, v in receiver.items()}
    with pytest.raises(DeltaError, match="not the state"):
        apply_delta(receiver, payload)
    assert all(torch.equal(before[k], receiver[k]) for k in before)
    with pytest.raises(DeltaError):
        apply_delta(receiver, payload[:-40])
    assert CHUNK % 8 == 0 and isinstance(pub.sizes[-1]["bytes"], int)


@pytest.mark.slow
def test_delta_sync_callback_with_a_trl_trainer(tmp_path):
    """A real TRL trainer publishes after every step to a directory; a receiver applies each step and its
    weights equal the trainer's published view bit for bit."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from rlsubnet.deltas import DirectorySink, receive_directory
    from rlsubnet.training.sync import DeltaSyncCallback

    from tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "m", seed=0, dtype="float32", hidden=32, layers=2, heads=2, inter=64)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    receiver = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    data = Dataset.from_dict({"prompt": [f"Q: {i}+1\nA:" for i in range(16)], "completion": [f" {i + 1}" for i in range(16)]})
    args = SFTConfig(output_dir=str(tmp_path / "t"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                     report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, bf16=False, logging_steps=1)
    sink = DirectorySink(tmp_path / "sync")
    cb = DeltaSyncCallback(sink, every=1)
    seen = []

    class Check(DeltaSyncCallback.__mro__[1]):  # a TrainerCallback that runs after the sync one
        def on_step_end(self, args, state, control, model=None, **kw):
            last = receive_directory(tmp_path / "sync", receiver, after=seen[-1] if seen else -1)
            seen.append(last)
            for (n, p), (_, q) in zip(model.named_parameters(), receiver.named_parameters()):
                assert torch.equal(bits_view(p.detach().to(torch.bfloat16)), bits_view(q.detach())), n

    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[cb, Check()])
    trainer.train()
    assert seen == [1, 2, 3]
    man = json.loads((tmp_path / "sync" / "manifest.json").read_text())
    assert [s["step"] for s in man["steps"]] == [1, 2, 3] and all(s["bytes"] > 0 for s in man["steps"])
    assert cb.records[0]["plain"] > 0


@pytest.mark.slow
def test_distributed_sync_two_processes(tmp_path):
    """Two processes on CPU (gloo): rank 0 trains a tiny model with a TRL trainer and broadcasts each step's
    delta; rank 1 applies it, and after every step its weights equal the trainer's published view."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "m", seed=0, dtype="float32", hidden=32, layers=2, heads=2, inter=64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("dist_sync_worker.py")
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(port), path, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    seen = json.loads((tmp_path / "received.json").read_text())
    assert [s["step"] for s in seen] == [1, 2, 3] and all(s["equal"] for s in seen)


def test_tied_head_stored_by_tuned_only(tmp_path):
    """transformers' own training output can store a tied head copy the base does not: it is omitted (the
    result loads to the same model); any other extra tensor is refused."""
    base = _model()
    tuned = _step(base, 0.01, 4)
    tuned["lm_head.weight"] = tuned["model.embed_tokens.weight"].clone()
    save_folder(tmp_path / "a", base, config={"model_type": "llama", "tie_word_embeddings": True})
    save_folder(tmp_path / "b", tuned, config={"model_type": "llama", "tie_word_embeddings": True})
    create(tmp_path / "a", tmp_path / "b", tmp_path / "p")
    with PatchReader(tmp_path / "p") as r:
        assert [o["name"] for o in r.header["omitted"]] == ["lm_head.weight"]
    apply(tmp_path / "a", [tmp_path / "p"], tmp_path / "out")
    got = _bits(tmp_path / "out")
    assert "lm_head.weight" not in got
    assert torch.equal(got["model.embed_tokens.weight"], bits_view(tuned["model.embed_tokens.weight"]))
    tuned["lm_head.weight"][0, 0] += 1  # no longer a copy: refused
    save_folder(tmp_path / "c", tuned, config={"model_type": "llama", "tie_word_embeddings": True})
    with pytest.raises(InputError, match="same tensors only"):
        create(tmp_path / "a", tmp_path / "c", tmp_path / "p2")


def test_corrupted_payloads_fail_cleanly_and_leave_the_target_unchanged():
    """Fuzz: truncations and byte flips anywhere in a payload give DeltaError (or, where the flip is in
    bytes nothing reads, the exact result), never another exception, and never a half-updated target."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    g = torch.Generator().manual_seed(0)
    start = {"a": torch.randn(500, generator=g).bfloat16(), "b": torch.randn(40, 30, generator=g).bfloat16()}
    moved = {k: v.clone() for k, v in start.items()}
    bump_ulps(moved["a"], torch.arange(0, 500, 7), 1)
    bump_ulps(moved["b"], torch.arange(0, 1200, 3), 2)
    pub = DeltaPublisher(dict(start), dtype=None)
    pub.model = moved
    payload = pub.delta()

    @settings(max_examples=150, deadline=None)
    @given(st.integers(0, len(payload) - 1), st.integers(1, 255), st.booleans())
    def check(pos, xor, truncate):
        bad = payload[:pos] if truncate else payload[:pos] + bytes([payload[pos] ^ xor]) + payload[pos + 1 :]
        target = {k: v.clone() for k, v in start.items()}
        try:
            apply_delta(target, bad)
        except DeltaError:
            assert all(torch.equal(target[k], start[k]) for k in start)
            return
        assert all(torch.equal(bits_view(target[k]), bits_view(moved[k])) for k in start)

    check()


def test_receiver_digest_cache_never_hides_a_missed_or_foreign_write():
    """The receiver skips re-hashing unchanged tensors it verified before (torch's version counter); any in-place
    write since then is seen, and recheck=True rehashes everything (for writes through .data)."""
    src = {"a": torch.zeros(64, dtype=torch.bfloat16), "b": torch.zeros(64, dtype=torch.bfloat16)}
    target = {k: v.clone() for k, v in src.items()}
    pub = DeltaPublisher(src, dtype=None)
    src["a"][1] = 1.0
    p1 = pub.delta()
    src["a"][2] = 1.0
    p2 = pub.delta()
    assert apply_delta(target, p1) == 1
    with pytest.raises(DeltaError, match="applied twice"):
        apply_delta(target, p1)
    target["b"][5] = 3.0  # a foreign in-place write to a tensor p2 leaves unchanged: the version counter sees it
    with pytest.raises(DeltaError, match="not the state"):
        apply_delta(target, p2)
    target["b"][5] = 0.0
    target["b"].data[6] = 2.0  # through .data: not counted ...
    with pytest.raises(DeltaError, match="not the state"):
        apply_delta(target, p2, recheck=True)  # ... recheck=True hashes again
    target["b"].data[6] = 0.0
    assert apply_delta(target, p2, recheck=True) == 1 and torch.equal(target["a"], src["a"])


@pytest.mark.parametrize("workers", [2, None])
def test_parallel_patch_create_writes_the_same_bytes(tmp_path, workers):
    """Issue 19: tensors encoded and hashed in worker processes, written in the sequential order: the patch is
    byte-for-byte the one a single process writes, for multi-chunk, empty, 0-d and unchanged tensors."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    base = {"big": rng.standard_normal(5000).astype(np.float32), "mat": rng.standard_normal((30, 40)).astype(np.float16),
            "empty": np.zeros((0, 4), np.float32), "scalar": np.array(1.5, np.float32), "same": np.arange(100, dtype=np.int64)}
    tuned = {k: v.copy() for k, v in base.items()}
    tuned["big"][rng.choice(5000, 700, replace=False)] += 1
    tuned["mat"][3, 5:9] = 0
    tuned["scalar"] = np.array(-1.5, np.float32)
    for name, sd in (("base", base), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        save_file(sd, str(tmp_path / name / "model.safetensors"))
    one = create(tmp_path / "base", tmp_path / "tuned", tmp_path / "one.rlpatch", chunk=512)
    many = create(tmp_path / "base", tmp_path / "tuned", tmp_path / "many.rlpatch", chunk=512, workers=workers)
    assert (tmp_path / "one.rlpatch").read_bytes() == (tmp_path / "many.rlpatch").read_bytes()
    assert one.changed == many.changed == 700 + 4 + 1
    apply(tmp_path / "base", [tmp_path / "many.rlpatch"], tmp_path / "applied")
    from safetensors.numpy import load_file as load_np

    got, want = load_np(str(tmp_path / "applied" / "model.safetensors")), load_np(str(tmp_path / "tuned" / "model.safetensors"))
    assert got.keys() == want.keys() and all(got[k].tobytes() == want[k].tobytes() and got[k].shape == want[k].shape for k in want)


@pytest.mark.parametrize("digest", ["sha256", "mix64"])
def test_in_place_writes_are_undone_when_a_result_fails(digest):
    """A contiguous target takes its changed entries in place. A payload whose recorded result for its last tensor
    is wrong (a sender that hashed the wrong bytes; every blob intact, so nothing fails on reading) must leave the
    whole target as it was, bit for bit, the tensors written before it included: with sha256 the writes come
    first and are undone, with mix64 the result is checked before any write. The same payload with the right
    digest applies exactly."""
    g = torch.Generator().manual_seed(0)
    start = {"a": torch.randn(500, generator=g).bfloat16(), "b": torch.randn(40, 30, generator=g).bfloat16(),
             "c": torch.randn(64, generator=g)}
    moved = {k: v.clone() for k, v in start.items()}
    bump_ulps(moved["a"], torch.arange(0, 500, 7), 1)
    bump_ulps(moved["b"], torch.arange(0, 1200, 3), 2)
    moved["c"][::5] += 1.0
    good = DeltaPublisher(dict(start), dtype=None, digest=digest)
    good.model = moved
    payload = good.delta()
    blobs, h = split_payload(payload)  # a sender that hashed the wrong bytes for the last tensor: header consistent
    keys = ("base_sha256", "result_sha256") if digest == "sha256" else ("base_digest", "result_digest")
    h["tensors"][-1][keys[1]] = "0" * len(h["tensors"][-1][keys[1]])
    h["result"]["hash"] = checkpoint_hash([(t["name"], t["dtype"], tuple(t["shape"]), t[keys[1]]) for t in h["tensors"]], digest)
    wrong = join_payload(blobs, h)
    assert PatchReader(wrong).header["format"] == ("rlsubnet-patch/1" if digest == "sha256" else "rlsubnet-patch/2")
    target = {k: v.clone() for k, v in start.items()}
    with pytest.raises(DeltaError, match="does not reproduce the recorded result"):
        apply_delta(target, wrong)
    assert all(torch.equal(bits_view(target[k]), bits_view(start[k])) for k in start)
    assert apply_delta(target, payload) == sum(int((bits_view(moved[k]) != bits_view(start[k])).sum()) for k in start)
    assert all(torch.equal(bits_view(target[k]), bits_view(moved[k])) for k in start)


M64 = (1 << 64) - 1


def mix64_by_hand(bits, start=0) -> int:
    """FORMAT.md §6's mix64 in Python integers, entry by entry."""
    total = 0
    for i, b in enumerate(int(x) for x in bits):
        x = b ^ (((start + i) * 0x9E3779B97F4A7C15) & M64)
        x ^= x >> 33
        x = (x * 0xFF51AFD7ED558CCD) & M64
        x ^= x >> 33
        x = (x * 0xC4CEB9FE1A85EC53) & M64
        total += x ^ (x >> 33)
    return total & M64


def test_mix64_is_the_sum_the_format_defines_and_follows_a_change():
    """The vectorised digest equals the per-entry definition for every width (blocks of 2^14 entries crossed); the
    update from the changed entries alone equals the digest recomputed whole; fed in pieces it is the same."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from rlsubnet.deltas.format import TensorHasher, mix64, mix64_update

    @settings(max_examples=40, deadline=None)
    @given(st.sampled_from([np.uint8, np.uint16, np.uint32, np.uint64]), st.integers(0, 40_000), st.integers(0, 2**40),
           st.data())
    def check(dt, n, start, data):
        rng = np.random.default_rng(n)
        a = rng.integers(0, np.iinfo(dt).max, n, dtype=dt, endpoint=True)
        assert mix64(a) == mix64_by_hand(a) and mix64(a[:7], start) == mix64_by_hand(a[:7], start)
        if n == 0:
            return
        idx = np.unique(rng.integers(0, n, data.draw(st.integers(1, 50))))
        b = a.copy()
        b[idx] = rng.integers(0, np.iinfo(dt).max, idx.size, dtype=dt, endpoint=True)
        assert int(mix64_update(f"{mix64(a):016x}", idx, a[idx], b[idx]), 16) == mix64(b)
        h = TensorHasher("mix64", a.itemsize)
        cut = data.draw(st.integers(0, n))
        h.update(b[:cut].data)
        h.update(b[cut:].data)
        assert int(h.hexdigest(), 16) == mix64(b)

    check()


def test_live_sync_steady_state_hashes_nothing_whole(monkeypatch):
    """Cost grows with the change: after the first step, neither the publisher nor the receiver digests a whole
    tensor (mix64 follows each change); the receiver still catches a base that differs where a payload writes,
    even through ``.data`` (which the version counter misses), and leaves the target unchanged."""
    import rlsubnet.deltas.live as live

    g = torch.Generator().manual_seed(0)
    model = {f"w{i}": torch.randn(3000, generator=g) for i in range(4)}
    pub = DeltaPublisher(model)
    target = {k: v.to(torch.bfloat16) for k, v in model.items()}
    model["w0"][::50] *= 1.5
    apply_delta(target, pub.delta())  # first step: the receiver hashes what it has never seen
    whole = []
    real = live.tensor_digest
    monkeypatch.setattr(live, "tensor_digest", lambda *a: (whole.append(1), real(*a))[1])
    for k in range(3):
        for t in model.values():
            t[k::30] *= 1.01 + k / 100
        apply_delta(target, pub.delta())
        assert all(torch.equal(bits_view(target[n]), bits_view(model[n].bfloat16())) for n in model)
    assert whole == []
    model["w1"][7] += 1.0  # the next payload writes entry 7 of w1 ...
    p = pub.delta()
    target["w1"].data[7] = 5.0  # ... whose base the receiver no longer holds, written behind the version counter
    before = {n: v.clone() for n, v in target.items()}
    with pytest.raises(DeltaError, match="does not reproduce the recorded result"):
        apply_delta(target, p)
    assert all(torch.equal(bits_view(before[n]), bits_view(target[n])) for n in target) and whole == []


def test_a_chain_of_live_payloads_applies_to_files_like_patches(tmp_path):
    """A live chain (rlsubnet-patch/2, mix64) saved to disk is a patch chain: ``patch apply`` turns the base files
    into the last step's files bit for bit, the result hash it reports is the publisher's, and ``patch verify``
    fails where a step's tensor is not what it records."""
    s0 = _model()
    live = {k: v.clone() for k, v in s0.items()}
    pub = DeltaPublisher(live, dtype=None)
    paths = []
    for k in range(2):
        for n, v in _step(live, 0.01, k + 1).items():
            live[n].copy_(v)
        paths.append(tmp_path / f"step{k}.rlspatch")
        paths[-1].write_bytes(pub.delta())
    save_folder(tmp_path / "s0", s0, shards=2)
    save_folder(tmp_path / "s2", live, shards=2)
    assert info(paths[0])["format"] == "rlsubnet-patch/2" and info(paths[0])["digest"] == "mix64"
    res = apply(tmp_path / "s0", paths, tmp_path / "out")
    assert res["result"] == pub.hash and res["result"].startswith("mix64:")
    for f in sorted((tmp_path / "s2").glob("*.safetensors")):
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes(), f.name
    assert verify(tmp_path / "s0", paths)["ok"]
    blobs, h = split_payload(paths[1].read_bytes())
    t = next(t for t in h["tensors"] if t["chunks"])
    t["result_digest"] = f"{(int(t['result_digest'], 16) + 1) % 2**64:016x}"
    h["result"]["hash"] = checkpoint_hash([(x["name"], x["dtype"], tuple(x["shape"]), x["result_digest"]) for x in h["tensors"]], "mix64")
    (tmp_path / "lie.rlspatch").write_bytes(join_payload(blobs, h))
    v = verify(tmp_path / "s0", [paths[0], tmp_path / "lie.rlspatch"])
    assert not v["ok"] and v["mismatched"] == [f"{tmp_path / 'lie.rlspatch'}: {t['name']}"]


def test_in_place_writes_land_in_every_dtype_and_bump_the_version():
    """The receiver writes changed entries through a numpy view of a CPU tensor's storage: the write lands for every
    dtype (bool, whose raw view is a converted copy, takes torch's indexed assignment), bumps torch's version
    counter as an in-place op does, and a foreign write after it is still seen."""
    src = {"f": torch.zeros(64, dtype=torch.bfloat16), "b": torch.zeros(64, dtype=torch.bool),
           "i": torch.zeros(8, 8, dtype=torch.int32), "d": torch.zeros(16, dtype=torch.float64)}
    target = {k: v.clone() for k, v in src.items()}
    pub = DeltaPublisher(src, dtype=None)
    src["f"][[1, 40]] = 2.5
    src["b"][[0, 63]] = True
    src["i"][3, 4] = -7
    src["d"][5] = -0.0
    versions = {k: v._version for k, v in target.items()}
    assert apply_delta(target, pub.delta()) == 6
    assert all(torch.equal(bits_view(target[k]) if k != "b" else target[k], bits_view(src[k]) if k != "b" else src[k]) for k in src)
    assert all(target[k]._version > versions[k] for k in target)
    src["f"][2] = 1.0
    p = pub.delta()
    target["f"][9] = 3.0  # in place, after the receiver's own write: the version counter sees it
    with pytest.raises(DeltaError, match="not the state"):
        apply_delta(target, p)


def test_tracker_counts_zero_sign_flips_apart_from_changes(tmp_path):
    """A delta payload is bit-exact: a zero whose sign flipped (+0 -> -0, the same value) is sent, but not counted as
    changed. Planted: 3 zeros flipped and 5 values moved in a bf16 tensor; the record says 5 changed, 8 sent, and the
    bytes are those of the patch between the two checkpoints (which carries the 8 too)."""
    from rlsubnet.training.tracking import SparsityTracker

    w = torch.linspace(-1, 1, 64, dtype=torch.float32).reshape(8, 8).to(torch.bfloat16)
    w.view(-1)[[3, 17, 40]] = 0.0
    base = save_folder(tmp_path / "base", {"w": w.clone()})
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(w.float())
    tr = SparsityTracker(base, model=model)
    with torch.no_grad():
        model.w.view(-1)[[3, 17, 40]] = -0.0
        model.w.view(-1)[[0, 5, 9, 60, 63]] += 0.25
    rec = tr.record(model, 1)
    assert rec["changed_vs_prev"] == 5 and rec["changed_vs_init"] == 5 and rec["delta_entries"] == 8
    tuned = save_folder(tmp_path / "tuned", {"w": model.w.detach().to(torch.bfloat16)})
    st = create(base, tuned, tmp_path / "p")
    assert st.changed == 8 and rec["delta_plain_bytes"] == st.plain and rec["delta_stream_bytes"] == st.positions + st.values
