"""Patches (rlsubnet-patch/1) and live delta sync: bit-exact, hash-checked, refusing what does not apply."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rlsubnet.deltas import DeltaError, DeltaPublisher, apply_delta
from rlsubnet.deltas.format import CHUNK, PatchReader, decode_positions
from rlsubnet.deltas.patch import apply, create, info, verify
from rlsubnet.io import InputError

from conftest import bits_view, bump_ulps, run, save_folder


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


def test_live_publisher_and_apply(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 5))
    receiver = {n: p.detach().to(torch.bfloat16).clone() for n, p in model.named_parameters()}
    pub = DeltaPublisher(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(torch.randn(8, 40)).sum().backward()
        opt.step()
        opt.zero_grad()
        payload = pub.delta()
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


def test_in_place_writes_are_undone_when_a_result_fails(monkeypatch):
    """A contiguous target takes its changed entries in place before its result hash is checked. A payload whose
    recorded result for its last tensor is wrong (a sender that hashed the wrong bytes; every blob intact, so
    nothing fails before the writes) must leave the whole target as it was, bit for bit, the tensors written
    before it included; the same payload with the right hash applies exactly."""
    import rlsubnet.deltas.live as live

    g = torch.Generator().manual_seed(0)
    start = {"a": torch.randn(500, generator=g).bfloat16(), "b": torch.randn(40, 30, generator=g).bfloat16(),
             "c": torch.randn(64, generator=g)}
    moved = {k: v.clone() for k, v in start.items()}
    bump_ulps(moved["a"], torch.arange(0, 500, 7), 1)
    bump_ulps(moved["b"], torch.arange(0, 1200, 3), 2)
    moved["c"][::5] += 1.0
    good = DeltaPublisher(dict(start), dtype=None)
    good.model = moved
    payload = good.delta()
    honest = live.sha256_many
    monkeypatch.setattr(live, "sha256_many", lambda arrays: honest(arrays)[:-1] + ["0" * 64])
    bad = DeltaPublisher(dict(start), dtype=None)
    bad.model = moved
    wrong = bad.delta()
    monkeypatch.setattr(live, "sha256_many", honest)
    target = {k: v.clone() for k, v in start.items()}
    with pytest.raises(DeltaError, match="does not reproduce the recorded result"):
        apply_delta(target, wrong)
    assert all(torch.equal(bits_view(target[k]), bits_view(start[k])) for k in start)
    assert apply_delta(target, payload) == sum(int((bits_view(moved[k]) != bits_view(start[k])).sum()) for k in start)
    assert all(torch.equal(bits_view(target[k]), bits_view(moved[k])) for k in start)
