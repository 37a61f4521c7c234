"""Exact masked training: only the entries inside a mask ever change.

:class:`MaskedOptimizer` wraps any ``torch.optim`` optimizer (AdamW, Adam, SGD with momentum, Adagrad,
RMSprop, ...) and guarantees that every parameter entry outside the mask stays bit-identical (±0 aside),
without a second copy of the weights:

1. a post-accumulate-grad hook multiplies each parameter's gradient by its mask in place, right after
   every backward, so gradient clipping and accumulation only see the masked gradient (as in the paper:
   g ← m ⊙ ∇L);
2. on the first step (and after ``load_state_dict``), optimizer state tensors shaped like the parameter
   (Adam's moments, momentum buffers) are zeroed outside the mask, so a state carried over from another
   mask cannot move a frozen entry; from then on zero gradients keep that state at exactly zero, and
   with zero gradient and zero state these optimizers compute an update of exactly 0;
3. weight decay is taken out of the inner optimizer and applied by the wrapper inside the mask only
   (decoupled, as AdamW does, for AdamW; added to the masked gradient, as Adam/SGD do, otherwise).

With a full mask the arithmetic is the same as without the wrapper, so the run is bit-identical.
Memory: one byte per parameter for the boolean masks.

Under data parallelism (DDP) nothing changes: each process masks its local gradient before the
all-reduce reads it (the hook runs inside the gradient accumulator, before DDP's reducer hook), so the
averaged gradient is exactly zero outside the mask. Under FSDP2 (``fully_shard``) parameters are
DTensors: build the optimizer after sharding; each process keeps the shard of the mask that matches its
shard of the parameter (:func:`shard_like`), and every masking operation works on the local shard
(FSDP2 calls post-accumulate-grad hooks on the sharded gradient after its reduce-scatter).
"""

from __future__ import annotations

import os
from typing import Iterable

import torch

from ..io.errors import InputError
from ..masks.subnetwork import Subnetwork
from .layout import local, shard_like


