"""Small number formatters shared by every renderer."""

from __future__ import annotations

import math


def pct(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.{digits}f}%"


def num(x: int) -> str:
    return f"{x:,}"


def tol(t: float) -> str:
    return "0 (exact)" if t == 0 else f"{t:g}"


def sci(x: float) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}"


def printable(s: object) -> str:
    """``s`` with control and format characters (ESC, BEL, bidi overrides, ...) shown as escapes.

    Names read from files are data: a tensor or file name must never move the cursor, change colours
    or reorder text on the user's terminal.
    """
    import unicodedata

    text = str(s)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") else c for c in text)


def safe(s: object) -> str:
    """``s`` made printable and escaped for Rich markup (``[/red]`` in a name prints as itself)."""
    from rich.markup import escape

    return escape(printable(s))
