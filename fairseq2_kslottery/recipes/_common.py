"""Pieces shared by this package's fairseq2 recipes."""

from __future__ import annotations

from fairseq2.logging import log
from fairseq2.recipe.cli import register_cli_error
from fairseq2.runtime.dependency import DependencyContainer

from fairseq2_kslottery.errors import KSInputError, SelectionError, SourceError, TicketFileError
from fairseq2_kslottery.vocab import TokenizerError

# fairseq2 maps exceptions to exit codes by exact type, so every concrete user-error type is listed.
USER_ERROR_TYPES: tuple[type[Exception], ...] = (
    KSInputError,
    SelectionError,
    SourceError,
    TicketFileError,
    TokenizerError,
)


def _user_error(exc: Exception) -> int:
    log.error("{}", exc)
    return 2


def register_user_errors(container: DependencyContainer) -> None:
    """Make the recipe CLI report this package's user errors in one line with exit code 2."""
    for kls in USER_ERROR_TYPES:
        register_cli_error(container, kls, _user_error)
