"""Mixture-of-experts layouts: which tensor is a router, a shared expert, or routed expert ``e`` of layer ``L``.

Both layouts transformers writes are recognised:

- per-expert tensors: ``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`` (DeepSeek-V3/R1, Qwen3-MoE,
  Kimi K2, GLM-4.5) and Mixtral's ``model.layers.L.block_sparse_moe.experts.E.w{1,2,3}.weight``;
- fused tensors whose first dimension is the expert: ``model.layers.L.mlp.experts.gate_up_proj`` /
  ``down_proj`` (and their ``_bias``; gpt-oss, transformers 5), counted per expert by flat ranges.

Routers are ``mlp.gate.weight`` (DeepSeek, Qwen3-MoE), ``block_sparse_moe.gate.weight`` (Mixtral) and
``mlp.router.weight``/``.bias`` (gpt-oss); shared experts ``mlp.shared_experts.*`` (DeepSeek) and
``mlp.shared_expert.*`` (Qwen2-MoE), with ``shared_expert_gate``. Load-balancing biases that the trainer moves
without gradients (DeepSeek's ``e_score_correction_bias``) are reported apart from the router.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LAYER = r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\."
_PER_EXPERT = re.compile(_LAYER + r"(?:mlp|block_sparse_moe|moe|feed_forward)\.experts\.(\d+)\.")
_FUSED = re.compile(_LAYER + r"(?:mlp|block_sparse_moe|moe|feed_forward)\.experts\.(gate_up_proj|down_proj|gate_proj|up_proj)(_bias|_blocks|_scales)?$")
_SHARED = re.compile(_LAYER + r"(?:mlp|moe|feed_forward)\.(?:shared_experts?|shared_expert_gate)\.")
_ROUTER_BIAS = re.compile(_LAYER + r"(?:mlp|moe)\.gate\.e_score_correction_bias$")
_ROUTER = re.compile(_LAYER + r"(?:(?:mlp|moe)\.(?:gate|router)|block_sparse_moe\.gate)\.(?:weight|bias)$")


@dataclass(frozen=True)
class ExpertRole:
    """Where a tensor sits in a MoE layer: ``role`` is router | router_bias | shared | expert | fused."""

    layer: int
    role: str
    expert: int | None = None  # routed expert index (per-expert layout)


def expert_role(name: str) -> ExpertRole | None:
    """The MoE role of a parameter name, or None for tensors outside MoE layers."""
    m = _ROUTER_BIAS.search(name)
    if m:
        return ExpertRole(int(m.group(1)), "router_bias")
    m = _PER_EXPERT.search(name)
    if m:
        return ExpertRole(int(m.group(1)), "expert", int(m.group(2)))
    m = _FUSED.search(name)
    if m:
        return ExpertRole(int(m.group(1)), "fused")
    m = _SHARED.search(name)
    if m:
        return ExpertRole(int(m.group(1)), "shared")
    m = _ROUTER.search(name)
    if m:
        return ExpertRole(int(m.group(1)), "router")
    return None


def moe_section(tensors, per_expert: dict[str, list[int]]) -> dict | None:
    """The JSON ``moe`` section from a diff's tensors (``numel``/``changed``/``shape``) and, for fused expert
    tensors, their changed counts per expert; None for a model without experts."""
    layers: dict[int, dict] = {}

    def acc(d: dict, numel: int, changed: int) -> None:
        d["numel"] = d.get("numel", 0) + numel
        d["changed"] = d.get("changed", 0) + changed

    for t in tensors:
        r = expert_role(t.name)
        if r is None:
            continue
        L = layers.setdefault(r.layer, {"layer": r.layer, "router": {}, "router_bias": None, "shared": {}, "experts": {}})
        if r.role == "router":
            acc(L["router"], t.numel, t.changed)
        elif r.role == "router_bias":
            L["router_bias"] = L["router_bias"] or {}
            acc(L["router_bias"], t.numel, t.changed)
        elif r.role == "shared":
            acc(L["shared"], t.numel, t.changed)
        elif r.role == "expert":
            acc(L["experts"].setdefault(r.expert, {}), t.numel, t.changed)
        else:
            counts = per_expert.get(t.name)
            if counts is None or not t.shape:
                continue
            per = t.numel // len(counts)
            for e, c in enumerate(counts):
                acc(L["experts"].setdefault(e, {}), per, int(c))
    if not any(L["experts"] for L in layers.values()):
        return None
    out_layers = []
    tot_e = tot_u = 0
    for k in sorted(layers):
        L = layers[k]
        ex = [{"expert": e, **L["experts"][e]} for e in sorted(L["experts"])]
        untouched = sum(1 for x in ex if x["changed"] == 0)
        tot_e += len(ex)
        tot_u += untouched
        out_layers.append({"layer": k, "router": L["router"] or None, "router_bias": L["router_bias"],
                           "shared": L["shared"] or None, "experts": ex, "experts_total": len(ex), "experts_untouched": untouched})
    return {"layers": out_layers, "experts_total": tot_e, "experts_untouched": tot_u,
            "note": "router_bias: load-balancing biases (e_score_correction_bias) that training moves without gradients, apart from the router"}
