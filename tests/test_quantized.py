"""Frontier checkpoints (issue 17): fp8 block-scaled, compressed-tensors fp8 and MXFP4, read as the model computes.

Every pair is planted: codes moved, a block rescaled, a +0 code turned into -0 (a code change that is no value
change). The truth is computed independently in float64 with torch's own float8 decoding and transformers'
own dequantization (its fp8 and MXFP4 integrations).
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rlsubnet.analysis import diff
from rlsubnet.io import open_checkpoint
from rlsubnet.io.quant import ValueCheckpoint

from conftest import run, save_folder

FP8_CFG = {"model_type": "deepseek_v3", "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                                               "activation_scheme": "dynamic"}}


def _fp8(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 100).to(torch.float8_e4m3fn)


def _deepseek_pair(tmp_path, rows=300, cols=260):
    """A DeepSeek-style pair: fp8 weights with float32 block scales (partial blocks at the edges), a bf16 norm.
    Returns the folders and the planted counts."""
    g = torch.Generator().manual_seed(0)
    w = _fp8((rows, cols), 1)
    s = (torch.rand((-(-rows // 128), -(-cols // 128)), generator=g) + 0.5) * 1e-3
    e = _fp8((64, 128), 2)
    es = (torch.rand(1, 1, generator=g) + 0.5) * 1e-2
    norm = torch.randn(cols, generator=g).bfloat16()
    base = {"model.layers.0.self_attn.q_proj.weight": w, "model.layers.0.self_attn.q_proj.weight_scale_inv": s,
            "model.layers.0.mlp.experts.0.down_proj.weight": e, "model.layers.0.mlp.experts.0.down_proj.weight_scale_inv": es,
            "model.layers.0.input_layernorm.weight": norm}
    tuned = {k: v.clone() for k, v in base.items()}
    codes = tuned["model.layers.0.self_attn.q_proj.weight"].view(torch.uint8).view(-1)
    moved = torch.tensor([0, 5, 77, 1000, 40000, rows * cols - 1])
    codes[moved] = codes[moved] ^ 0x01  # one mantissa bit: a different value
    zero = int(torch.nonzero(codes == 0)[0]) if (codes == 0).any() else None
    if zero is None:
        codes[123] = 0
        base["model.layers.0.self_attn.q_proj.weight"].view(torch.uint8).view(-1)[123] = 0
        zero = 123
    codes[zero] = 0x80  # +0 -> -0: the code changes, the value does not
    tuned["model.layers.0.self_attn.q_proj.weight_scale_inv"][1, 2] *= 1.5  # rescale one block (rows 128-255, cols 256-259)
    tuned["model.layers.0.input_layernorm.weight"][:3] += 1
    a = save_folder(tmp_path / "a", base, config=FP8_CFG)
    b = save_folder(tmp_path / "b", tuned, config=FP8_CFG)
    return a, b, base, tuned


def _values64(w: torch.Tensor, s: torch.Tensor, block=(128, 128)) -> np.ndarray:
    """Independent truth: torch's float8 decoding, each entry times its block's scale, in float64."""
    v = w.to(torch.float64)
    sc = s.to(torch.float64).repeat_interleave(block[0], 0)[: w.shape[0]].repeat_interleave(block[1], 1)[:, : w.shape[1]]
    return (v * sc).numpy()


def _changed(va: np.ndarray, vb: np.ndarray) -> int:
    return int(np.count_nonzero((va != vb) & ~(np.isnan(va) & np.isnan(vb))))


def test_fp8_block_pair_is_read_by_value(tmp_path):
    a, b, base, tuned = _deepseek_pair(tmp_path)
    q = "model.layers.0.self_attn.q_proj.weight"
    va = _values64(base[q], base[q + "_scale_inv"])
    vb = _values64(tuned[q], tuned[q + "_scale_inv"])
    e = "model.layers.0.mlp.experts.0.down_proj.weight"
    truth = _changed(va, vb)
    codes_truth = int((base[q].view(torch.uint8) != tuned[q].view(torch.uint8)).sum())
    assert truth != codes_truth  # the rescaled block moves values whose codes stay; -0 moves a code, not a value
    r = run("diff", a, b, "--json", "-", "-q")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    t = {x["name"]: x for x in d["tensors"]}
    assert set(t) == {q, e, "model.layers.0.input_layernorm.weight"}  # scales are not parameters
    assert t[q]["numel"] == 300 * 260 and t[q]["changed"] == truth
    assert t[q]["dtype"] == "float8_e4m3fn" and t[q]["quantized"]["format"] == "fp8-block" and t[q]["quantized"]["block"] == [128, 128]
    assert t[q]["quantized"]["codes_changed"] == codes_truth and t[q]["quantized"]["scales_changed"] == 1
    assert t[e]["changed"] == 0 and t[e]["quantized"]["codes_changed"] == 0
    assert d["summary"]["numel"] == 300 * 260 + 64 * 128 + 260
    assert d["summary"]["changed"] == truth + 3
    assert d["summary"]["quantized"] == {"tensors": 2, "codes_changed": codes_truth, "scales_changed": 1}
    # the tolerance sweep by value: |Δ| > 1e-4 counted exactly from the float64 truth
    ad = np.abs(vb - va)
    got = {x["atol"]: x["changed"] for x in t[q]["atol"]}
    assert got[1e-4] == int(np.count_nonzero(ad > 1e-4)) and got[0.0] == truth
    # ULPs in the stored grid: a one-mantissa-bit move is 1 ULP of the code grid
    assert t[q]["ulp_hist"]["1"] >= 5
    # the terminal, the Markdown report and the plots show both views
    r = run("diff", a, b, "--by", "tensor", "--markdown", tmp_path / "d.md", "--plot", tmp_path / "plots")
    assert r.returncode == 0 and "codes" in r.stdout and "scales" in r.stdout
    md = (tmp_path / "d.md").read_text()
    assert f"| `{q}` | fp8-block | 128×128 | {truth:,} | {codes_truth:,} | 1 |" in md and "values identical" in md
    assert (tmp_path / "plots" / "quantized_changes.png").stat().st_size > 0


def test_our_dequantization_equals_transformers(tmp_path):
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    a, _, base, _ = _deepseek_pair(tmp_path)
    q = "model.layers.0.self_attn.q_proj.weight"
    want = _dequantize_fp8_weight(base[q].clone(), base[q + "_scale_inv"], [128, 128], torch.float64).numpy().reshape(-1)
    with open_checkpoint(a) as ck:
        assert isinstance(ck, ValueCheckpoint)
        got = ck.read(q).view(np.float64)
    assert np.array_equal(got, want)


def _mxfp4_pair(tmp_path):
    g = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (2, 6, 3, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(118, 130, (2, 6, 3), generator=g, dtype=torch.uint8)
    router = torch.randn(2, 32, generator=g).bfloat16()
    base = {"model.layers.0.mlp.experts.gate_up_proj_blocks": blocks, "model.layers.0.mlp.experts.gate_up_proj_scales": scales,
            "model.layers.0.mlp.router.weight": router}
    tuned = {k: v.clone() for k, v in base.items()}
    tb = tuned["model.layers.0.mlp.experts.gate_up_proj_blocks"].view(-1)
    tb[0] ^= 0x01  # low nibble of byte 0: entry 0
    tb[10] ^= 0x30  # high nibble of byte 10: entry 21
    tuned["model.layers.0.mlp.experts.gate_up_proj_scales"][1, 2, 0] += 1  # 32 entries of expert 1 double
    cfg = {"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}}
    return save_folder(tmp_path / "a", base, config=cfg), save_folder(tmp_path / "b", tuned, config=cfg), base, tuned


def test_mxfp4_pair_counts_weights_not_bytes(tmp_path):
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    a, b, base, tuned = _mxfp4_pair(tmp_path)
    p = "model.layers.0.mlp.experts.gate_up_proj"

    def values(sd):  # transformers' own dequantization, transposed back to the files' row order
        return _convert_moe_packed_tensors(sd[p + "_blocks"], sd[p + "_scales"], dtype=torch.float64).transpose(1, 2).numpy()

    va, vb = values(base), values(tuned)
    with open_checkpoint(a) as ck:
        assert np.array_equal(ck.read(p).view(np.float64), va.reshape(-1))
    r = diff(a, b)
    t = {x.name: x for x in r.tensors}
    assert set(t) == {p, "model.layers.0.mlp.router.weight"}
    assert t[p].numel == 2 * 6 * 3 * 32 and t[p].shape == [2, 6, 96]
    assert t[p].changed == _changed(va, vb)
    nib = lambda sd: torch.stack([sd[p + "_blocks"] & 15, sd[p + "_blocks"] >> 4], -1)
    assert t[p].quantized == {"format": "mxfp4", "block": [32], "codes_changed": int((nib(base) != nib(tuned)).sum()), "scales_changed": 1}


def test_compressed_tensors_channel_scales(tmp_path):
    g = torch.Generator().manual_seed(4)
    w = _fp8((40, 24), 5)
    s = torch.rand(40, 1, generator=g).bfloat16() + 0.5
    base = {"model.layers.0.mlp.up_proj.weight": w, "model.layers.0.mlp.up_proj.weight_scale": s,
            "model.layers.0.mlp.up_proj.input_scale": torch.ones(1)}
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["model.layers.0.mlp.up_proj.weight_scale"][7, 0] *= 2
    cfg = {"model_type": "llama", "quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized"}}
    a, b = save_folder(tmp_path / "a", base, config=cfg), save_folder(tmp_path / "b", tuned, config=cfg)
    va = (w.to(torch.float64) * s.to(torch.float64)).numpy()
    vb = (w.to(torch.float64) * tuned["model.layers.0.mlp.up_proj.weight_scale"].to(torch.float64)).numpy()
    r = diff(a, b)
    assert [x.name for x in r.tensors] == ["model.layers.0.mlp.up_proj.weight"]  # input_scale is no parameter
    t = r.tensors[0]
    assert t.changed == _changed(va, vb) and t.quantized["format"] == "fp8-channel" and t.quantized["codes_changed"] == 0


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes"])
def test_unknown_quantization_is_refused(tmp_path, method):
    cfg = {"model_type": "llama", "quantization_config": {"quant_method": method}}
    a = save_folder(tmp_path / "a", {"w": torch.zeros(4)}, config=cfg)
    r = run("diff", a, a, "-q")
    assert r.returncode == 2 and method in r.stderr and "not supported" in r.stderr and "Traceback" not in r.stderr


def test_dequantized_tuned_side_compares_by_value_and_requantizes(tmp_path):
    """A user who dequantized DeepSeek-V3 to bf16 to train it: compared by value, and the changes that would survive
    quantizing the tuned model back into the base's grid are counted."""
    a, _, base, _ = _deepseek_pair(tmp_path)
    q = "model.layers.0.self_attn.q_proj.weight"
    va = _values64(base[q], base[q + "_scale_inv"])
    vb = torch.from_numpy(va).to(torch.bfloat16)
    flat = vb.view(-1)
    flat[:50] = flat[:50] * 1.5  # large moves: survive requantizing
    tuned = {q: vb, "model.layers.0.mlp.experts.0.down_proj.weight": torch.from_numpy(
        _values64(base["model.layers.0.mlp.experts.0.down_proj.weight"], base["model.layers.0.mlp.experts.0.down_proj.weight_scale_inv"])).bfloat16(),
        "model.layers.0.input_layernorm.weight": base["model.layers.0.input_layernorm.weight"]}
    b = save_folder(tmp_path / "b", tuned, config={"model_type": "deepseek_v3"})
    r = diff(a, b)
    t = {x.name: x for x in r.tensors}[q]
    vbf = vb.double().numpy()
    assert t.changed == _changed(va, vbf)  # bf16 rounding of the dequantized values moves many, by value
    from rlsubnet.io.quant import requantize

    with open_checkpoint(a) as ck:
        _, scale, _ = ck.values(q, 0, va.size)
    back = requantize(ck.quant[q], vbf.reshape(-1), scale)
    assert t.quantized["survive_requantize"] == _changed(va.reshape(-1), back) >= 50
    assert r.quantized["compared_by_value_only"] == 2 and any("survive" in n for n in r.notes)


