"""Pieces shared by this package's fairseq2 recipes."""

from __future__ import annotations

from fairseq2.logging import log
from fairseq2.recipe.cli import register_cli_error
from fairseq2.runtime.dependency import DependencyContainer

from fairseq2_kslottery.errors import KSInputError, KSLotteryError


def _user_error(exc: Exception) -> int:
    log.error("{}", exc)
    return 2


def user_error_types() -> list[type[Exception]]:
    """Every concrete user-error class (fairseq2 maps exceptions to exit codes by exact type, not by base class)."""
    found: list[type[Exception]] = [KSInputError]
    pending: list[type[Exception]] = [KSLotteryError]
    while pending:
        kls = pending.pop()
        found.append(kls)
        pending.extend(kls.__subclasses__())
    return list(dict.fromkeys(found))


def register_user_errors(container: DependencyContainer) -> None:
    """Make the recipe CLI report this package's user errors in one line with exit code 2."""
    for kls in user_error_types():
        register_cli_error(container, kls, _user_error)