class MaskedOptimizer(torch.optim.Optimizer):
    """An optimizer that trains only the entries inside ``masks`` (``{parameter: bool tensor}``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, masks: dict[torch.nn.Parameter, torch.Tensor], mask_order: str = "before-clip"):
        # state and param_groups stay the inner optimizer's own objects (forwarded by the properties
        # below); the base class still sets up its hooks and step patching, so register_step_pre_hook
        # and friends work on the wrapper
        self.optimizer = optimizer
        self._wrapping = True
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self._wrapping = False
        self.masks = {p: m.to(device=p.device, dtype=torch.bool) for p, m in masks.items()}  # local shards under FSDP2
        for p, m in self.masks.items():
            if m.shape != local(p).shape:
                raise ValueError(f"mask shape {tuple(m.shape)} does not match parameter shape {tuple(local(p).shape)}")
        self.decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(optimizer.defaults.get("decoupled_weight_decay"))
        for g in optimizer.param_groups:
            g["masked_weight_decay"] = g.get("weight_decay", 0.0)
            g["weight_decay"] = 0.0
        if mask_order not in ("before-clip", "after-clip"):
            raise ValueError(f"mask_order={mask_order!r}: expected 'before-clip' or 'after-clip'")
        # before-clip (the paper's g ← m ⊙ ∇L): the hook masks each gradient as it accumulates, so clipping
        # sees the masked norm; after-clip: the trainer clips the dense gradient, the step masks it
        self.after_clip = mask_order == "after-clip"
        self._hooks = [] if self.after_clip else [p.register_post_accumulate_grad_hook(self._hook(m)) for p, m in self.masks.items() if p.requires_grad]
        self._state_clean = False  # optimizer state may hold values outside the mask (carried over)

    @staticmethod
    def _hook(mask: torch.Tensor):
        def fn(p: torch.Tensor) -> None:
            local(p.grad).mul_(mask)  # in place, right after accumulation: clipping sees the masked gradient

        return fn

    # -- forwarding --------------------------------------------------------------------------------------
    @property
    def param_groups(self):  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        if not self.__dict__.get("_wrapping"):  # the base class's __init__ must not replace the inner's
            self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value):
        if not self.__dict__.get("_wrapping"):  # the base class's __init__ must not replace the inner's
            self.optimizer.state = value

    @property
    def defaults(self):  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        if not self.__dict__.get("_wrapping"):  # the base class's __init__ must not replace the inner's
            self.optimizer.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)
        self._state_clean = False
        for g in self.optimizer.param_groups:
            g.setdefault("masked_weight_decay", g.get("weight_decay", 0.0))
            g["weight_decay"] = 0.0

    def add_param_group(self, param_group) -> None:
        if self.__dict__.get("_wrapping"):
            return  # the base class's __init__ re-adding the inner optimizer's own groups
        raise NotImplementedError("add parameters before wrapping the optimizer in MaskedOptimizer")

    def __repr__(self) -> str:
        n = sum(int(m.numel()) for m in self.masks.values())
        k = sum(int(m.sum()) for m in self.masks.values())
        return f"MaskedOptimizer({type(self.optimizer).__name__}, {k:,} of {n:,} entries trainable)"

    # -- the step ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        for g in self.optimizer.param_groups:
            wd, lr = g.get("masked_weight_decay", 0.0), g["lr"]
            for p in g["params"]:
                m = self.masks.get(p)
                if self.after_clip and m is not None and p.grad is not None:
                    local(p.grad).mul_(m)
                if not self._state_clean and m is not None:
                    # once: zero state carried over from another mask; afterwards the zero gradient
                    # outside the mask keeps Adam's moments and momentum buffers at exactly zero there
                    st = self.optimizer.state.get(p)
                    for v in (st or {}).values():
                        if torch.is_tensor(v) and v.shape == p.shape:
                            local(v).mul_(m)
                if wd and p.grad is not None:
                    if m is None:
                        if self.decoupled:
                            p.mul_(1 - lr * wd)
                        else:
                            p.grad.add_(p, alpha=wd)
                    elif self.decoupled:
                        local(p).mul_(torch.where(m, torch.tensor(1 - lr * wd, dtype=p.dtype, device=m.device), torch.ones((), dtype=p.dtype, device=m.device)))
                    else:
                        local(p.grad).add_(local(p) * m, alpha=wd)
        self._state_clean = True
        return self.optimizer.step(closure)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def masks_for_model(model: torch.nn.Module, subnetwork: Subnetwork | str | os.PathLike, missing: str = "error",
                    strip_prefixes: Iterable[str] = ("policy.", "module.", "_orig_mod.")) -> dict:
    """``{parameter: bool mask}`` for a model's named parameters, matched by name to a mask file.

    Parameter names are tried as they are and with ``strip_prefixes`` removed (TRL's PPO wraps the policy
    as ``policy.*``). A parameter that transformers holds in another layout than its files (fused MoE experts
    such as ``mlp.experts.gate_up_proj``) gets the mask converted by transformers' own mapping
    (:func:`rlsubnet.training.layout.to_model_layout`). Parameters that the mask does not name are an error (``missing="error"``), fully
    trainable (``"train"``, e.g. a value head) or fully frozen (``"freeze"``).
    For parameters sharded by FSDP2 the mask returned is this process's shard (:func:`shard_like`).
    """
    sub = subnetwork if isinstance(subnetwork, Subnetwork) else Subnetwork.load(subnetwork)
    out = {}
    converted: dict | None = None

    def model_layout() -> dict:
        """The mask in the model's in-memory layout (fused MoE experts, renamed keys), computed once if needed."""
        nonlocal converted
        if converted is None:
            from .layout import conversions, to_model_layout

            converted = (to_model_layout(model, {n: sub.bool_tensor(n) for n in sub.names}, source=str(sub.path or "mask"), strict=False)
                         if conversions(model) else {})
        return converted

    def lookup(name: str, table) -> str | None:
        return name if name in table else next((name[len(s):] for s in strip_prefixes if name.startswith(s) and name[len(s):] in table), None)

    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = lookup(name, sub.shapes)
        if key is None and lookup(name, model_layout()) is not None:  # a file-layout mask for a converted parameter
            m = model_layout()[lookup(name, model_layout())]
            if tuple(m.shape) != tuple(p.shape):
                raise InputError(f"{sub.path or 'mask'}: converted to the model's layout, '{name}' has shape {list(m.shape)}, "
                                 f"the model's parameter has {list(p.shape)}.")
            out[p] = shard_like(m.to(torch.bool), p)
            continue
        if key is None:
            if missing == "train":
                continue
            if missing == "freeze":
                out[p] = torch.zeros(local(p).shape, dtype=torch.bool, device=p.device)
                continue
            raise InputError(f"{sub.path or 'mask'}: has no entry for the model's parameter '{name}'.")
        if tuple(sub.shapes[key]) != tuple(p.shape):
            raise InputError(f"{sub.path or 'mask'}: entry '{key}' has shape {list(sub.shapes[key])}, the model's parameter has {list(p.shape)}.")
        out[p] = shard_like(sub.bool_tensor(key), p)
    return out