def test_requantize_matches_torch_float8_rounding():
    """Our round-to-nearest-even into the e4m3 grid is torch's own float8 cast (scale 1)."""
    from rlsubnet.io.quant import QuantSpec, requantize

    x = torch.randn(20000, dtype=torch.float64) * 50
    x = torch.cat([x, torch.tensor([0.0, -0.0, 448.0, 500.0, -1e6, 2.0**-9, 3 * 2.0**-10])])
    spec = QuantSpec("w", "fp8-block", "w", "s", (x.numel(),), (128, 128))
    got = requantize(spec, x.numpy(), np.ones(x.numel()))
    want = x.clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float64).numpy()
    assert np.array_equal(got, want)


def test_patch_carries_codes_and_scales_bit_exactly(tmp_path):
    from rlsubnet.deltas.patch import apply, create

    a, b, _, _ = _deepseek_pair(tmp_path)
    st = create(a, b, tmp_path / "p")
    assert st.changed > 0
    apply(a, [tmp_path / "p"], tmp_path / "out")
    got, want = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:  # codes and scale tensors alike, bit for bit
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k


def test_masks_and_verify_frozen_work_by_value(tmp_path):
    a, b, base, tuned = _deepseek_pair(tmp_path)
    r = run("mask", a, b, "-o", tmp_path / "m.safetensors", "-q")
    assert r.returncode == 0, r.stderr
    from rlsubnet.masks import Subnetwork, verify_frozen

    m = Subnetwork.load(tmp_path / "m.safetensors")
    assert m.count() == diff(a, b).changed and "model.layers.0.self_attn.q_proj.weight_scale_inv" not in m.shapes
    assert verify_frozen(a, b, str(tmp_path / "m.safetensors")).ok


