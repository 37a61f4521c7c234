"""The diff engine against planted truth and a brute-force reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from fractions import Fraction

import numpy as np
import pytest
import torch

import rlsubnet
from rlsubnet.analysis.engine import Job, map_chunks
from rlsubnet.analysis.probes import ULP_LABELS
from rlsubnet.io import InputError, open_checkpoint
from rlsubnet.masks import Subnetwork
from rlsubnet.masks.verify import verify_frozen

from conftest import bump_ulps, clean_error, reference_counts, run, save_folder, small_lm, strict_json

TOLS = [0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4]


def planted_pair(dtype, seed=0):
    """Base tensors and a tuned copy with a known number of changed elements per tensor."""
    g = torch.Generator().manual_seed(seed)
    names = {
        "model.embed_tokens.weight": (50, 16),
        "model.layers.0.self_attn.q_proj.weight": (16, 16),
        "model.layers.0.mlp.down_proj.weight": (16, 40),
        "model.layers.1.input_layernorm.weight": (16,),
        "lm_head.weight": (50, 16),
    }
    base = {n: (torch.randn(s, generator=g) * 0.05).to(dtype) for n, s in names.items()}
    tuned = {n: t.clone() for n, t in base.items()}
    planted = {}
    for i, (n, t) in enumerate(tuned.items()):
        k = [7, 0, 33, 3, 11][i]
        idx = torch.randperm(t.numel(), generator=g)[:k]
        bump_ulps(t, idx, 1 + (i % 3))
        planted[n] = k
    return base, tuned, planted


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_planted_counts_exact(tmp_path, dtype):
    base, tuned, planted = planted_pair(dtype)
    # ±0 swaps are not changes
    base["model.layers.0.self_attn.q_proj.weight"].view(-1)[0] = 0.0
    tuned["model.layers.0.self_attn.q_proj.weight"].view(-1)[0] = -0.0
    save_folder(tmp_path / "a", base)
    save_folder(tmp_path / "b", tuned)
    r = rlsubnet.diff(tmp_path / "a", tmp_path / "b")
    got = {t.name: t.changed for t in r.tensors}
    assert got == planted
    assert r.changed == sum(planted.values())
    assert r.numel == sum(t.numel() for t in base.values())
    assert r.sparsity == pytest.approx(1 - r.changed / r.numel)
    assert r.skipped == []
    for t in r.tensors:
        a, b = base[t.name], tuned[t.name]
        ch, atol, rel = reference_counts(a, b, TOLS)
        assert t.changed == ch
        assert [x["changed"] for x in t.atol] == atol
        assert t.bf16_rel_changed == rel
        assert sum(t.ulp_hist.values()) == t.numel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_random_pairs_match_brute_force(tmp_path, dtype, rng):
    g = torch.Generator().manual_seed(7)
    base = {f"model.layers.{i}.mlp.up_proj.weight": (torch.randn(37, 29, generator=g) * 10.0 ** (-i)).to(dtype) for i in range(4)}
    tuned = {}
    for n, t in base.items():
        noise = torch.randn(t.shape, generator=g) * torch.rand(t.shape, generator=g) ** 4 * 1e-3
        keep = torch.rand(t.shape, generator=g) < 0.7
        tuned[n] = torch.where(keep, t, (t.double() + noise).to(dtype))
    save_folder(tmp_path / "a", base)
    save_folder(tmp_path / "b", tuned, shards=2)
    for chunk, workers in [(1 << 20, 1), (64, 2), (8, 3)]:
        r = rlsubnet.diff(tmp_path / "a", tmp_path / "b", chunk=chunk, workers=workers)
        tot_ch, tot_atol, tot_rel = 0, np.zeros(len(TOLS), int), 0
        for t in r.tensors:
            ch, atol, rel = reference_counts(base[t.name], tuned[t.name], TOLS)
            assert (t.changed, [x["changed"] for x in t.atol], t.bf16_rel_changed) == (ch, atol, rel)
            d = (tuned[t.name].double() - base[t.name].double()).abs()
            assert t.max_abs_delta == pytest.approx(d.max().item(), rel=1e-12)
            assert t.l2_delta == pytest.approx(d.norm().item(), rel=1e-9)
            assert t.l2_base == pytest.approx(base[t.name].double().norm().item(), rel=1e-5)
            tot_ch += ch
            tot_atol += atol
            tot_rel += rel
        assert r.changed == tot_ch
        assert [a["changed"] for a in r.atol] == tot_atol.tolist()
        assert r.bf16_rel_changed == tot_rel


def test_ulp_histogram_buckets(tmp_path):
    base = torch.full((100,), 1.5, dtype=torch.bfloat16)  # one binade: ULP 2^-7
    tuned = base.clone()
    bump_ulps(tuned, torch.arange(0, 10), 1)
    bump_ulps(tuned, torch.arange(10, 15), 2)
    bump_ulps(tuned, torch.arange(15, 18), 4)
    bump_ulps(tuned, torch.arange(18, 19), 300)
    save_folder(tmp_path / "a", {"w": base})
    save_folder(tmp_path / "b", {"w": tuned})
    h = rlsubnet.diff(tmp_path / "a", tmp_path / "b").ulp_hist
    assert h["0"] == 81 and h["1"] == 10 and h["2"] == 5 and h["3-4"] == 3 and h[">256"] == 1
    assert list(h) == ULP_LABELS


def test_tolerance_ties_are_exact(tmp_path):
    """|Δ| that rounds to exactly the tolerance in float64 is settled by exact arithmetic."""
    # fl(1e-5 - (±1e-30)) == 1e-5, but the exact difference lies just below or just above it
    a_vals = [1e-30, -1e-30, 2e-31, -3e-29, 0.5e-30]
    b_vals = [1e-5] * len(a_vals)
    assert all(b - a == 1e-5 for a, b in zip(a_vals, b_vals))
    A = torch.tensor(a_vals, dtype=torch.float64)
    B = torch.tensor(b_vals, dtype=torch.float64)
    save_folder(tmp_path / "a", {"w": A})
    save_folder(tmp_path / "b", {"w": B})
    r = rlsubnet.diff(tmp_path / "a", tmp_path / "b", atol=[1e-5])
    truth = sum(abs(Fraction(b) - Fraction(a)) > Fraction(1e-5) for a, b in zip(a_vals, b_vals))
    assert truth == 2
    assert r.atol[0]["changed"] == truth


def test_nan_payloads_and_inf(tmp_path):
    base = torch.tensor([1.0, float("nan"), float("inf"), 0.0, 2.0], dtype=torch.float32)
    tuned = base.clone()
    bits = tuned.view(torch.int32)
    bits[1] += 1  # another NaN payload: a change
    save_folder(tmp_path / "a", {"w": base})
    save_folder(tmp_path / "b", {"w": tuned})
    r = rlsubnet.diff(tmp_path / "a", tmp_path / "b")
    assert r.changed == 1
    assert all(a["changed"] == 1 for a in r.atol)
    assert r.ulp_hist["non-finite"] == 1


def test_formats_agree(tmp_path):
    base, tuned, planted = planted_pair(torch.bfloat16)
    total = sum(planted.values())
    save_folder(tmp_path / "st_a", base)
    save_folder(tmp_path / "st_b", tuned)
    save_folder(tmp_path / "sh_b", tuned, shards=3)
    save_folder(tmp_path / "bin_a", base, fmt="bin")
    save_folder(tmp_path / "binsh_b", tuned, fmt="bin", shards=2)
    for a, b in [("st_a", "sh_b"), ("bin_a", "st_b"), ("bin_a", "binsh_b"), ("st_a/model.safetensors", "sh_b/model.safetensors.index.json")]:
        r = rlsubnet.diff(tmp_path / a, tmp_path / b)
        assert r.changed == total, (a, b)


def test_hf_cache_reference(tmp_path):
    base, tuned, planted = planted_pair(torch.float16)
    cache = tmp_path / "hub"
    for name, sd in [("base", base), ("tuned", tuned)]:
        repo = cache / f"models--org--{name}"
        save_folder(repo / "snapshots" / "abc123", sd)
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("abc123")
    r = rlsubnet.diff("org/base", "org/tuned", cache_dir=str(cache))
    assert r.changed == sum(planted.values())
    with pytest.raises(InputError, match="not in the Hugging Face cache"):
        rlsubnet.diff("org/missing", "org/tuned", cache_dir=str(cache))


def test_tied_embeddings_counted_once(tmp_path):
    base, tuned, planted = planted_pair(torch.bfloat16)
    for sd in (base, tuned):
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_folder(tmp_path / "a", base, config={"tie_word_embeddings": True})
    save_folder(tmp_path / "b", tuned, config={"tie_word_embeddings": True})
    r = rlsubnet.diff(tmp_path / "a", tmp_path / "b")
    assert "lm_head.weight" not in {t.name for t in r.tensors}
    assert any(s["name"] == "lm_head.weight" and "tied" in s["reason"] for s in r.skipped)
    assert r.changed == sum(v for k, v in planted.items() if k != "lm_head.weight")
    # .bin with shared storage (how torch saves tied weights)
    for name, sd in (("c", base), ("d", tuned)):
        sd = dict(sd)
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        save_folder(tmp_path / name, sd, fmt="bin")
    r = rlsubnet.diff(tmp_path / "c", tmp_path / "d")
    assert any(s["name"] == "lm_head.weight" and "tied" in s["reason"] for s in r.skipped)


def test_resized_vocab_common_slice(tmp_path):
    base, tuned, planted = planted_pair(torch.bfloat16)
    emb = "model.embed_tokens.weight"
    tuned[emb] = torch.cat([base[emb].clone(), torch.ones(8, 16, dtype=torch.bfloat16)])
    bump_ulps(tuned[emb], torch.tensor([0, 5, 17]), 1)  # in the shared rows
    save_folder(tmp_path / "a", base)
    save_folder(tmp_path / "b", tuned)
    r = rlsubnet.diff(tmp_path / "a", tmp_path / "b")
    assert emb not in {t.name for t in r.tensors}
    assert any(s["name"] == emb and "shape mismatch" in s["reason"] for s in r.skipped)
    r = rlsubnet.diff(tmp_path / "a", tmp_path / "b", common_slice=True)
    e = next(t for t in r.tensors if t.name == emb)
    assert e.numel == 50 * 16 and e.changed == 3 and e.sliced


def test_mixed_dtypes_widen_exactly(tmp_path):
    base, _, _ = planted_pair(torch.bfloat16)
    tuned = {n: t.float() for n, t in base.items()}
    w = tuned["model.layers.0.mlp.down_proj.weight"].view(-1)
    w[:9] += 1e-6  # below a bf16 ULP, representable in fp32
    save_folder(tmp_path / "a", base)
    save_folder(tmp_path / "b", tuned)
    r = rlsubnet.diff(tmp_path / "a", tmp_path / "b")
    assert r.changed == 9
    assert any("widening" in n for n in r.notes)


def test_paper_layerwise_mean_and_groups(tmp_path):
    base, tuned, planted = planted_pair(torch.float32)
    save_folder(tmp_path / "a", base)
    save_folder(tmp_path / "b", tuned)
    r = rlsubnet.diff(tmp_path / "a", tmp_path / "b")
    layer_dens = [planted[n] / base[n].numel() for n in base if n.startswith("model.layers.")]
    assert r.paper_layerwise_density == pytest.approx(np.mean(layer_dens))
    mods = {g.key: g.changed for g in r.by_module}
    assert mods["down"] == 33 and mods["head"] == 11 and mods["norm"] == 3 and mods["embedding"] == 7
    layers = {g.key: g.changed for g in r.by_layer}
    assert layers == {"0": 33, "1": 3, "-": 18}


def test_json_contract(tmp_path):
    base, tuned, planted = planted_pair(torch.bfloat16)
    save_folder(tmp_path / "a", base)
    save_folder(tmp_path / "b", tuned)
    d = json.loads(rlsubnet.diff(tmp_path / "a", tmp_path / "b", atol=[1e-5, 0]).to_json())
    assert set(d) >= {"base", "tuned", "summary", "tensors", "skipped"}
    s = d["summary"]
    assert isinstance(s["numel"], int) and isinstance(s["changed"], int)
    assert s["sparsity"] == 1 - s["changed"] / s["numel"]
    assert [a["atol"] for a in s["atol"]] == [1e-5, 0.0]
    assert set(s["atol"][0]) >= {"atol", "changed", "sparsity"}
    assert set(s["bf16_rel"]) >= {"eta", "changed", "sparsity"} and s["bf16_rel"]["eta"] == 1e-3
    for t in d["tensors"]:
        assert set(t) >= {"name", "shape", "dtype", "numel", "changed", "atol"}
        assert set(t["atol"][0]) >= {"atol", "changed"}
    assert d["tensors"][0]["dtype"] == "bfloat16"


def test_tied_on_one_side_untied_on_the_other(tmp_path):
    """Defect: a head tied on one side and untied on the other was skipped as "counted once": 0 changed."""
    base = small_lm()
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["lm_head.weight"] = base["model.embed_tokens.weight"].clone()
    bump_ulps(tuned["lm_head.weight"], torch.arange(6), 1)  # the untied head moved in 6 entries
    save_folder(tmp_path / "a", base, config={"model_type": "llama", "tie_word_embeddings": True})
    save_folder(tmp_path / "b", tuned, config={"model_type": "llama", "tie_word_embeddings": False})
    r = rlsubnet.diff(tmp_path / "a", tmp_path / "b")
    assert r.changed == 6
    assert any("lm_head" in n for n in r.notes)
    # and verify-frozen sees the frozen head entries that moved
    mask = Subnetwork.full({t.name: tuple(t.shape) for t in r.tensors}, value=False)
    mask.save(tmp_path / "none.safetensors")
    v = verify_frozen(tmp_path / "a", tmp_path / "b", tmp_path / "none.safetensors")
    assert v.frozen_moved == 6 and not v.ok


def test_config_says_tied_but_stored_head_differs(tmp_path):
    """Defect: config says tied while the stored head differs from the embedding: head skipped."""
    base = small_lm()
    base["lm_head.weight"] = base["model.embed_tokens.weight"].clone()
    bump_ulps(base["lm_head.weight"], torch.arange(3), 2)  # not actually tied
    tuned = {k: v.clone() for k, v in base.items()}
    bump_ulps(tuned["lm_head.weight"], torch.arange(10, 14), 1)
    for n, sd in (("a", base), ("b", tuned)):
        save_folder(tmp_path / n, sd, config={"model_type": "llama", "tie_word_embeddings": True})
    r = rlsubnet.diff(tmp_path / "a", tmp_path / "b")
    assert r.changed == 4 and "lm_head.weight" in {t.name for t in r.tensors}


def test_gpt2_default_tie_counts_head_once(tmp_path):
    """Defect: a GPT-2 config without `tie_word_embeddings` (tied by default) storing a head copy was
    double-counted."""
    g = torch.Generator().manual_seed(1)
    base = {"transformer.wte.weight": torch.randn(20, 8, generator=g).bfloat16(),
            "transformer.h.0.mlp.c_fc.weight": torch.randn(8, 8, generator=g).bfloat16()}
    tuned = {k: v.clone() for k, v in base.items()}
    bump_ulps(tuned["transformer.wte.weight"], torch.arange(5), 1)
    base["lm_head.weight"] = base["transformer.wte.weight"].clone()
    tuned["lm_head.weight"] = tuned["transformer.wte.weight"].clone()
    for n, sd in (("a", base), ("b", tuned)):
        save_folder(tmp_path / n, sd, config={"model_type": "gpt2"})
    r = rlsubnet.diff(tmp_path / "a", tmp_path / "b")
    assert r.changed == 5 and r.numel == 20 * 8 + 64
    assert any(s["name"] == "lm_head.weight" and "counted once" in s["reason"] for s in r.skipped)


def test_buffers_reported_apart(tmp_path):
    """Defect: stored buffers (attn.bias, masked_bias, inv_freq) were counted as parameters."""
    g = torch.Generator().manual_seed(2)
    sd = {"transformer.h.0.attn.c_attn.weight": torch.randn(8, 24, generator=g),
          "transformer.h.0.attn.c_attn.bias": torch.zeros(24),
          "transformer.h.0.attn.bias": torch.tril(torch.ones(1, 1, 16, 16)),
          "transformer.h.0.attn.masked_bias": torch.tensor(-1e4),
          "model.layers.0.self_attn.rotary_emb.inv_freq": torch.rand(4, generator=g)}
    tuned = {k: v.clone() for k, v in sd.items()}
    tuned["transformer.h.0.attn.c_attn.weight"][0, :3] += 1
    save_folder(tmp_path / "a", sd)
    save_folder(tmp_path / "b", tuned)
    r = rlsubnet.diff(tmp_path / "a", tmp_path / "b")
    assert r.numel == 8 * 24 + 24 and r.changed == 3
    assert {b.name for b in r.buffers} == {"transformer.h.0.attn.bias", "transformer.h.0.attn.masked_bias",
                                           "model.layers.0.self_attn.rotary_emb.inv_freq"}
    assert json.loads(r.to_json())["buffers"][0]["numel"] > 0


def test_atol_sparsity_names_the_missing_tolerance(pair):
    """Defect: `DiffResult.atol_sparsity(tol)` raised a bare KeyError for a tolerance not computed."""
    r = rlsubnet.diff(*pair, atol=[0, 1e-5])
    with pytest.raises(ValueError, match="was not computed"):
        r.atol_sparsity(1e-3)


def test_workers_validated_and_capped(pair):
    """Defect: `--workers 1000` forked 1000 processes for 3 tensors; `--workers -1` was accepted."""

    a, b = pair
    clean_error(run("diff", a, b, "--workers", "-1"), "--workers")
    clean_error(run("mask", a, b, "-o", a.parent / "m.safetensors", "--workers", "0"), "--workers")
    with open_checkpoint(a) as ck:
        jobs = [Job(n, [(ck, n)], ck.tensors[n].numel) for n in ck.tensors]
        pids = {res[0] for _, res in map_chunks(jobs, lambda job, s, raws: os.getpid(), workers=1000, progress=False)}
    assert 1 <= len(pids) <= 3


WORKER_SCRIPT = r"""
import os, sys, time
from rlsubnet.io import open_checkpoint
from rlsubnet.analysis.engine import Job, map_chunks
ck = open_checkpoint(sys.argv[1])
jobs = [Job(n, [(ck, n)], ck.tensors[n].numel) for n in ck.tensors]
def slow(job, start, raws):
    if job.name.endswith("1.self_attn.v_proj.weight"):
        raise RuntimeError("boom")
    time.sleep(600)
