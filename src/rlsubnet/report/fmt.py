"""Small number formatters shared by every renderer."""

from __future__ import annotations

import math

from ..io.display import printable, safe  # noqa: F401  (re-exported for renderers)


def pct(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.{digits}f}%"


def num(x: int) -> str:
    return f"{x:,}"


def tol(t: float) -> str:
    return "0 (exact)" if t == 0 else f"{t:g}"