def _moe_pair(tmp_path, fused: bool):
    """Two MoE layers: per-expert tensors (DeepSeek/Qwen3 names) or fused [E, ...] tensors (transformers 5), a router,
    a shared expert and DeepSeek's e_score_correction_bias; RL touches experts {0, 2} of layer 0 and none of layer 1."""
    g = torch.Generator().manual_seed(7)
    E, H, inter = 4, 8, 6
    base = {}
    for L in range(2):
        p = f"model.layers.{L}.mlp."
        base[p + "gate.weight"] = torch.randn(E, H, generator=g).bfloat16()
        base[p + "gate.e_score_correction_bias"] = torch.zeros(E)
        base[p + "shared_experts.up_proj.weight"] = torch.randn(inter, H, generator=g).bfloat16()
        if fused:
            base[p + "experts.gate_up_proj"] = torch.randn(E, 2 * inter, H, generator=g).bfloat16()
            base[p + "experts.down_proj"] = torch.randn(E, H, inter, generator=g).bfloat16()
        else:
            for e in range(E):
                for proj, shape in (("gate_proj", (inter, H)), ("up_proj", (inter, H)), ("down_proj", (H, inter))):
                    base[p + f"experts.{e}.{proj}.weight"] = torch.randn(*shape, generator=g).bfloat16()
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["model.layers.0.mlp.gate.e_score_correction_bias"][1] = 0.5
    tuned["model.layers.0.mlp.gate.weight"][0, 0] += 1
    if fused:
        tuned["model.layers.0.mlp.experts.gate_up_proj"][0, 0, :3] += 1  # expert 0: 3 entries
        tuned["model.layers.0.mlp.experts.down_proj"][2, 1, 1] += 1  # expert 2: 1 entry
    else:
        tuned["model.layers.0.mlp.experts.0.gate_proj.weight"][0, :3] += 1
        tuned["model.layers.0.mlp.experts.2.down_proj.weight"][1, 1] += 1
    return save_folder(tmp_path / "a", base), save_folder(tmp_path / "b", tuned)


