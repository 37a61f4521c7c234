"""The one exception type a user's mistake turns into.

Every layer raises :class:`InputError` for bad input (a missing path, a corrupt file, an unsafe pickle,
an invalid option). The CLI prints its message as one sentence and exits with code 2.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input from the user: the message names the file and the problem in one sentence."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message
