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


def dumps(obj: Any, indent: int | None = 2, default=None) -> str:
    """``json.dumps`` that never writes NaN or Infinity (they become ``null``)."""
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False, default=default)