@pytest.mark.parametrize("fused", [False, True])
def test_experts_per_layer(tmp_path, fused):
    a, b = _moe_pair(tmp_path, fused)
    r = run("diff", a, b, "--json", "-", "-q")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)["moe"]
    assert m["experts_total"] == 8 and m["experts_untouched"] == 6
    L0, L1 = m["layers"]
    assert [x["changed"] for x in L0["experts"]] == [3, 0, 1, 0] and L0["experts_untouched"] == 2
    assert L0["experts"][0]["numel"] == 2 * 6 * 8 + 8 * 6  # gate + up + down of one expert
    assert L0["router"] == {"numel": 32, "changed": 1} and L0["router_bias"] == {"numel": 4, "changed": 1}
    assert L0["shared"]["changed"] == 0 and L1["experts_untouched"] == 4
    r = run("diff", a, b, "--by", "expert", "--plot", tmp_path / "plots")
    assert r.returncode == 0 and "2 of 4" in r.stdout and "untouched by the run: 6 of 8" in r.stdout
    assert (tmp_path / "plots" / "expert_heatmap.png").stat().st_size > 0


def test_by_expert_without_experts_is_one_sentence(pair):
    r = run("diff", *pair, "--by", "expert")
    assert r.returncode == 2 and "no mixture-of-experts" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("make", ["fp8", "mxfp4"])
