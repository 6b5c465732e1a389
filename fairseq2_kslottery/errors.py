"""Exceptions users can meet. Each keeps the offending values and reads as one full sentence.

The command line maps every :class:`KSLotteryError` to a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

from pathlib import Path

from fairseq2_kslottery.ks import KSInputError

__all__ = [
    "KSLotteryError",
    "KSInputError",
    "SourceError",
    "TicketFileError",
    "SelectionError",
]


class KSLotteryError(Exception):
    """Base class of the errors that come from user input rather than from a bug."""


class SourceError(KSLotteryError):
    """A model/embedding source cannot be read (missing, unreadable, no embedding tensor, unsupported layout)."""

    def __init__(self, source: str | Path, reason: str) -> None:
        super().__init__(f"Cannot read the embedding from `{source}`: {reason}")
        self.source = str(source)
        self.reason = reason


class TicketFileError(KSLotteryError):
    """A ticket file is missing, truncated, of another format or version, or inconsistent."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"`{path}` is not a valid ticket file: {reason}")
        self.path = str(path)
        self.reason = reason


class SelectionError(KSLotteryError):
    """A selection rule cannot be applied (k out of range, alpha outside (0, 1), unknown correction, ...)."""


# KSInputError lives in the pure-tensor ks module (no package imports there), so it is listed here explicitly.
USER_ERRORS: tuple[type[Exception], ...] = (KSLotteryError, KSInputError)
"""Exception types the command line reports as one-line user errors (exit code 2)."""


def is_user_error(exc: BaseException) -> bool:
    """True when ``exc`` comes from bad input rather than from a bug."""
    return isinstance(exc, USER_ERRORS)
