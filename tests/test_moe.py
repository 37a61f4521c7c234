"""Masks made from MoE checkpoint files (one tensor per expert) train transformers' fused in-memory experts."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlsubnet.training.layout import to_file_layout, to_model_layout

from conftest import run
from tiny import char_tokenizer, save_model


def _moe(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if kind == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        return MixtralForCausalLM(MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **common))
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                              head_dim=8, **common))


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_mask_follows_transformers_conversion_both_ways(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    folder = save_model(_moe(kind), tmp_path / "m")
    files = load_file(f"{folder}/model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(folder)
    params = dict(model.named_parameters())
    assert set(files) != set(params)  # the files' layout is not the model's (per-expert tensors vs fused)
    # independent truth: transformers loads the weights; a mask built from the same files (w > 0) must land
    # exactly where the weights land
    masks = {k: v > 0 for k, v in files.items()}
    converted = to_model_layout(model, masks)
    assert set(converted) == set(params)
    for n, p in params.items():
        assert converted[n].dtype == torch.bool and torch.equal(converted[n], p.detach() > 0), n
    back = to_file_layout(model, converted)
    assert set(back) == set(masks) and all(torch.equal(back[k], masks[k]) for k in masks)


@pytest.mark.slow
def test_file_mask_trains_fused_experts_and_verify_frozen_checks_the_files(tmp_path):
    model = _moe("mixtral")
    a = save_model(model, tmp_path / "a", char_tokenizer())
    sd = load_file(f"{a}/model.safetensors")
    g = torch.Generator().manual_seed(3)
    tuned = {}
    for k, v in sd.items():  # a "finetuned" checkpoint that moved ~20% of every expert's entries and the attention
        hit = (torch.rand(v.shape, generator=g) < 0.2) if ("experts" in k or "q_proj" in k) else torch.zeros(v.shape, dtype=torch.bool)
        tuned[k] = torch.where(hit, v + 0.01, v)
    (tmp_path / "b").mkdir()
    save_file(tuned, tmp_path / "b" / "model.safetensors")
    for f in ("config.json",):
        (tmp_path / "b" / f).write_text((tmp_path / "a" / f).read_text())
    mask = tmp_path / "mask.safetensors"
    r = run("mask", a, tmp_path / "b", "-o", mask)
    assert r.returncode == 0, r.stderr
    for extra in ([], ["--sparse-state"]):
        out = tmp_path / ("out" + "".join(extra))
        r = run("train", "--algo", "sft", "--model", a, "--mask", mask, "--out", out, "--steps", "2", "--lr", "1e-2", *extra, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        r = run("verify-frozen", a, out, mask, "--json", "-")
        assert r.returncode == 0, r.stdout + r.stderr
        rep = json.loads(r.stdout)
        assert rep["ok"] and not rep["unchecked"]
        trained = load_file(out / "model.safetensors")
        moved = sum(int((trained[k] != sd[k]).sum()) for k in sd if "experts" in k)
        assert moved > 0  # the experts trained, inside the mask only (verify-frozen)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_live_deltas_of_fused_experts_speak_the_files_names(tmp_path, kind):
    """Issue 18 (4): DeltaPublisher on a model with fused in-memory experts publishes, by default, in the
    checkpoint's own names (per-expert tensors), so a live chain applies to the files a patch or a mask names:
    applied to the saved base files, the payload gives exactly what save_pretrained writes after the step."""
    from transformers import AutoModelForCausalLM

    from rlsubnet.deltas.live import DeltaPublisher, apply_delta

    base_dir = save_model(_moe(kind), tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    pub = DeltaPublisher(model)
    assert pub.layout == "file" and DeltaPublisher(model, layout="model").layout == "model"
    with torch.no_grad():
        fused = next(p for n, p in model.named_parameters() if "experts" in n and p.dim() == 3)
        fused[1].view(-1)[:7] += 0.5  # expert 1 only
        model.model.layers[0].self_attn.q_proj.weight[0, :3] -= 0.25
    payload = pub.delta()
    files = {k: v.to(torch.bfloat16) for k, v in load_file(f"{base_dir}/model.safetensors").items()}  # the bf16 view
    assert apply_delta(files, payload) == 10
    model.save_pretrained(tmp_path / "after")
    after = load_file(str(tmp_path / "after" / "model.safetensors"))
    assert set(after) == set(files) and all(torch.equal(files[k], after[k]) for k in after)
    from rlsubnet.deltas.format import iter_updates

    names = {u[0] for u in iter_updates(payload)}
    assert names and all(n in files for n in names) and any(".experts.1." in n for n in names)
    with pytest.raises(ValueError, match="layout"):
        DeltaPublisher(model, layout="fused")
