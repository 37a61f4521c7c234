"""Names read from files are data: make them safe to show on a terminal and in Rich markup."""

from __future__ import annotations

import unicodedata

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn


def printable(s: object) -> str:
    """``s`` with control and format characters (ESC, BEL, bidi overrides, ...) shown as escapes.

    A tensor or file name must never move the cursor, change colours or reorder text on the terminal.
    """
    text = str(s)
    if text.isprintable():
        return text
    return "".join(c.encode("unicode_escape").decode("ascii")
                   if not c.isprintable() and c != " " and unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
                   else c for c in text)


def safe(s: object) -> str:
    """``s`` made printable and escaped for Rich markup (``[/red]`` in a name prints as itself)."""
    from rich.markup import escape

    return escape(printable(s))


def make_progress(enabled: bool = True) -> Progress:
    """A rich progress bar on stderr that measures bytes read."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=True,
    )
