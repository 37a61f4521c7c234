"""Aligning two checkpoints of one model by tensor name.

Tensors present in only one checkpoint, tied heads (counted once) and shape mismatches are reported as
skipped with a reason. With ``common_slice`` a shape mismatch in the leading dimension (a resized
vocabulary) is compared over the shared leading rows.

Tied output heads follow transformers' own rule: a checkpoint ties its head to its input embedding when
its ``config.json`` says ``tie_word_embeddings`` or, where the key is absent, when the default of its
``model_type``'s config class says so (GPT-2: tied; Llama: untied). A head is skipped as "counted once"
only when *both* checkpoints tie it and each stored head is bit-identical to its own embedding; a head
whose stored values differ from the embedding is always compared. When one checkpoint ties (and so
stores no head) and the other stores one, the stored head is compared with the tying checkpoint's
embedding, which is that model's head.

Non-parameter buffers that old checkpoints store (GPT-2's ``attn.bias`` causal mask, ``masked_bias``,
rotary ``inv_freq``, ``position_ids``) are marked ``buffer=True``: they are compared, but reported apart
from the parameters and never counted in a sparsity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import prod

from .checkpoint import EMBED_NAMES, HEAD_NAMES, Checkpoint, TensorInfo
from .errors import InputError

_BUFFER_RE = re.compile(
    r"(^|\.)(inv_freq|original_inv_freq|masked_bias|position_ids|relative_position_index|_float_tensor)$"
    r"|(^|\.)(attn|attention)\.bias$"
)


def is_buffer(name: str) -> bool:
    """True for names transformers models register as buffers, not parameters, that old checkpoints store."""
    return bool(_BUFFER_RE.search(name))


@dataclass
class Pair:
    """Two tensors to compare, over their first ``numel`` elements (all of them unless sliced).

    ``src_a``/``src_b`` name the stored tensor read on each side (the name itself, except where a tied
    checkpoint's embedding stands in for its head).
    """

    name: str
    a: TensorInfo
    b: TensorInfo
    numel: int
    shape: tuple[int, ...]
    sliced: bool = False
    buffer: bool = False
    src_a: str = ""
    src_b: str = ""

    def __post_init__(self) -> None:
        self.src_a = self.src_a or self.name
        self.src_b = self.src_b or self.name


@dataclass
class Skipped:
    name: str
    reason: str


def embedding_name(ck: Checkpoint) -> str | None:
    """The name of the input embedding a head can be tied to, if the checkpoint stores one."""
    return next((e for e in EMBED_NAMES if e in ck.tensors), None)


def align(base: Checkpoint, tuned: Checkpoint, common_slice: bool = False) -> tuple[list[Pair], list[Skipped]]:
    """Pairs of same-named tensors, and the names that cannot be compared (with why)."""
    pairs: list[Pair] = []
    skipped: list[Skipped] = []
    names = list(base.tensors) + [n for n in tuned.tensors if n not in base.tensors]
    emb_a, emb_b = embedding_name(base), embedding_name(tuned)
    for name in names:
        a, b = base.tensors.get(name), tuned.tensors.get(name)
        src_a = src_b = name
        if name in HEAD_NAMES:
            if a is not None and b is not None:
                if (base.ties_head() and tuned.ties_head() and emb_a and emb_b
                        and base.same_bits(name, emb_a) and tuned.same_bits(name, emb_b)):
                    skipped.append(Skipped(name, f"tied to {emb_a} and identical to it in both checkpoints (counted once)"))
                    continue
            elif a is None and b is not None and base.ties_head() and emb_a:
                if tuned.ties_head() and emb_b and tuned.same_bits(name, emb_b):
                    skipped.append(Skipped(name, f"tied to {emb_b} in both checkpoints (counted once)"))
                    continue
                a, src_a = base.tensors[emb_a], emb_a  # base's head is its embedding
            elif b is None and a is not None and tuned.ties_head() and emb_b:
                if base.ties_head() and emb_a and base.same_bits(name, emb_a):
                    skipped.append(Skipped(name, f"tied to {emb_a} in both checkpoints (counted once)"))
                    continue
                b, src_b = tuned.tensors[emb_b], emb_b  # tuned's head is its embedding
        if a is None or b is None:
            skipped.append(Skipped(name, "only in tuned" if a is None else "only in base"))
            continue
        buf = is_buffer(name)
        if a.shape != b.shape:
            if common_slice and len(a.shape) == len(b.shape) >= 1 and a.shape[1:] == b.shape[1:]:
                rows = min(a.shape[0], b.shape[0])
                shape = (rows, *a.shape[1:])
                pairs.append(Pair(name, a, b, int(prod(shape)), shape, sliced=True, buffer=buf, src_a=src_a, src_b=src_b))
                skipped.append(
                    Skipped(name, f"shape mismatch {list(a.shape)} vs {list(b.shape)}: compared the first {rows} rows only")
                )
            else:
                hint = " (use --common-slice to compare the shared leading rows)" if len(a.shape) == len(b.shape) and a.shape[1:] == b.shape[1:] else ""
                skipped.append(Skipped(name, f"shape mismatch {list(a.shape)} vs {list(b.shape)}{hint}"))
            continue
        pairs.append(Pair(name, a, b, a.numel, a.shape, buffer=buf, src_a=src_a, src_b=src_b))
    if not any(not p.buffer for p in pairs):
        raise InputError(f"{base.path} and {tuned.path}: the two checkpoints have no tensor in common (non-parameter buffers aside).")
    return pairs, skipped


def tie_notes(pairs: list[Pair]) -> list[str]:
    """Sentences for the pairs where a tied checkpoint's embedding stood in for its head."""
    notes = []
    for p in pairs:
        if p.src_a != p.name:
            notes.append(f"{p.name}: base ties it to {p.src_a} (stores no head), so tuned's {p.name} was compared with base's {p.src_a}")
        if p.src_b != p.name:
            notes.append(f"{p.name}: tuned ties it to {p.src_b} (stores no head), so tuned's {p.src_b} was compared with base's {p.name}")
    return notes
