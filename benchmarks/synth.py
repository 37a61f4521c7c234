"""Synthetic Llama-style checkpoint pairs for the benchmarks, written straight to sharded safetensors.

Values are random bf16 numbers of realistic magnitude; the tuned copy has a planted fraction of elements
moved by 1-3 ULPs (what RL updates mostly look like after the bf16 cast). Generation streams tensor by
tensor, so it needs memory for one tensor, not for the model.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np


def llama_shapes(hidden: int, layers: int, vocab: int, inter: int) -> list[tuple[str, tuple[int, ...]]]:
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (hidden, hidden)),
            (p + "self_attn.v_proj.weight", (hidden, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def config(hidden, layers, vocab, inter, heads) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "num_hidden_layers": layers, "vocab_size": vocab, "intermediate_size": inter,
            "num_attention_heads": heads, "num_key_value_heads": heads, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "dtype": "bfloat16",
            "hidden_act": "silu", "rope_theta": 10000.0}


def _bf16_random(rng: np.random.Generator, n: int) -> np.ndarray:
    raw = np.frombuffer(rng.bytes(2 * n), dtype=np.uint16)
    exp = (117 + (raw >> 8) % 7).astype(np.uint16)  # |w| in about [2^-10, 2^-4)
    return (raw & np.uint16(0x807F)) | (exp << np.uint16(7))


def write_pair(out: Path, hidden=2048, layers=16, vocab=32000, inter=5632, heads=16, shard_bytes=1 << 30,
               density=0.2, seed=0, low_rank: int | None = None) -> tuple[Path, Path, int]:
    """Write ``out/base`` and ``out/tuned``; returns their paths and the planted number of changes."""
    shapes = llama_shapes(hidden, layers, vocab, inter)
    shards, cur, size = [], [], 0
    for name, shape in shapes:
        nb = int(np.prod(shape)) * 2
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nb
    shards.append(cur)
    rng = np.random.default_rng(seed)
    planted = 0
    dirs = [out / "base", out / "tuned"]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config(hidden, layers, vocab, inter, heads)))
    wm = {}
    for si, shard in enumerate(shards):
        fname = f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {}, 0
        for name, shape in shard:
            nb = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
            wm[name] = fname
        hb = json.dumps(header).encode()
        hb += b" " * (-len(hb) % 8)
        fa, fb = (open(d / fname, "wb") for d in dirs)
        for f in (fa, fb):
            f.write(struct.pack("<Q", len(hb)) + hb)
        for name, shape in shard:
            n = int(np.prod(shape))
            a = _bf16_random(rng, n)
            b = a.copy()
            sel = np.frombuffer(rng.bytes(n), dtype=np.uint8) < int(256 * density)
            if name.endswith("norm.weight"):
                sel[:] = False
            steps = (1 + np.frombuffer(rng.bytes(n), dtype=np.uint8) % 3).astype(np.uint16)
            b[sel] += steps[sel]
            planted += int(np.count_nonzero(sel))
            fa.write(a.tobytes())
            fb.write(b.tobytes())
            del a, b, sel, steps
        fa.close()
        fb.close()
    for d in dirs:
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return dirs[0], dirs[1], planted
