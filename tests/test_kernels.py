"""The compiled pass for 16-bit pairs (issue 19, item 4) against the numpy probes and against brute force.

Defect guarded: a fused kernel that miscounts an edge (NaN, ±0, infinities, exponents too far apart for an exact
float32 difference, a tolerance equal to |Δ|, a relative quotient on η) would change every sparsity a user reads.
"""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

pytest.importorskip("numba")

from rlsubnet.analysis import kernels
from rlsubnet.analysis.floor import floor_probe
from rlsubnet.analysis.probes import ULP_LABELS, ChunkStats, probe_chunk
from rlsubnet.io.dtypes import DTYPES, widen

TOLS = np.unique(np.array([0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4]))


def _pair(rng, n: int, name: str, moved: float):
    """Random 16-bit codes: mostly small weights moved by a few ULPs, plus planted edges."""
    if name == "BF16":
        x = (rng.standard_normal(n).astype(np.float32) * 0.02).view(np.uint32)
        ra = (x >> 16).astype(np.uint16)
    else:
        ra = (rng.standard_normal(n) * 0.02).astype(np.float16).view(np.uint16)
    rb = ra.copy()
    idx = rng.choice(n, int(n * moved), replace=False)
    rb[idx] = rb[idx] + rng.integers(-4, 5, idx.size).astype(np.uint16)
    k = max(1, n // 50)
    wild = rng.choice(n, k, replace=False)  # any code at all: NaN, inf, subnormal, far exponents
    rb[wild] = rng.integers(0, 1 << 16, k).astype(np.uint16)
    ra[wild[: k // 3]] = rng.integers(0, 1 << 16, k // 3).astype(np.uint16)
    ra[:4] = [0x0000, 0x8000, 0x0000, 0x3F80]  # +0/-0 (unchanged), +0/-0 again, and a value to infinity
    rb[:4] = [0x8000, 0x0000, 0x0000, 0x7F80 if name == "BF16" else 0x7C00]
    return ra, rb


def _both(ra, rb, dt, tols=TOLS, eta=1e-3, crit=None):
    a = probe_chunk(ra, rb, dt, dt, tols, eta, crit, compiled=False)
    b = probe_chunk(ra, rb, dt, dt, tols, eta, crit, compiled=True)
    return a, b


def _same(a: ChunkStats, b: ChunkStats) -> None:
    for f in ("numel", "changed", "rel_changed", "nonfinite"):
        assert getattr(a, f) == getattr(b, f), f
    assert a.atol_changed.tolist() == b.atol_changed.tolist()
    assert a.ulp_hist.tolist() == b.ulp_hist.tolist()
    assert a.max_abs == b.max_abs
    for f in ("sumsq_delta", "sumsq_base"):  # float64 accumulation here, float32 there
        x, y = getattr(a, f), getattr(b, f)
        assert x == y or (np.isnan(x) and np.isnan(y)) or abs(x - y) <= 1e-5 * max(abs(x), abs(y)), f


@settings(max_examples=40, deadline=None)
@given(seed=hst.integers(0, 2**32 - 1), n=hst.integers(1, 5000), moved=hst.floats(0.0, 1.0),
       name=hst.sampled_from(["BF16", "F16"]), mask=hst.booleans())
def test_compiled_pass_equals_numpy_probes(seed, n, moved, name, mask):
    rng = np.random.default_rng(seed)
    ra, rb = _pair(rng, max(n, 4), name, moved)
    dt = DTYPES[name]
    (a, ma), (b, mb) = _both(ra, rb, dt, crit=("bitwise", 0.0) if mask else None)
    _same(a, b)
    if mask:
        assert np.array_equal(ma, mb)


def test_compiled_pass_against_brute_force_with_ties():
    """Tolerances equal to a |Δ| exactly, and quotients on η, settled exactly: counted in Fractions here."""
    dt = DTYPES["BF16"]
    base = np.array([1.0, 1.0, 0.5, 3.0, 2.0**-100, 1000.0], np.float32)
    tuned = np.array([1.0078125, 1.0 + 2**-6, 0.5 + 2**-8, -3.0, 2.0**10, 1000.0 + 8], np.float32)
    ra = (base.view(np.uint32) >> 16).astype(np.uint16)
    rb = (tuned.view(np.uint32) >> 16).astype(np.uint16)
    fa, fb = widen(ra, dt), widen(rb, dt)
    d = [abs(Fraction(float(y)) - Fraction(float(x))) for x, y in zip(fa, fb)]
    tols = np.unique(np.array([float(x) for x in d]))  # every tolerance is some entry's |Δ| exactly (the ties)
    assert tols.size >= 5
    eta = 2.0**-7  # the third entry's |Δ|/max is 2^-8 / (0.5 + 2^-8): just under η; 8/1008 for the last
    st, _ = probe_chunk(ra, rb, dt, dt, tols, eta, compiled=True)
    assert st.changed == 6
    assert st.atol_changed.tolist() == [sum(x > Fraction(float(t)) for x in d) for t in tols]
    rel = sum(x > Fraction(eta) * max(abs(Fraction(float(u))), abs(Fraction(float(v)))) for x, u, v in zip(d, fa, fb))
    assert st.rel_changed == rel
    ref, _ = probe_chunk(ra, rb, dt, dt, tols, eta, compiled=False)
    _same(ref, st)
    # η = 2: 3 → -3 has |Δ|/max exactly η (the exact band), and 2^-100 → 2^10 lies far outside the float32-exact path
    st2, _ = probe_chunk(ra, rb, dt, dt, tols, 2.0, compiled=True)
    assert st2.rel_changed == sum(x > 2 * max(abs(Fraction(float(u))), abs(Fraction(float(v)))) for x, u, v in zip(d, fa, fb))
    _same(probe_chunk(ra, rb, dt, dt, tols, 2.0, compiled=False)[0], st2)
    alone = [1, 3]  # the band entry without any entry of the float64 path beside it
    eta = 2.0 - 2.0**-40  # 3 → -3 exceeds it, by less than float32 can tell: only the exact settlement counts it
    assert probe_chunk(ra[alone], rb[alone], dt, dt, tols, eta, compiled=True)[0].rel_changed == 1
    assert probe_chunk(ra[alone], rb[alone], dt, dt, tols, 2.0, compiled=True)[0].rel_changed == 0


def test_more_tolerances_than_the_kernel_takes_falls_back():
    rng = np.random.default_rng(3)
    ra, rb = _pair(rng, 3000, "BF16", 0.3)
    tols = np.unique(np.geomspace(1e-9, 1e-2, kernels.kernels().MAX_TOLS + 3))
    (a, _), (b, _) = _both(ra, rb, DTYPES["BF16"], tols=tols)
    _same(a, b)


@pytest.mark.parametrize("name", ["BF16", "F16"])
@pytest.mark.parametrize("n", [20000, 2 * 4096 + 45, 31])  # whole blocks of the AVX-512 pass, a partial one, a tail
def test_compiled_floor_equals_numpy_floor(name, n):
    rng = np.random.default_rng(5)
    ra, rb = _pair(rng, n, name, 0.4)
    dt = DTYPES[name]
    out = []
    for compiled in (False, True):
        st = ChunkStats()
        floor_probe(ra, rb, dt, dt, 1e-3, st, compiled=compiled)
        out.append((st.frozen, st.changed_frozen, st.exp_numel.tolist(), st.exp_changed.tolist()))
    assert out[0] == out[1]
    if n > 1000:
        assert out[0][0] > 0 and out[0][1] > 0  # the test sees frozen entries, some of them changed


def test_diff_json_is_the_same_with_and_without_the_kernels(tmp_path, monkeypatch):
    """The whole command: the same JSON to the last count (L2 norms to 1e-6 relative), with --lr-sum and a mask."""
    import torch
    from safetensors import safe_open

    from conftest import run, save_folder

    g = torch.Generator().manual_seed(7)
    base = {f"model.layers.{i}.mlp.up_proj.weight": (torch.randn(64, 96, generator=g) * 0.03).bfloat16() for i in range(3)}
    base["model.norm.weight"] = torch.ones(96).half()
    tuned = {k: v.clone() for k, v in base.items()}
    for v in tuned.values():
        flat = v.view(-1)
        sel = torch.rand(flat.numel(), generator=g) < 0.3
        flat[sel] = flat[sel] + flat[sel].abs().clamp_min(1e-3) * 0.01
    a, b = save_folder(tmp_path / "a", base), save_folder(tmp_path / "b", tuned)
    outs = []
    for mode in ("0", "1"):
        monkeypatch.setenv("RLSUBNET_JIT", mode)
        js, mask = tmp_path / f"d{mode}.json", tmp_path / f"m{mode}.safetensors"
        r = run("diff", a, b, "--json", js, "--lr-sum", "1e-3", "--mask-out", mask, "-q", "--workers", "2")
        assert r.returncode == 0, r.stderr
        d = json.loads(js.read_text())
        with safe_open(mask, "np") as h:  # the bits and the metadata (whose key order the file does not fix)
            outs.append((d, ({k: h.get_tensor(k).tobytes() for k in h.keys()}, h.metadata())))
    (d0, m0), (d1, m1) = outs
    assert m0 == m1
    assert d0["summary"]["changed"] > 0 and d0["summary"]["changed"] == d1["summary"]["changed"]

    def walk(x, y, path=""):
        if isinstance(x, dict):
            assert x.keys() == y.keys(), path
            for k in x:
                if k not in ("elapsed_s",):
                    walk(x[k], y[k], f"{path}/{k}")
        elif isinstance(x, list):
            assert len(x) == len(y), path
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{path}[{i}]")
        elif isinstance(x, float) and isinstance(y, float) and x != y:
            assert abs(x - y) <= 1e-6 * max(abs(x), abs(y)), (path, x, y)
        else:
            assert x == y, (path, x, y)

    walk(d0, d1)
    assert set(d0["summary"]["ulp_hist"]) == set(ULP_LABELS)


def test_use_for_follows_size_and_environment(monkeypatch):
    """The C extension is used for every size; numba (RLSUBNET_JIT=numba, or where the extension is not built) from
    MIN_ENTRIES on, unless RLSUBNET_JIT=1; RLSUBNET_JIT=0 never."""
    monkeypatch.setenv("RLSUBNET_JIT", "auto")
    assert kernels.use_for(1) == (kernels.kernels().NAME == "native")
    monkeypatch.setenv("RLSUBNET_JIT", "numba")
    assert kernels.kernels() is kernels._load("numba")
    assert not kernels.use_for(kernels.MIN_ENTRIES - 1)
    assert kernels.use_for(kernels.MIN_ENTRIES)
    monkeypatch.setenv("RLSUBNET_JIT", "0")
    assert not kernels.use_for(1 << 40)
    monkeypatch.setenv("RLSUBNET_JIT", "1")
    assert kernels.use_for(1)


def test_the_c_extension_is_built_here():
    """`pip install` builds the extension where a compiler is (this machine, CI): without this test a failed build
    would silently leave the slower numba pass under every other test of this file."""
    k = kernels.kernels()
    assert k is not None and k.NAME == "native", "rlsubnet.analysis._native was not built"


_EVERY_BUILD = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from test_kernels import _pair, _both, _same
from rlsubnet.analysis import kernels
from rlsubnet.io.dtypes import DTYPES
for seed in range(6):
    for name in ("BF16", "F16"):
        rng = np.random.default_rng(seed)
        ra, rb = _pair(rng, 3000 + 37 * seed, name, 0.3)
        (a, ma), (b, mb) = _both(ra, rb, DTYPES[name], crit=("bitwise", 0.0))
        _same(a, b)
        assert np.array_equal(ma, mb)
print(kernels.kernels().NAME, getattr(kernels.kernels(), "ISA", "-"))
"""


@pytest.mark.parametrize("env,want", [({"RLSUBNET_NATIVE_PORTABLE": "1"}, "native portable"),
                                      ({"RLSUBNET_JIT": "numba"}, "numba -")])
def test_every_build_of_the_pass_equals_numpy(env, want):
    """The portable C build (chosen at import when the CPU lacks AVX-512, forced here) and numba's kernels give the
    numpy path's counts and mask too."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = _EVERY_BUILD.format(tests=str(Path(__file__).parent))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == want.split()
