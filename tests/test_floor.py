"""Issue 9, part 1: the precision floor, against brute-force rounding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import rlsubnet
from rlsubnet.io.dtypes import DTYPES, below_floor

from conftest import bits_view, bump_ulps, run, save_folder

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _values(code: str, rng) -> torch.Tensor:
    """Random values plus the hard cases: zeros, powers of two, their neighbours, subnormals, the largest value."""
    dt = TORCH[code]
    fi = torch.finfo(dt)
    base = [0.0, -0.0, 1.0, -1.0, 2.0, 0.5, 0.25, fi.max, -fi.max, fi.tiny, fi.tiny / 2, fi.smallest_normal * 3]
    x = torch.tensor(base, dtype=torch.float64).to(dt)
    r = torch.from_numpy(rng.standard_normal(400) * np.exp2(rng.integers(-8, 4, 400))).to(dt)
    v = torch.cat([x, r])
    b = bits_view(v).clone()
    nb = torch.cat([b, b + 1, b - 1])  # neighbours of every value (powers of two included)
    out = nb.view(dt)
    return out[torch.isfinite(out)]


def _brute(v: torch.Tensor, s: float) -> np.ndarray | None:
    """Frozen iff rounding w0 ± s back to the dtype gives w0 (±0 equal); None where w0 ± s is not exact here."""
    w = v.double()
    up, dn = w + s, w - s
    exact = ((up - w) == s) & ((w - dn) == s)
    if v.dtype != torch.float32:  # torch rounds float64 -> bf16/fp16 through float32: keep exact float32 cases
        exact &= (up.float().double() == up) & (dn.float().double() == dn)
    ru, rd = up.to(v.dtype), dn.to(v.dtype)
    same = lambda a: (bits_view(a) == bits_view(v)) | ((a == 0) & (v == 0))
    return (same(ru) & same(rd)).numpy(), exact.numpy()


@pytest.mark.parametrize("code", ["BF16", "F16", "F32"])
def test_below_floor_matches_brute_force(code):
    rng = np.random.default_rng(0)
    v = _values(code, rng)
    raw = bits_view(v).numpy().view(DTYPES[code].raw)
    checked = 0
    for k in range(-40, 2):
        for m in (1.0, 1.5, 0.75):
            s = m * 2.0**k
            want, exact = _brute(v, s)
            got = below_floor(raw, DTYPES[code], s)
            assert np.array_equal(got[exact], want[exact]), (code, s, v[exact][got[exact] != want[exact]][:5])
            checked += int(exact.sum())
    assert checked > 20000


def test_diff_reports_the_floor(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.up_proj.weight": (torch.randn(64, 64, generator=g) * 0.05).bfloat16(),
            "model.layers.0.self_attn.q_proj.weight": (torch.randn(64, 64, generator=g) * 0.002).bfloat16()}
    tuned = {k: v.clone() for k, v in base.items()}
    for t in tuned.values():
        bump_ulps(t, torch.randperm(t.numel(), generator=g)[:300], 1)
    save_folder(tmp_path / "a", base)
    save_folder(tmp_path / "b", tuned)
    s = 1e-5
    r = rlsubnet.diff(tmp_path / "a", tmp_path / "b", lr_sum=s)
    frozen = changed_above = numel = changed = 0
    for k, v in base.items():
        raw = bits_view(v).reshape(-1).numpy().view(np.uint16)
        f = below_floor(raw, DTYPES["BF16"], s)
        ch = (bits_view(tuned[k]) != bits_view(v)).reshape(-1).numpy()
        frozen += int(f.sum())
        changed_above += int((ch & ~f).sum())
        numel += v.numel()
        changed += int(ch.sum())
    fl = r.floor
    assert fl.frozen == frozen and fl.changed_above_floor == changed_above and 0 < frozen < numel
    assert fl.sparsity_above_floor == 1 - changed_above / (numel - frozen)
    assert sum(x["numel"] for x in r.by_exponent) == numel and sum(x["changed"] for x in r.by_exponent) == changed
    assert {g.key for g in r.by_module if g.floor} == {"up", "q"}
    res = run("diff", tmp_path / "a", tmp_path / "b", "--lr-sum", "1e-5", "--json", "-", "-q")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["summary"]["floor"]["frozen"] == frozen and d["tensors"][0]["floor"]["lr_sum"] == 1e-5
    assert run("diff", tmp_path / "a", tmp_path / "b", "--lr-sum", "-1").returncode == 2


@pytest.mark.parametrize("name", ["BF16", "F16"])
def test_floor_probe_by_code_table_equals_the_entrywise_floor(name):
    """16-bit chunks take the floor from a histogram of codes and a per-code table: the same frozen and
    changed-frozen counts and per-exponent tables as ``below_floor`` entry by entry (every code: ±0,
    subnormals, ±inf, NaN), for bounds at, between and around the half-gaps."""
    from rlsubnet.analysis.floor import floor_probe
    from rlsubnet.analysis.probes import ChunkStats
    from rlsubnet.io.bits import changed_index

    dt = DTYPES[name]
    rng = np.random.default_rng(3)
    ra = np.concatenate([np.arange(1 << 16, dtype=np.uint16), rng.integers(0, 1 << 16, 50_000, dtype=np.uint16)])
    rb = ra.copy()
    moved = rng.random(ra.size) < 0.3
    rb[moved] ^= np.uint16(1)
    idx = changed_index(ra, rb)
    for bound in (0.0, 2.0**-12, 1e-3, 2.0**-9 * 1.5, 0.5, 65504.0):
        st = ChunkStats()
        floor_probe(ra, rb, dt, dt, bound, st)
        frozen = below_floor(ra, dt, bound)
        e = (ra >> np.uint16(dt.mantissa_bits)) & np.uint16((1 << dt.exponent_bits) - 1)
        assert (st.frozen, st.changed_frozen) == (int(frozen.sum()), int(frozen[idx].sum())), bound
        assert np.array_equal(st.exp_numel, np.bincount(e, minlength=1 << dt.exponent_bits))
        assert np.array_equal(st.exp_changed, np.bincount(e[idx], minlength=1 << dt.exponent_bits))
