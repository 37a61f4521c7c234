"""Masked training whose optimizer state follows the subnetwork: memory proportional to the mask.

:class:`SparseMaskedOptimizer` keeps, per parameter, the flat positions of its mask (int32 where they fit)
once, and Adam/AdamW moments (or SGD momentum buffers) for those entries only. Each step gathers the
masked entries of the parameter and its gradient, runs torch's own single-tensor Adam/AdamW/SGD
(``torch.optim.adam.adam`` / ``torch.optim.sgd.sgd``, ``foreach=False``, the implementation ``adamw_torch``
uses on the CPU) on them, and scatters the result back. The arithmetic is element by element the
arithmetic of :class:`~rlsubnet.training.masked.MaskedOptimizer` over a dense state, so the trained
checkpoint is bit-identical (weight decay applied inside the mask by the same multiplication, gradients
masked in place after each backward so clipping and accumulation see the masked gradient).

Memory per parameter at density d: 4·d bytes of positions (8 above 2^31 entries) + 8·d bytes of Adam
moments, instead of 8 bytes of dense moments. For a model held in bf16, ``master_dtype=torch.float32`` adds
an fp32 master copy of the masked entries only (fp32 moments too), rounded into the bf16 parameters after
each step: entries outside the mask keep their bits, entries inside follow the fp32 master exactly as a
dense fp32-master reference with a masked gradient does.
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam as _adam
from torch.optim.sgd import sgd as _sgd

from .layout import local


class SparseMaskedOptimizer(torch.optim.Optimizer):
    """Adam, AdamW or SGD(momentum) over the masked entries only (``kind``: ``adam`` | ``adamw`` | ``sgd``)."""

    def __init__(self, param_groups, masks: dict[torch.nn.Parameter, torch.Tensor], kind: str = "adamw",
                 defaults: dict | None = None, master_dtype: torch.dtype | None = None):
        if kind not in ("adam", "adamw", "sgd"):
            raise ValueError(f"sparse optimizer state supports adam, adamw and sgd, not {kind!r}")
        self.kind = kind
        self.master_dtype = master_dtype  # e.g. float32 for bf16 parameters: a master copy of the masked entries only
        d = dict(defaults or {})
        for impl in ("fused", "foreach"):  # how torch runs the arithmetic, not what it computes: the gathered entries
            d.pop(impl, None)             # go through torch's single-tensor implementation (see sparse_from)
        for bad in ("amsgrad", "maximize", "nesterov", "capturable", "differentiable"):
            if d.get(bad):
                raise ValueError(f"sparse optimizer state does not support {bad}=True")
        d.setdefault("weight_decay", 0.0)
        super().__init__(param_groups, d)
        self.index: dict[torch.nn.Parameter, torch.Tensor | None] = {}
        for p, m in masks.items():  # under FSDP2: p is a DTensor and m the mask of this process's shard
            lp = local(p)
            if tuple(m.shape) != tuple(lp.shape):
                raise ValueError(f"mask shape {tuple(m.shape)} does not match parameter shape {tuple(lp.shape)}")
            idx = torch.nonzero(m.reshape(-1).to(torch.bool), as_tuple=False).reshape(-1)
            self.index[p] = idx.to(torch.int32 if lp.numel() < 2**31 else torch.int64).to(lp.device)
        self._hooks = [p.register_post_accumulate_grad_hook(self._mask_grad) for p in self.index if p.requires_grad]

    def _mask_grad(self, p: torch.Tensor) -> None:
        """Zero the gradient outside the mask, in place (clipping then sees the masked gradient)."""
        idx = self.index[p]
        g = local(p.grad).view(-1)
        keep = g[idx]
        g.zero_()
        g[idx] = keep

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _work_dtype(self, p: torch.Tensor) -> torch.dtype:
        return self.master_dtype if self.master_dtype is not None and p.dtype != self.master_dtype else p.dtype

    def _init_state(self, p: torch.Tensor, ps: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:
            k, dt = ps.numel(), self._work_dtype(p)
            if dt != p.dtype:
                st["master"] = ps.to(dt)  # fp32 master values of the masked entries, rounded into p each step
            if self.kind == "sgd":
                st["momentum_buffer"] = None
            else:
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
                st["exp_avg"] = torch.zeros(k, dtype=dt, device=p.device)
                st["exp_avg_sq"] = torch.zeros(k, dtype=dt, device=p.device)
        return st

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            lr, wd = g["lr"], g.get("weight_decay", 0.0)
            for p in g["params"]:
                if p.grad is None:
                    continue
                idx = self.index.get(p)
                flat, gflat = local(p).view(-1), local(p.grad).view(-1)
                ps = flat[idx] if idx is not None else flat.clone()
                gs = gflat[idx] if idx is not None else gflat.clone()
                st = self._init_state(p, ps)
                if "master" in st:  # bf16 parameter: the update runs on the fp32 master, then rounds into p
                    ps = st["master"]
                    gs = gs.to(ps.dtype)
                if wd:  # exactly as MaskedOptimizer applies it (inside the mask; everywhere for unmasked params)
                    if self.kind == "adamw":
                        ps.mul_(torch.tensor(1 - lr * wd, dtype=ps.dtype, device=p.device) if idx is not None else 1 - lr * wd)
                    else:
                        gs.add_(ps * 1 if idx is not None else ps, alpha=wd)
                if self.kind == "sgd":
                    bufs = [st["momentum_buffer"]]
                    _sgd([ps], [gs], bufs, foreach=False, weight_decay=0.0, momentum=g.get("momentum", 0.0),
                                        lr=lr, dampening=g.get("dampening", 0.0), nesterov=False, maximize=False)
                    st["momentum_buffer"] = bufs[0]
                else:
                    b1, b2 = g["betas"]
                    _adam([ps], [gs], [st["exp_avg"]], [st["exp_avg_sq"]], [], [st["step"]], foreach=False,
                                          capturable=False, differentiable=False, fused=None, has_complex=False,
                                          decoupled_weight_decay=False, amsgrad=False, beta1=b1, beta2=b2, lr=lr,
                                          weight_decay=0.0, eps=g["eps"], maximize=False)
                if idx is not None:
                    flat[idx] = ps.to(p.dtype)
                else:
                    flat.copy_(ps)
        return loss

    def state_bytes(self) -> int:
        """Bytes of optimizer state and mask positions (what the dense state would replace)."""
        n = sum(int(i.numel() * i.element_size()) for i in self.index.values() if i is not None)
        for st in self.state.values():
            for v in st.values():
                if torch.is_tensor(v):
                    n += v.numel() * v.element_size()
        return n

    def mask_digest(self) -> str:
        """sha256 of the mask this state belongs to: every parameter's size and masked positions, in order."""
        import hashlib

        h = hashlib.sha256()
        for p, idx in self.index.items():
            h.update(f"{local(p).numel()}|{'all' if idx is None else idx.numel()}\n".encode())
            if idx is not None:
                h.update(idx.to(torch.int64).cpu().numpy().tobytes())
        return h.hexdigest()

    def state_dict(self) -> dict:
        """torch's optimizer state plus ``mask_digest``: the state is meaningful only with the mask it was built for."""
        sd = super().state_dict()
        sd["mask_digest"] = self.mask_digest()
        return sd

    def load_state_dict(self, state_dict) -> None:
        """Load a state saved by :meth:`state_dict`; refused (``ValueError``) when it was saved with another mask,
        even one of the same size, since its moments belong to other entries."""
        state_dict = dict(state_dict)
        digest = state_dict.pop("mask_digest", None)
        if digest is None:
            raise ValueError("this optimizer state records no mask digest, so the mask it was saved with cannot be "
                             "checked; it was not saved by SparseMaskedOptimizer.state_dict()")
        if digest != self.mask_digest():
            raise ValueError("this optimizer state was saved with another mask (its mask digest differs); "
                             "resume with the mask the run was started with")
        super().load_state_dict(state_dict)
        for p, idx in self.index.items():
            st = self.state.get(p) or {}
            for k in ("exp_avg", "exp_avg_sq", "momentum_buffer", "master"):
                v = st.get(k)
                if torch.is_tensor(v) and idx is not None and v.numel() != idx.numel():
                    raise ValueError(f"optimizer state '{k}' has {v.numel()} entries, the mask has {idx.numel()}: "
                                     "it was saved with another mask")

    def __repr__(self) -> str:
        k = sum(int(i.numel()) for i in self.index.values() if i is not None)
        return f"SparseMaskedOptimizer({self.kind}, {k:,} entries with state)"