print("started", flush=True)
for _ in map_chunks(jobs, slow, workers=2, progress=False):
    pass
"""


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _wait_gone(pids, timeout=30.0) -> bool:
    import psutil

    t0 = time.time()
    while time.time() - t0 < timeout:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.2)
    return False


def test_workers_die_with_their_parent(pair, tmp_path):
    """Defect: when only the parent was killed (SIGKILL, e.g. by the OOM killer), forked workers lived on."""
    a, _ = pair
    script = WORKER_SCRIPT.replace('raise RuntimeError("boom")', "time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", script, str(a)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "started"
    t0 = time.time()
    while len(_children(p.pid)) < 2 and time.time() - t0 < 30:
        time.sleep(0.2)
    kids = _children(p.pid)
    assert len(kids) >= 2
    p.kill()
    p.wait()
    assert _wait_gone(kids), "workers outlived their parent"


def test_first_error_cancels_pending_work(pair):
    """Defect: pending work was not cancelled on the first error (the pool waited for every sleeping job)."""
    a, _ = pair
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", WORKER_SCRIPT, str(a)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "boom" in r.stderr
    assert time.time() - t0 < 60


def test_rank_with_nonfinite_update(tmp_path):
    """Defect: `rank` on an update with NaN/Inf gave a traceback."""
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(6, 6, generator=g),
            "model.layers.0.mlp.down_proj.weight": torch.randn(6, 6, generator=g)}
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")
    tuned["model.layers.0.mlp.down_proj.weight"][0, 0] += 1
    save_folder(tmp_path / "a", base)
    save_folder(tmp_path / "b", tuned)
    r = run("rank", tmp_path / "a", tmp_path / "b", "--json", "-", "-q")
    assert r.returncode == 0, r.stderr
    d = strict_json(r.stdout)
    assert [m["name"] for m in d["matrices"]] == ["model.layers.0.mlp.down_proj.weight"]
    assert any("non-finite" in e for e in d["excluded"])
