"""Strict JSON: every JSON rlsubnet writes parses with any strict parser.

Python's ``json`` writes ``NaN`` and ``Infinity`` for non-finite floats, which is not JSON. Here every
non-finite float becomes ``null``. Its documented meaning: *the number is undefined or not finite*
(a ratio with a zero denominator, such as the density of an empty mask's overlap or ‖A−B‖/‖A−INIT‖
when A equals INIT, or a norm of non-finite weights; the tensor's ``nonfinite`` count or a note says
which).
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, scalars) with non-finite floats replaced by ``None``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if hasattr(obj, "item") and hasattr(obj, "dtype") and getattr(obj, "ndim", 1) == 0:  # numpy scalar
        return finite_or_none(obj.item())
    return obj


def dumps(obj: Any, indent: int | None = 2, default=None, flat_below: int | None = None) -> str:
    """``json.dumps`` that never writes NaN or Infinity (they become ``null``).

    ``flat_below=L`` (with ``indent``): containers nested deeper than ``L`` levels are written on one line each (one
    tensor a line, say) by the C encoder, where Python's indenting encoder, pure Python, takes about twice as long.
    The same JSON value either way."""
    obj = finite_or_none(obj)
    if indent is None or flat_below is None:
        return json.dumps(obj, indent=indent, allow_nan=False, default=default)
    enc = json.JSONEncoder(allow_nan=False, separators=(", ", ": "), default=default).encode
    return _layout(obj, indent, flat_below, 0, enc, default)


def _layout(obj: Any, indent: int, depth: int, level: int, enc, default) -> str:
    if level >= depth or not isinstance(obj, (dict, list)) or not obj:
        return enc(obj)
    if isinstance(obj, dict) and not all(isinstance(k, str) for k in obj):  # keys json would convert: its own way
        return json.dumps(obj, indent=indent, allow_nan=False, default=default).replace("\n", "\n" + " " * (indent * level))
    pad, end = "\n" + " " * (indent * (level + 1)), "\n" + " " * (indent * level)
    if isinstance(obj, dict):
        items = [enc(k) + ": " + _layout(v, indent, depth, level + 1, enc, default) for k, v in obj.items()]
        return "{" + pad + ("," + pad).join(items) + end + "}"
    items = [_layout(v, indent, depth, level + 1, enc, default) for v in obj]
    return "[" + pad + ("," + pad).join(items) + end + "]"
