"""Recognising the layer index and the module kind of a parameter from its name.

Covers the naming schemes of Llama, Mistral, Qwen, Gemma (``model.layers.N.self_attn.q_proj``), GPT-2
(``transformer.h.N.attn.c_attn``), GPT-NeoX (``gpt_neox.layers.N.attention.query_key_value``), Falcon,
Phi and the original Llama (``layers.N.attention.wq``).
"""

from __future__ import annotations

import re

KINDS = ("embedding", "q", "k", "v", "qkv", "o", "gate", "up", "down", "norm", "head", "other")

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_PAPER_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")

# (kind, pattern) tried in order against the name; the first match wins.
_RULES: list[tuple[str, re.Pattern]] = [
    ("norm", re.compile(r"(norm|ln_\w*|\.ln\d*\.|_ln\.|layernorm|rms)", re.I)),
    ("head", re.compile(r"(^|\.)(lm_head|embed_out)\.|^(output|score)\.")),
    ("embedding", re.compile(r"(embed_tokens|embed_in|wte|wpe|word_embeddings|tok_embeddings|embed_positions|position_embeddings|embeddings)\.")),
    ("qkv", re.compile(r"(c_attn|qkv_proj|query_key_value|Wqkv|\.qkv\.)")),
    ("q", re.compile(r"(q_proj|\.query\.|\.wq\.|\.q\.)")),
    ("k", re.compile(r"(k_proj|\.key\.|\.wk\.|\.k\.)")),
    ("v", re.compile(r"(v_proj|\.value\.|\.wv\.|\.v\.)")),
    ("o", re.compile(r"(o_proj|out_proj|attn\.c_proj|attention\.dense|self_attention\.dense|\.wo\.|attention\.output\.dense)")),
    ("gate", re.compile(r"(gate_proj|\.w1\.|gate_up_proj)")),
    ("up", re.compile(r"(up_proj|c_fc|fc1|dense_h_to_4h|\.w3\.|intermediate\.dense)")),
    ("down", re.compile(r"(down_proj|mlp\.c_proj|fc2|dense_4h_to_h|\.w2\.|output\.dense)")),
]


def layer_index(name: str) -> int | None:
    """The transformer block index a parameter belongs to, or None (embeddings, head, final norm)."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def paper_layer_index(name: str) -> int | None:
    """The index used by the paper's layer-wise mean: only names ``model.layers.{i}.*``."""
    m = _PAPER_LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def module_kind(name: str) -> str:
    """One of :data:`KINDS`."""
    for kind, pat in _RULES:
        if pat.search(name):
            return kind
    return "other"
