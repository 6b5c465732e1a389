"""Prompt templates, defined once, by name.

A template turns a source sentence into the prompt; the training target is always ``" " + tgt`` followed by EOS,
and the loss covers the target tokens only. Placeholders: ``{src_lang}``, ``{tgt_lang}`` (English language names),
``{src}``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Final

from fairseq2_kslottery.data.languages import language_name
from fairseq2_kslottery.errors import KSLotteryError

__all__ = ["TEMPLATES", "PromptTemplate", "get_template", "TemplateError"]

TEMPLATES: Final[dict[str, str]] = {
    # The Alpaca-style instruction prompt of the paper's pipeline.
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate the following sentences from {src_lang} to {tgt_lang}.\n\n"
        "### Input:\n{src}\n\n### Response:"
    ),
    "plain": "Translate the following sentence from {src_lang} to {tgt_lang}.\n{src_lang}: {src}\n{tgt_lang}:",
}

_FIELDS: Final = {"src_lang", "tgt_lang", "src"}


class TemplateError(KSLotteryError):
    pass


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    text: str

    def prompt(self, src: str, src_lang: str, tgt_lang: str) -> str:
        """The prompt for one source sentence (language codes are turned into names)."""
        return self.text.format(src=src, src_lang=language_name(src_lang), tgt_lang=language_name(tgt_lang))

    @staticmethod
    def target(tgt: str) -> str:
        """The target text (EOS is appended by the tokenizer's response encoder)."""
        return " " + tgt.strip()


def get_template(name_or_text: str) -> PromptTemplate:
    """A template by name (``alpaca``, ``plain``) or a user template string containing ``{src}``."""
    if name_or_text in TEMPLATES:
        return PromptTemplate(name_or_text, TEMPLATES[name_or_text])
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(name_or_text) if f is not None}
    except ValueError as exc:
        raise TemplateError(f"The prompt template is not a valid format string ({exc}).") from None
    if "src" not in fields:
        raise TemplateError(
            f"`{name_or_text}` is neither a template name ({', '.join(TEMPLATES)}) nor a template string with a "
            "`{src}` placeholder."
        )
    unknown = fields - _FIELDS
    if unknown:
        raise TemplateError(
            f"The prompt template uses unknown placeholder(s) {', '.join(sorted(unknown))}; "
            f"allowed are {', '.join(sorted(_FIELDS))}."
        )
    return PromptTemplate("custom", name_or_text)
