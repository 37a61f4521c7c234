"""Saving trained models as normal Hugging Face checkpoint folders in a chosen dtype, atomically."""

from __future__ import annotations

from pathlib import Path

import torch

from ..io.atomic import atomic_dir


def save_as(model: torch.nn.Module, path: str | Path, dtype: torch.dtype, tokenizer=None, state_dict: dict | None = None) -> str:
    """``save_pretrained`` of ``model`` with every floating tensor cast to ``dtype``.

    The model itself is not modified: the cast state dict is passed to ``save_pretrained``.
    ``state_dict`` replaces ``model.state_dict()`` (the gathered full tensors of a sharded model).
    """
    sd = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu())
          for k, v in (model.state_dict() if state_dict is None else state_dict).items()}
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        cfg = tmp / "config.json"
        if cfg.exists():
            import json

            c = json.loads(cfg.read_text())
            c["torch_dtype"] = c["dtype"] = str(dtype).removeprefix("torch.")
            cfg.write_text(json.dumps(c, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return str(path)