def sparse_from(optimizer: torch.optim.Optimizer, masks: dict, master_dtype: torch.dtype | None = None) -> SparseMaskedOptimizer:
    """The sparse-state version of a freshly built torch optimizer (same groups and hyperparameters).

    With ``master_dtype=torch.float32`` and bf16 parameters, an fp32 master copy of the masked entries (and fp32
    moments) is kept and rounded into the bf16 parameters after each step: about 2 + 16·d bytes per parameter
    at density d (bf16 weights, fp32 master and two moments, int32 positions) instead of 16 for mixed-precision
    AdamW with a full fp32 master.
    """
    if isinstance(optimizer, torch.optim.AdamW):
        kind = "adamw"
    elif isinstance(optimizer, torch.optim.Adam):
        kind = "adamw" if optimizer.defaults.get("decoupled_weight_decay") else "adam"
    elif isinstance(optimizer, torch.optim.SGD):
        kind = "sgd"
    else:
        raise ValueError(f"sparse optimizer state supports Adam, AdamW and SGD, not {type(optimizer).__name__}")
    groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in optimizer.param_groups]
    if optimizer.defaults.get("fused") or optimizer.defaults.get("foreach"):
        import warnings

        warnings.warn("sparse optimizer state runs torch's single-tensor implementation on the masked entries; the "
                      f"{'fused' if optimizer.defaults.get('fused') else 'foreach'} implementation the optimizer was built "
                      "with (e.g. transformers' default optim='adamw_torch_fused') is not used, so the result equals the "
                      "dense masked run of optim='adamw_torch', bit for bit", stacklevel=2)
    return SparseMaskedOptimizer(groups, masks, kind, defaults=dict(optimizer.defaults), master_dtype=master_dtype)
