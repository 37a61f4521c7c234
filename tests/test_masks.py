"""Masks, overlap, closeness and rank against brute-force truth."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import rlsubnet
from rlsubnet.io import InputError
from rlsubnet.masks import Subnetwork, closeness, overlap, overlap_stats
from rlsubnet.masks.verify import verify_frozen as changes_by_mask

from conftest import bump_ulps, save_folder

SHAPES = {"model.layers.0.self_attn.q_proj.weight": (13, 11), "model.layers.0.mlp.up_proj.weight": (7, 5),
          "model.layers.1.self_attn.q_proj.weight": (13, 11), "model.norm.weight": (11,)}


def rand_mask(seed, p):
    rs = np.random.default_rng(seed)
    return {n: rs.random(s) < p for n, s in SHAPES.items()}


def test_roundtrip_and_algebra(tmp_path):
    A, B = rand_mask(0, 0.3), rand_mask(1, 0.5)
    a, b = Subnetwork.from_bool(A), Subnetwork.from_bool(B)
    a.save(tmp_path / "a.safetensors")
    la = Subnetwork.load(tmp_path / "a.safetensors")
    assert la == a
    for n in SHAPES:
        assert np.array_equal(la.array(n), A[n])
        assert torch.equal(la.bool_tensor(n), torch.from_numpy(A[n]))
    ops = {"|": (a | b, np.logical_or), "&": (a & b, np.logical_and), "-": (a - b, lambda x, y: x & ~y)}
    for sym, (m, f) in ops.items():
        for n in SHAPES:
            assert np.array_equal(m.array(n), f(A[n], B[n])), sym
    c = ~a
    for n in SHAPES:
        assert np.array_equal(c.array(n), ~A[n])
    assert c.count() + a.count() == a.numel()
    assert a.count() == sum(int(A[n].sum()) for n in SHAPES)
    meta = json.loads(Subnetwork.load(tmp_path / "a.safetensors").meta["shapes"])
    assert meta == {n: list(s) for n, s in SHAPES.items()}


def test_packing_is_numpy_little_bitorder(tmp_path):
    A = rand_mask(3, 0.4)
    Subnetwork.from_bool(A).save(tmp_path / "m.safetensors")
    from safetensors.numpy import load_file

    raw = load_file(str(tmp_path / "m.safetensors"))
    for n in SHAPES:
        assert np.array_equal(raw[n], np.packbits(A[n].reshape(-1), bitorder="little"))


def test_overlap_brute_force(tmp_path):
    A, B = rand_mask(0, 0.3), rand_mask(1, 0.6)
    a, b = Subnetwork.from_bool(A), Subnetwork.from_bool(B)
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    r = overlap([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")])
    fa = np.concatenate([A[n].ravel() for n in SHAPES])
    fb = np.concatenate([B[n].ravel() for n in SHAPES])
    x = int((fa & fb).sum())
    p = r.pairs[0]
    assert p.o1 == pytest.approx(x / fa.sum()) and p.o2 == pytest.approx(x / fb.sum())
    assert p.o1_random == pytest.approx(fb.mean()) and p.o2_random == pytest.approx(fa.mean())
    assert p.jaccard == pytest.approx(x / (fa | fb).sum())
    pp, qq = fa.mean(), fb.mean()
    assert p.jaccard_random == pytest.approx(pp * qq / (pp + qq - pp * qq))
    # the paper's identity o1·(1−s1) = o2·(1−s2)
    assert p.o1 * fa.mean() == pytest.approx(p.o2 * fb.mean())
    # per tensor
    for row in p.per_tensor:
        n = row["name"]
        assert row["intersection"] == int((A[n] & B[n]).sum())


def test_random_masks_match_baseline():
    shapes = {"w": (400, 250), "v": (300,)}
    rs = np.random.default_rng(5)
    base = Subnetwork.from_bool({n: rs.random(s) < 0.2 for n, s in shapes.items()})
    r1 = base.random_like(seed=1)
    r2 = base.random_like(seed=2, per_tensor=True)
    assert r1.count() == base.count()
    assert all(r2.count(n) == base.count(n) for n in shapes)
    r3 = Subnetwork.from_bool({n: rs.random(s) < 0.5 for n, s in shapes.items()}).random_like(seed=3)
    from rlsubnet.masks.overlap import pair_overlap

    p = pair_overlap(r1, r3)
    assert abs(p.z) < 4  # random masks overlap as the formula says
    assert p.o1 == pytest.approx(p.o1_random, abs=0.02)


def test_overlap_z_detects_above_chance():
    s = overlap_stats(600, 1000, 1000, 10000)
    assert s["ratio"] == pytest.approx(6.0) and s["z"] > 10


def test_consensus_three_masks(tmp_path):
    ms = [rand_mask(i, 0.4) for i in range(3)]
    paths = []
    for i, m in enumerate(ms):
        Subnetwork.from_bool(m).save(tmp_path / f"{i}.safetensors")
        paths.append(str(tmp_path / f"{i}.safetensors"))
    r = overlap(paths)
    assert len(r.pairs) == 3
    cnt = sum(np.concatenate([m[n].ravel() for n in SHAPES]).astype(int) for m in ms)
    assert r.consensus["global"]["hist"] == np.bincount(cnt, minlength=4).tolist()


def test_mismatched_masks_error(tmp_path):
    a = Subnetwork.from_bool(rand_mask(0, 0.3))
    b = Subnetwork.from_bool({"other": np.ones(3, bool)})
    with pytest.raises(InputError, match="different parameters"):
        a | b
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    r = subprocess.run([sys.executable, "-m", "rlsubnet.cli", "overlap", tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "different parameters" in r.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage!" * 3)
    with pytest.raises(InputError):
        Subnetwork.load(bad)
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, np.uint8)}, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(InputError, match="not an rlsubnet mask"):
        Subnetwork.load(tmp_path / "nometa.safetensors")


def _ckpts(tmp_path):
    g = torch.Generator().manual_seed(0)
    init = {n: torch.randn(s, generator=g).bfloat16() for n, s in SHAPES.items()}
    full = {n: t.clone() for n, t in init.items()}
    planted = {}
    for n, t in full.items():
        idx = torch.randperm(t.numel(), generator=g)[: t.numel() // 4]
        bump_ulps(t, idx, 1)
        planted[n] = idx
    return init, full, planted


def test_mask_cli_equals_diff_mask_out(tmp_path):
    init, full, planted = _ckpts(tmp_path)
    save_folder(tmp_path / "init", init)
    save_folder(tmp_path / "full", full)
    for crit in ("bitwise", "atol:1e-5", "bf16rel:1e-3"):
        m1, m2 = tmp_path / f"m1{crit}.safetensors", tmp_path / f"m2{crit}.safetensors"
        cli = [sys.executable, "-m", "rlsubnet.cli"]
        assert subprocess.run([*cli, "mask", tmp_path / "init", tmp_path / "full", "-o", m1, "--criterion", crit, "-q"]).returncode == 0
        assert subprocess.run([*cli, "diff", tmp_path / "init", tmp_path / "full", "--mask-out", m2, "--criterion", crit, "-q"]).returncode == 0
        a, b = Subnetwork.load(m1), Subnetwork.load(m2)
        assert a == b
        assert a.meta["criterion"] == crit and a.meta["base_fingerprint"].startswith("sha256:")
    m = Subnetwork.load(tmp_path / "m1bitwise.safetensors")
    for n, idx in planted.items():
        truth = np.zeros(int(np.prod(SHAPES[n])), bool)
        truth[idx.numpy()] = True
        assert np.array_equal(m.bits(n), truth)


def test_closeness_and_verify(tmp_path):
    init, full, planted = _ckpts(tmp_path)
    sub = {n: t.clone() for n, t in full.items()}
    w = sub["model.layers.0.mlp.up_proj.weight"]
    bump_ulps(w, torch.tensor([0, 1, 2]), 1)  # differ from full in 3 entries (1-2 ULP)
    save_folder(tmp_path / "init", init)
    save_folder(tmp_path / "full", full)
    save_folder(tmp_path / "sub", sub)
    r = closeness(str(tmp_path / "init"), str(tmp_path / "full"), str(tmp_path / "sub"), atol=[0, 1e-4, 1.0])
    n = sum(int(np.prod(s)) for s in SHAPES.values())
    assert r.atol[0]["equal"] == n - 3 and r.atol[2]["equal"] == n
    mask = Subnetwork.from_checkpoints(str(tmp_path / "init"), str(tmp_path / "full"))
    mask.save(tmp_path / "m.safetensors")
    r = closeness(str(tmp_path / "init"), str(tmp_path / "full"), str(tmp_path / "sub"), mask=str(tmp_path / "m.safetensors"), atol=[0])
    inside = sum(int(mask.array("model.layers.0.mlp.up_proj.weight").reshape(-1)[i]) for i in range(3))
    assert r.inside_mask[0]["equal"] == mask.count() - inside
    assert r.outside_mask[0]["equal"] == n - mask.count() - (3 - inside)
    v = changes_by_mask(str(tmp_path / "init"), str(tmp_path / "full"), str(tmp_path / "m.safetensors"))
    assert v.ok and v.frozen_moved == 0 and v.trainable_changed == mask.count()
    v = changes_by_mask(str(tmp_path / "init"), str(tmp_path / "sub"), str(tmp_path / "m.safetensors"))
    assert v.frozen_moved == 3 - inside and v.ok == (3 - inside == 0)
    p = subprocess.run([sys.executable, "-m", "rlsubnet.cli", "verify-frozen", tmp_path / "init", tmp_path / "sub", tmp_path / "m.safetensors"],
                       capture_output=True, text=True)
    assert p.returncode == (1 if 3 - inside else 0) and f"{3 - inside} of" in p.stdout


@pytest.mark.parametrize("shape,r", [((40, 30), 3), ((30, 64), 7), ((50, 50), 1), ((20, 20), 20)])
def test_rank_known(tmp_path, shape, r):
    g = torch.Generator().manual_seed(r)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    delta = torch.randn(shape[0], r, generator=g, dtype=torch.float64) @ torch.randn(r, shape[1], generator=g, dtype=torch.float64)
    tiny = torch.randn(shape, generator=g, dtype=torch.float64) * 1e-15  # below the float64 threshold too
    tuned = base + delta + tiny
    save_folder(tmp_path / "a", {"model.layers.0.self_attn.q_proj.weight": base, "model.norm.weight": torch.ones(shape[1], dtype=torch.float64)})
    save_folder(tmp_path / "b", {"model.layers.0.self_attn.q_proj.weight": tuned, "model.norm.weight": torch.ones(shape[1], dtype=torch.float64) * 2})
    res = rlsubnet.rank(str(tmp_path / "a"), str(tmp_path / "b"))
    assert [m.rank for m in res.matrices] == [r]
    assert res.mean_rank_ratio == pytest.approx(r / min(shape))
    assert "model.norm.weight" in res.excluded
    ref = torch.linalg.matrix_rank((tuned - base).float()).item()
    assert ref == r
    res64 = rlsubnet.rank(str(tmp_path / "a"), str(tmp_path / "b"), precision="float64")
    assert res64.matrices[0].rank == r
    assert 1 - 1e-9 <= res.matrices[0].stable_rank <= r * 1.001 and 1 - 1e-9 <= res.matrices[0].effective_rank <= r * 1.01


def test_matched_baselines_against_a_brute_force_sampler(tmp_path):
    """Issue 9 (part): the overlap expected of random masks matched per tensor or per tensor × |w0| exponent is
    exact; checked against sampling such masks (permuting each mask's bits within each stratum)."""
    from rlsubnet.masks.overlap import stratified_baseline

    from conftest import save_folder

    rng = np.random.default_rng(0)
    w = {"a": (rng.standard_normal(3000) * np.exp2(rng.integers(-10, 0, 3000))).astype(np.float32),
         "b": (rng.standard_normal(1000) * 0.01).astype(np.float32)}
    save_folder(tmp_path / "base", {k: torch.from_numpy(v).bfloat16() for k, v in w.items()})
    wb = {k: torch.from_numpy(v).bfloat16() for k, v in w.items()}
    # both masks prefer small |w0| (as bf16 updates do): correlated through magnitude, not beyond it
    p = {k: 0.6 / (1 + 200 * np.abs(v)) for k, v in w.items()}
    A = Subnetwork.from_bool({k: rng.random(v.size) < p[k] for k, v in w.items()})
    B = Subnetwork.from_bool({k: rng.random(v.size) < p[k] for k, v in w.items()})
    exp = {k: ((v.view(torch.int16).numpy().astype(np.int64) >> 7) & 0xFF) for k, v in wb.items()}
    res = {kind: stratified_baseline(A, B, kind, tmp_path / "base") for kind in ("uniform", "tensor", "magnitude")}
    for kind, strata_of in (("tensor", lambda k: np.zeros(w[k].size, int)), ("magnitude", lambda k: exp[k]),
                            ("uniform", None)):
        xs = []
        for _ in range(400):
            x = 0
            if kind == "uniform":
                a = np.concatenate([A.array(k) for k in w]).copy()
                b = np.concatenate([B.array(k) for k in w]).copy()
                rng.shuffle(a)
                rng.shuffle(b)
                x = int((a & b).sum())
            else:
                for k in w:
                    a, b, s = A.array(k).copy(), B.array(k).copy(), strata_of(k)
                    for v in np.unique(s):
                        idx = np.flatnonzero(s == v)
                        a[idx] = rng.permutation(a[idx])
                        b[idx] = rng.permutation(b[idx])
                    x += int((a & b).sum())
            xs.append(x)
        mean, se = np.mean(xs), np.std(xs) / np.sqrt(len(xs))
        assert abs(mean - res[kind]["expected_intersection"]) < 4 * se + 1e-9, (kind, mean, res[kind])
        assert 0.75 < np.var(xs, ddof=1) / res[kind]["variance"] < 1.33, (kind, np.var(xs), res[kind]["variance"])
    # the magnitude-matched baseline explains most of the overlap that the uniform one calls "above chance"
    assert res["uniform"]["ratio"] > res["magnitude"]["ratio"] and res["magnitude"]["strata"] > 2
    r = overlap([A, B], baseline="magnitude", base=tmp_path / "base")
    assert r.pairs[0].baseline["kind"] == "magnitude"
    A.save(tmp_path / "A.safetensors")
    B.save(tmp_path / "B.safetensors")
    from conftest import run

    out = run("overlap", tmp_path / "A.safetensors", tmp_path / "B.safetensors", "--baseline", "magnitude", "--base",
              tmp_path / "base", "--json", "-")
    assert out.returncode == 0, out.stderr
    import json

    d = json.loads(out.stdout)["pairs"][0]["baseline"]
    assert d["kind"] == "magnitude" and d["expected_intersection"] == pytest.approx(res["magnitude"]["expected_intersection"])
    bad = run("overlap", tmp_path / "A.safetensors", tmp_path / "B.safetensors", "--baseline", "magnitude")
    assert bad.returncode == 2 and "--base" in bad.stderr


def test_study_kept_mask_reuses_only_what_it_would_build(tmp_path):
    """The study's cached masks (random controls, union, padded): a file already there is used only if it loads and
    is the mask this study would build; a damaged or stale one is rebuilt in its place, bit for bit the new one."""
    from rlsubnet.study.pipeline import Study

    st = Study(str(tmp_path / "out"), budget="tiny")
    out = tmp_path / "m.safetensors"
    rng = np.random.default_rng(0)
    want = Subnetwork.from_bool({"w": rng.random((8, 16)) < 0.3}, meta={"matched_to": "A"})
    builds = []

    def build():
        builds.append(1)
        return want

    def accept(m):
        return m.meta.get("matched_to") == "A"

    assert st.kept_mask(out, build, accept) == str(out) and len(builds) == 1  # nothing there: built
    assert st.kept_mask(out, build, accept) == str(out) and len(builds) == 1  # accepted: kept, not rebuilt
    Subnetwork.from_bool({"w": rng.random((8, 16)) < 0.3}, meta={"matched_to": "B"}).save(out)  # stale
    st.kept_mask(out, build, accept)
    assert len(builds) == 2 and Subnetwork.load(out) == want
    out.write_bytes(out.read_bytes()[:40])  # damaged
    st.kept_mask(out, build, accept)
    assert len(builds) == 3 and Subnetwork.load(out) == want
