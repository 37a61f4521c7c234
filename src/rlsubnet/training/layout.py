"""Masks between a checkpoint's layout and the in-memory model's, through transformers' own conversion.

transformers 5 loads some architectures into a layout other than their files': MoE experts stored one
tensor per expert (``mlp.experts.3.w1.weight``) become one fused parameter (``mlp.experts.gate_up_proj``,
experts stacked, gate and up concatenated), and some names are renamed. A mask is made from checkpoint
files, so it has the files' layout. :func:`to_model_layout` sends each mask tensor through exactly the
renamings and operations (``MergeModulelist``, ``Concatenate``, ...) that ``from_pretrained`` applies to
the weights of the same names, so mask entry i lands where weight entry i lands; :func:`to_file_layout`
is the inverse (transformers' ``revert_weight_conversion``, what ``save_pretrained`` uses). The
operations only move entries, so they carry boolean tensors as they carry weights.
"""

from __future__ import annotations

from copy import deepcopy

import torch

from ..io.errors import InputError


def conversions(model) -> list:
    """The model's weight transforms as ``from_pretrained`` collects them (empty when files = memory)."""
    from transformers import PreTrainedModel
    from transformers.conversion_mapping import get_model_conversion_mapping

    if not isinstance(model, PreTrainedModel):
        return []
    conv = getattr(model, "_weight_conversions", None)
    return list(conv) if conv is not None else get_model_conversion_mapping(model)


def to_model_layout(model, masks: dict[str, torch.Tensor], source: str = "mask", strict: bool = True) -> dict[str, torch.Tensor]:
    """``{model parameter name: tensor}`` from ``{checkpoint name: tensor}`` (booleans stay booleans).

    Checkpoint names that name no model parameter after conversion are refused in one sentence
    (``strict``) or left out.
    """
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = conversions(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = dict(model.named_parameters())
    prefix = getattr(model, "base_model_prefix", None)
    pending: dict[str, object] = {}
    for key, t in sorted(masks.items(), key=lambda kv: dot_natural_key(kv[0])):  # experts in order, as loading does
        name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if name not in meta and key in meta:
            name, pattern = key, None
        if name not in meta:
            if not strict:
                continue
            raise InputError(f"{source}: entry '{key}' names no parameter of the model, in the files' layout or after "
                             "transformers' conversion to the model's.")
        if pattern is not None:
            conv = pending.setdefault(name, deepcopy(by_pattern[pattern]))
        else:
            conv = pending.setdefault(name, WeightRenaming(key, name))
            pattern = key
        conv.add_tensor(name, key, pattern, (lambda t=t: t))
    out = {}
    for first, conv in pending.items():
        for name, v in conv.convert(first, model=model, config=getattr(model, "config", None)).items():
            out[name] = v[0] if isinstance(v, list) else v
    return out


def to_file_layout(model, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{checkpoint name: tensor}`` from ``{model parameter name: tensor}`` (what ``save_pretrained`` writes)."""
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(model, dict(masks)))


# -- shards: a DTensor's local part (FSDP2), used by the masked and the sparse optimizers ------------------
def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view sharing its storage), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def shard_like(mask: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The part of a full-size ``mask`` that this process holds of ``p`` (the whole mask for a plain tensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(p, DTensor):
        return mask.to(device=p.device)
    # every process read the same mask file: cut this process's shard out locally (no communication)
    return distribute_tensor(mask.to(device=p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()
