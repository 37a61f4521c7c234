"""Masking before or after gradient clipping (``mask_order``), against a hand-written reference step."""

from __future__ import annotations

import pytest
import torch

from rlsubnet.training.masked import MaskedOptimizer


def _step(order: str, clip: float):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16, bias=False)
    w0 = lin.weight.detach().clone()
    mask = torch.rand(16, 16) < 0.3
    opt = MaskedOptimizer(torch.optim.SGD(lin.parameters(), lr=0.5), {lin.weight: mask}, mask_order=order)
    x = torch.randn(4, 16)
    loss = (lin(x) ** 2).sum()
    loss.backward()
    g_seen = lin.weight.grad.detach().clone()  # what clipping sees
    torch.nn.utils.clip_grad_norm_(lin.parameters(), clip)
    opt.step()
    # the reference, from the dense gradient
    lin2 = torch.nn.Linear(16, 16, bias=False)
    lin2.weight.data.copy_(w0)
    (lin2(x) ** 2).sum().backward()
    g = lin2.weight.grad.detach()
    if order == "before-clip":
        g = g * mask
        g = g * min(1.0, clip / (float(g.norm()) + 1e-6))
    else:
        g = g * min(1.0, clip / (float(g.norm()) + 1e-6))
        g = g * mask
    return lin.weight.detach(), w0, mask, w0 - 0.5 * g, g_seen


@pytest.mark.parametrize("order", ["before-clip", "after-clip"])
def test_mask_order_against_reference(order):
    w, w0, mask, ref, g_seen = _step(order, clip=0.1)
    assert torch.equal(w[~mask], w0[~mask])  # frozen entries bit-identical either way
    assert torch.allclose(w, ref, rtol=0, atol=1e-6)
    # before-clip: the norm clipping saw is the masked one; after-clip: the dense one
    assert (g_seen[~mask].abs().sum() == 0) == (order == "before-clip")


def test_orders_differ_when_clipping_binds():
    a = _step("before-clip", clip=0.1)[0]
    b = _step("after-clip", clip=0.1)[0]
    assert not torch.equal(a, b)  # the dense norm is larger, so after-clip moves less
    assert (b - _step("after-clip", clip=0.1)[1]).norm() < (a - _step("before-clip", clip=0.1)[1]).norm()


def test_unknown_order_is_refused():
    from rlsubnet.training.config import ConfigError, TrainConfig, validate_config

    with pytest.raises(ConfigError, match="mask_order"):
        validate_config(TrainConfig(algo="dpo", model="m", mask_order="sideways"))
    with pytest.raises(ConfigError, match="mask_order"):
        validate_config(TrainConfig(algo="dpo", model="m", mask_order="after-clip", sparse_state=True))
    with pytest.raises(ConfigError, match="lr_schedule"):
        validate_config(TrainConfig(algo="dpo", model="m", lr_schedule="triangle"))
    with pytest.raises(ConfigError, match="warmup_ratio"):
        validate_config(TrainConfig(algo="dpo", model="m", warmup_ratio=1.5))
    with pytest.raises(ValueError):
        MaskedOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1), {}, mask_order="x")


def test_new_options_keep_old_run_keys():
    """Runs cached before lr_schedule, warmup_ratio and mask_order existed keep their keys at the defaults."""
    from rlsubnet.training.config import TrainConfig

    a = TrainConfig(algo="dpo", model="", steps=3)
    assert a.key() != TrainConfig(algo="dpo", model="", steps=3, lr_schedule="linear").key()
    import dataclasses
    import hashlib
    import json

    d = dataclasses.asdict(a)
    for k in ("out", "sparse_state", "master_in_mask", "fsdp", "lr_schedule", "warmup_ratio", "mask_order"):
        d.pop(k)
    assert a.key() == hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