def test_chunk_boundaries_do_not_change_a_count(tmp_path, make):
    """Chunks that cut through rows, blocks and 32-value groups give the counts of one whole chunk."""
    if make == "fp8":
        a, b, _, tuned = _deepseek_pair(tmp_path)
    else:
        a, b, _, _ = _mxfp4_pair(tmp_path)
    whole = diff(a, b, lr_sum=1e-4, mask_criterion="bitwise")
    for chunk in (40, 1000, 4104):
        r = diff(a, b, chunk=chunk, lr_sum=1e-4, mask_criterion="bitwise")
        for x, y in zip(whole.tensors, r.tensors):
            assert (x.changed, x.atol, x.ulp_hist, x.quantized, x.floor) == (y.changed, y.atol, y.ulp_hist, y.quantized, y.floor), (chunk, x.name)
        assert all(np.array_equal(whole.mask_bits[k], r.mask_bits[k]) for k in whole.mask_bits)


def _e4m3_ulp_by_gap() -> np.ndarray:
    """Per fp8 code: the distance from |value| to the next larger value of the grid (to the one below at the top),
    taken from torch's decoding of all 256 codes: an independent definition of the grid's ULP."""
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float64).numpy()
    grid = np.unique(np.abs(v[np.isfinite(v)]))
    j = np.searchsorted(grid, np.abs(np.nan_to_num(v)))
    nxt = np.where(j + 1 < grid.size, grid[np.minimum(j + 1, grid.size - 1)], np.inf)
    return np.where(np.isfinite(nxt), nxt - grid[j], grid[-1] - grid[-2])


def _random_fp8(rng, rows, cols, nan: bool):
    ca = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    cb = ca.copy()
    moved = rng.random(ca.shape) < 0.33
    cb[moved] = rng.integers(0, 256, int(moved.sum()), dtype=np.uint8)
    ca.reshape(-1)[:50], cb.reshape(-1)[:50] = 0x00, 0x80  # +0 → -0: codes move, values do not
    if nan:  # NaN codes (0x7F, 0xFF) anywhere, and NaN → NaN (equal)
        ca.reshape(-1)[50:60], cb.reshape(-1)[50:60] = 0x7F, 0xFF
    else:
        for c in (ca, cb):
            c[(c & 0x7F) == 0x7F] = 0x30
    return ca, cb, int(moved.sum())