def decay_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names that get weight decay, as transformers' Trainer decides (not biases, not norms)."""
    from transformers.trainer_pt_utils import get_parameter_names

    try:
        from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    except ImportError:  # pragma: no cover
        ALL_LAYERNORM_LAYERS = [torch.nn.LayerNorm]
    names = get_parameter_names(model, ALL_LAYERNORM_LAYERS, ["bias", "layernorm", "rmsnorm", "norm"])
    return [n for n in names if "bias" not in n]


def build_masked_optimizer(model: torch.nn.Module, args, subnetwork: Subnetwork | str | os.PathLike | None,
                           num_training_steps: int | None = None, missing: str = "error", sparse_state: bool = False,
                           master_dtype: torch.dtype | None = None, mask_order: str = "before-clip"):
    """The (optimizer, scheduler) pair a Trainer would build from ``args``, with the mask applied.

    Pass the result as ``optimizers=(opt, sched)`` to any TRL trainer or transformers' ``Trainer``.
    With ``subnetwork=None`` the plain optimizer is returned (wrapped with a full mask it would be the same).

    ``num_training_steps`` sizes the learning-rate schedule. When it is ``None`` it is taken from
    ``args.max_steps``; with an epoch-based config (``max_steps = -1``) the scheduler is returned as
    ``None`` and the trainer builds it itself once it knows the number of steps (transformers'
    ``Trainer.create_scheduler``), so the schedule is never sized for zero steps. An explicit value that
    is not a positive integer is refused.

    ``sparse_state=True`` keeps optimizer state for the masked entries only
    (:class:`~rlsubnet.training.sparse.SparseMaskedOptimizer`: Adam, AdamW or SGD), with a checkpoint
    bit-identical to the dense masked run. With it, ``master_dtype=torch.float32`` keeps an fp32 master copy
    of the masked entries of bf16 parameters (and fp32 moments), rounded into the parameters after each step.

    ``mask_order="before-clip"`` (the default, the paper's g ← m ⊙ ∇L) masks each gradient as it accumulates,
    so gradient clipping sees the masked norm; ``"after-clip"`` lets the trainer clip the dense gradient and
    masks it in the step (dense optimizer state only).
    """
    from transformers import Trainer, get_scheduler

    if num_training_steps is None:
        steps = getattr(args, "max_steps", -1)
        num_training_steps = steps if isinstance(steps, int) and steps > 0 else None
    elif not isinstance(num_training_steps, int) or num_training_steps <= 0:
        raise ValueError(
            f"num_training_steps={num_training_steps!r}: the schedule needs a positive number of steps; pass None "
            "to let the trainer size it (needed with an epoch-based config, where max_steps is -1)"
        )
    decay = set(decay_parameter_names(model))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    opt = opt_cls(groups, **opt_kwargs)
    if subnetwork is not None:
        masks = masks_for_model(model, subnetwork, missing=missing)
        if sparse_state:
            from .sparse import sparse_from

            if mask_order != "before-clip":
                raise InputError(f"mask_order={mask_order!r}: masking after clipping needs dense optimizer state (sparse_state=False).")

            try:
                opt = sparse_from(opt, masks, master_dtype=master_dtype)
            except ValueError as e:
                raise InputError(f"sparse_state=True: {e}.") from None
        else:
            opt = MaskedOptimizer(opt, masks, mask_order=mask_order)
    elif sparse_state:
        raise InputError("sparse_state=True: keeps optimizer state for a mask's entries, so it needs a subnetwork (a mask).")
    if master_dtype is not None and not (subnetwork is not None and sparse_state):
        raise InputError("master_dtype: keeps master copies of a mask's entries, so it needs a subnetwork and sparse_state=True.")
    if num_training_steps is None:
        return opt, None
    sched = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=args.get_warmup_steps(num_training_steps),
                          num_training_steps=num_training_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs or {})
    return opt, sched
