"""The one table of language codes -> English names used in prompts and reports.

Both ISO 639-1 (``de``) and ISO 639-3 (``deu``) codes are accepted; FLORES-style codes such as ``deu_Latn`` resolve
through their first part.
"""

from __future__ import annotations

from typing import Final

from fairseq2_kslottery.errors import KSLotteryError

__all__ = ["LANGUAGES", "language_name", "UnknownLanguageError"]

# (ISO 639-1, ISO 639-3, English name)
_TABLE: Final = (
    ("ar", "ara", "Arabic"),
    ("bn", "ben", "Bengali"),
    ("ca", "cat", "Catalan"),
    ("cs", "ces", "Czech"),
    ("da", "dan", "Danish"),
    ("de", "deu", "German"),
    ("el", "ell", "Greek"),
    ("en", "eng", "English"),
    ("es", "spa", "Spanish"),
    ("fa", "fas", "Persian"),
    ("fi", "fin", "Finnish"),
    ("fr", "fra", "French"),
    ("he", "heb", "Hebrew"),
    ("hi", "hin", "Hindi"),
    ("hu", "hun", "Hungarian"),
    ("id", "ind", "Indonesian"),
    ("it", "ita", "Italian"),
    ("ja", "jpn", "Japanese"),
    ("ko", "kor", "Korean"),
    ("nl", "nld", "Dutch"),
    ("no", "nor", "Norwegian"),
    ("pl", "pol", "Polish"),
    ("pt", "por", "Portuguese"),
    ("ro", "ron", "Romanian"),
    ("ru", "rus", "Russian"),
    ("sv", "swe", "Swedish"),
    ("sw", "swa", "Swahili"),
    ("th", "tha", "Thai"),
    ("tl", "tgl", "Tagalog"),
    ("tr", "tur", "Turkish"),
    ("uk", "ukr", "Ukrainian"),
    ("vi", "vie", "Vietnamese"),
    ("zh", "zho", "Chinese"),
)

LANGUAGES: Final[dict[str, str]] = {code: name for two, three, name in _TABLE for code in (two, three)}
"""Language code (ISO 639-1 or 639-3) -> English name."""


class UnknownLanguageError(KSLotteryError):
    def __init__(self, code: str) -> None:
        super().__init__(
            f"Unknown language code `{code}`. Use an ISO 639-1/639-3 code such as `de` or `deu` "
            f"(known: {', '.join(sorted(c for c in LANGUAGES if len(c) == 2))})."
        )
        self.code = code


def language_name(code: str) -> str:
    """English name of a language code (``de``, ``deu``, ``deu_Latn`` -> ``German``)."""
    key = code.strip().lower().split("_")[0].split("-")[0]
    try:
        return LANGUAGES[key]
    except KeyError:
        raise UnknownLanguageError(code) from None