@pytest.mark.parametrize("zero_scale", [False, True])
def test_fp8_probes_equal_the_float64_truth(tmp_path, zero_scale):
    """Every number diff reports for an fp8 pair — changed, the tolerance sweep, the relative criterion, max |Δ|,
    the norms, non-finite entries, the grid's ULP histogram and the masks of all three criteria — equals what the
    same diff reports for the pair's exact float64 values (and, for the ULPs, a histogram computed here), on a pair
    with a third of its codes moved, NaN codes, +0/-0 swaps and rescaled blocks, in chunks that cut the blocks."""
    from rlsubnet.analysis.probes import ULP_EDGES, ULP_LABELS

    rng = np.random.default_rng(7)
    base, tuned, fbase, ftuned, planted = {}, {}, {}, {}, {}
    to_t = lambda c: torch.from_numpy(c).view(torch.float8_e4m3fn)
    # 260 columns: blocks cut at the edge (chunks of any size); 256: whole blocks (diff reads them in chunks of
    # whole block rows, each rescaled block a slice), with a partial last block row
    for proj, nan, rows, cols in (("q_proj", True, 300, 260), ("k_proj", False, 300, 260), ("v_proj", False, 1100, 260),
                                  ("o_proj", True, 700, 256), ("up_proj", False, 700, 256)):
        q = f"model.layers.0.self_attn.{proj}.weight"
        ca, cb, n_moved = _random_fp8(rng, rows, cols, nan)
        sa = ((rng.random((-(-rows // 128), -(-cols // 128))) + 0.5) * 1e-3).astype(np.float32)
        sb = sa.copy()
        sb[1, -1] *= np.float32(1.5)
        sb[0, 0] *= np.float32(0.75)
        if proj in ("v_proj", "up_proj"):  # most blocks rescaled (as requantizing after training does)
            sb.reshape(-1)[rng.random(sb.size) < 0.8] *= np.float32(1.25)
        if zero_scale:  # a scale that is not positive: the whole parameter goes by value
            sa[2, 1] = sb[2, 1] = 0.0
        base[q], base[q + "_scale_inv"] = to_t(ca), torch.from_numpy(sa)
        tuned[q], tuned[q + "_scale_inv"] = to_t(cb), torch.from_numpy(sb)
        va, vb = _values64(base[q], base[q + "_scale_inv"]), _values64(tuned[q], tuned[q + "_scale_inv"])
        fbase[q] = torch.from_numpy(va)
        ftuned[q] = torch.from_numpy(np.where(np.isnan(va) & np.isnan(vb), va, vb))  # diff calls two NaNs equal; float64 ones by bits
        planted[q] = (ca, sa, va, vb, (rows, cols))
    a, b = save_folder(tmp_path / "a", base, config=FP8_CFG), save_folder(tmp_path / "b", tuned, config=FP8_CFG)
    fa, fb = save_folder(tmp_path / "fa", fbase), save_folder(tmp_path / "fb", ftuned)
    _, _, va, vb, _ = planted["model.layers.0.self_attn.k_proj.weight"]
    d = np.abs(vb - va)[:128, 128:256]  # a block whose scale did not change: codes moved under one scale
    vals, counts = np.unique(d[d > 0], return_counts=True)
    tie = float(vals[np.argmax(counts)])  # a tolerance that many |Δ| equal exactly: > is not ≥
    assert np.count_nonzero(d == tie) > 1
    tols = tuple(sorted((0.0, 1e-6, 1e-5, 1e-4, 1e-3, tie)))
    for crit, chunk in itertools.product(("bitwise", f"atol:{tie!r}", "bf16rel:1e-3"), (1000, 1 << 20)):  # few pairs a chunk, many
        got, ref = diff(a, b, chunk=chunk, mask_criterion=crit, atol=tols), diff(fa, fb, chunk=chunk, mask_criterion=crit, atol=tols)
        for x, y in zip(got.tensors, ref.tensors):
            assert x.name == y.name
            assert (x.changed, x.atol, x.bf16_rel_changed, x.nonfinite) == (y.changed, y.atol, y.bf16_rel_changed, y.nonfinite), crit
            assert np.array_equal(got.mask_bits[x.name], ref.mask_bits[x.name]), (crit, x.name)
            if not x.nonfinite:
                assert x.max_abs_delta == y.max_abs_delta and x.l2_delta == pytest.approx(y.l2_delta, rel=1e-12)
                assert x.l2_base == pytest.approx(y.l2_base, rel=1e-5)  # float32 products and sums
    for x in got.tensors:
        ca, sa, va, vb, (rows, cols) = planted[x.name]
        assert (x.nonfinite > 0) == (x.name.split(".")[-2] in ("q_proj", "o_proj")) and x.quantized["scales_changed"] >= 2  # planted
        # the ULP histogram in the base's grid, computed here from the grid's own gaps
        ulp = _e4m3_ulp_by_gap()[ca.reshape(-1)] * np.repeat(np.repeat(sa.astype(np.float64), 128, 0), 128, 1)[:rows, :cols].reshape(-1)
        d = np.abs(vb - va).reshape(-1)
        ch = ((va != vb) & ~(np.isnan(va) & np.isnan(vb))).reshape(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = d[ch] / ulp[ch]
        fin = np.isfinite(r)
        want = np.zeros(len(ULP_LABELS), np.int64)
        want[0] = d.size - int(ch.sum())
        np.add.at(want, np.searchsorted(ULP_EDGES, r[fin], side="right") + 1, 1)
        want[-1] += int((~fin).sum())
        assert x.ulp_hist == dict(zip(ULP_LABELS, want.tolist())), x.name


def test_mxfp4_probes_equal_the_float64_truth(tmp_path):
    """The same for MXFP4: every count, norm and mask of a pair with a third of its nibbles moved and a quarter of
    its 32-value groups rescaled equals the diff of transformers' own float64 dequantization of both sides."""
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    rng = np.random.default_rng(11)
    p = "model.layers.0.mlp.experts.gate_up_proj"
    blocks = rng.integers(0, 256, (2, 40, 6, 16), dtype=np.uint8)
    scales = rng.integers(118, 130, (2, 40, 6), dtype=np.uint8)
    tb, ts = blocks.copy(), scales.copy()
    moved = rng.random(tb.shape) < 0.33
    tb[moved] ^= rng.integers(1, 256, int(moved.sum()), dtype=np.uint8)
    ts[rng.random(ts.shape) < 0.25] += 1
    base = {p + "_blocks": torch.from_numpy(blocks), p + "_scales": torch.from_numpy(scales)}
    tuned = {p + "_blocks": torch.from_numpy(tb), p + "_scales": torch.from_numpy(ts)}
    cfg = {"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}}
    a, b = save_folder(tmp_path / "a", base, config=cfg), save_folder(tmp_path / "b", tuned, config=cfg)

    def values(sd):  # transformers' own dequantization, transposed back to the files' row order
        return _convert_moe_packed_tensors(sd[p + "_blocks"], sd[p + "_scales"], dtype=torch.float64).transpose(1, 2).contiguous()

    fa, fb = save_folder(tmp_path / "fa", {p: values(base)}), save_folder(tmp_path / "fb", {p: values(tuned)})
    tols = (0.0, 1e-3, 1e-2, 0.25, 1.0)
    for crit, chunk in itertools.product(("bitwise", "atol:0.25", "bf16rel:1e-3"), (1000, 1 << 20)):
        got, ref = diff(a, b, chunk=chunk, mask_criterion=crit, atol=tols), diff(fa, fb, chunk=chunk, mask_criterion=crit, atol=tols)
        x, y = got.tensors[0], ref.tensors[0]
        assert (x.numel, x.changed, x.atol, x.bf16_rel_changed, x.max_abs_delta) == (y.numel, y.changed, y.atol, y.bf16_rel_changed, y.max_abs_delta)
        assert x.l2_delta == pytest.approx(y.l2_delta, rel=1e-12) and x.l2_base == pytest.approx(y.l2_base, rel=1e-5)  # float32 products and sums
        assert np.array_equal(got.mask_bits[p], ref.mask_bits[p]), (crit, chunk)
    assert 0 < x.changed < x.numel and x.quantized["scales_changed"] > 8


def test_whole_block_rows_give_the_counts_of_any_chunks(tmp_path, monkeypatch):
    """diff reads fp8-block parameters whose rows hold whole blocks in chunks of whole block rows (each rescaled block a
    slice): the floor, the masks and every count equal those of the generic path (chunks cut anywhere, every rescaled
    entry indexed), on a pair with most blocks rescaled and a partial last block row."""
    import importlib

    D = importlib.import_module("rlsubnet.analysis.diff")  # the module (the package exports the function as diff)
    rng = np.random.default_rng(5)
    ca, cb, _ = _random_fp8(rng, 700, 384, nan=True)
    sa = ((rng.random((6, 3)) + 0.5) * 1e-3).astype(np.float32)
    sb = sa.copy()
    sb[rng.random(sb.shape) < 0.7] *= np.float32(1.25)
    q = "model.layers.0.mlp.down_proj.weight"
    to_t = lambda c: torch.from_numpy(c).view(torch.float8_e4m3fn)
    a = save_folder(tmp_path / "a", {q: to_t(ca), q + "_scale_inv": torch.from_numpy(sa)}, config=FP8_CFG)
    b = save_folder(tmp_path / "b", {q: to_t(cb), q + "_scale_inv": torch.from_numpy(sb)}, config=FP8_CFG)
    for crit in ("bitwise", "bf16rel:1e-3"):
        fast = diff(a, b, lr_sum=1e-4, mask_criterion=crit, chunk=40000)
        monkeypatch.setattr(D, "block_row_chunk", lambda spec, chunk: None)
        slow = diff(a, b, lr_sum=1e-4, mask_criterion=crit, chunk=40000)
        monkeypatch.undo()
        x, y = fast.tensors[0], slow.tensors[0]
        assert (x.changed, x.atol, x.bf16_rel_changed, x.ulp_hist, x.floor, x.nonfinite, x.quantized) == \
            (y.changed, y.atol, y.bf16_rel_changed, y.ulp_hist, y.floor, y.nonfinite, y.quantized)
        assert np.array_equal(fast.mask_bits[q], slow.mask_bits[q]) and x.changed > 0 and x.floor is not None
