"""Aligning two checkpoints of one model by tensor name.

Tensors present in only one checkpoint, tied aliases (counted once) and shape mismatches are reported as
skipped with a reason. With ``common_slice`` a shape mismatch in the leading dimension (a resized
vocabulary) is compared over the shared leading rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from .checkpoint import Checkpoint, TensorInfo
from .errors import InputError


@dataclass
class Pair:
    """Two tensors to compare, over their first ``numel`` elements (all of them unless sliced)."""

    name: str
    a: TensorInfo
    b: TensorInfo
    numel: int
    shape: tuple[int, ...]
    sliced: bool = False


@dataclass
class Skipped:
    name: str
    reason: str


def align(base: Checkpoint, tuned: Checkpoint, common_slice: bool = False) -> tuple[list[Pair], list[Skipped]]:
    """Pairs of same-named tensors, and the names that cannot be compared (with why)."""
    pairs: list[Pair] = []
    skipped: list[Skipped] = []
    names = list(base.tensors) + [n for n in tuned.tensors if n not in base.tensors]
    for name in names:
        tied = base.aliases.get(name) or tuned.aliases.get(name)
        if tied:
            skipped.append(Skipped(name, f"tied to {tied} (counted once)"))
            continue
        a, b = base.tensors.get(name), tuned.tensors.get(name)
        if a is None or b is None:
            skipped.append(Skipped(name, "only in tuned" if a is None else "only in base"))
            continue
        if a.shape != b.shape:
            if common_slice and len(a.shape) == len(b.shape) >= 1 and a.shape[1:] == b.shape[1:]:
                rows = min(a.shape[0], b.shape[0])
                shape = (rows, *a.shape[1:])
                pairs.append(Pair(name, a, b, int(prod(shape)), shape, sliced=True))
                skipped.append(
                    Skipped(name, f"shape mismatch {list(a.shape)} vs {list(b.shape)}: compared the first {rows} rows only")
                )
            else:
                hint = " (use --common-slice to compare the shared leading rows)" if len(a.shape) == len(b.shape) and a.shape[1:] == b.shape[1:] else ""
                skipped.append(Skipped(name, f"shape mismatch {list(a.shape)} vs {list(b.shape)}{hint}"))
            continue
        pairs.append(Pair(name, a, b, a.numel, a.shape))
    if not pairs:
        raise InputError(f"{base.path} and {tuned.path}: the two checkpoints have no tensor in common.")
    return pairs, skipped
