"""Translation metrics and the diagnostics that show what a gain is made of.

BLEU and chrF come from sacrebleu (with its signatures). Next to them:

- **first-line BLEU**: BLEU of only the first line of each hypothesis. A model that translates the first line and
  then keeps talking scores low on BLEU but high here; a gain in BLEU that vanishes here is a gain in *stopping*.
- **EOS rate**: the share of hypotheses that ended with EOS before the length limit.
- **length ratio**: mean over sentences of ``len(hypothesis) / len(reference)`` in characters.
- **spBLEU** (sacrebleu's ``flores200`` tokenisation) when its SentencePiece model is already in sacrebleu's cache;
  otherwise a one-line notice — nothing is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["TranslationScores", "score_translations", "first_line", "spbleu_model_path", "clean_hypothesis"]


@dataclass
class TranslationScores:
    num_sentences: int
    bleu: float
    chrf: float
    first_line_bleu: float
    eos_rate: float
    length_ratio: float
    spbleu: float | None
    bleu_signature: str
    chrf_signature: str
    spbleu_signature: str | None
    notice: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def first_line(text: str) -> str:
    """The first non-empty line of ``text`` (stripped); empty if there is none."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def clean_hypothesis(text: str, *, cut_at_newline: bool) -> str:
    """Post-processing of a generated continuation: strip, and optionally keep only the first line."""
    return first_line(text) if cut_at_newline else text.strip()


def spbleu_model_path() -> Path:
    """Where sacrebleu keeps the flores200 SentencePiece model (the same rule as sacrebleu itself)."""
    root = os.environ.get("SACREBLEU", os.path.join(os.path.expanduser("~"), ".sacrebleu"))
    return Path(root) / "models" / "flores200sacrebleuspm"


def score_translations(
    hypotheses: Sequence[str], references: Sequence[str], ended_with_eos: Sequence[bool]
) -> TranslationScores:
    """Corpus-level scores of ``hypotheses`` against one reference each.

    :param ended_with_eos: per hypothesis, whether generation stopped with EOS (not at the length limit).
    """
    from sacrebleu.metrics import BLEU, CHRF

    if not (len(hypotheses) == len(references) == len(ended_with_eos)):
        raise ValueError(
            f"hypotheses ({len(hypotheses)}), references ({len(references)}) and EOS flags "
            f"({len(ended_with_eos)}) must have the same length"
        )
    n = len(hypotheses)
    refs = [list(references)]
    bleu = BLEU()
    chrf = CHRF()
    bleu_score = bleu.corpus_score(list(hypotheses), refs)
    chrf_score = chrf.corpus_score(list(hypotheses), refs)
    first = BLEU().corpus_score([first_line(h) for h in hypotheses], refs)

    spbleu: float | None = None
    spbleu_sig: str | None = None
    notice: str | None = None
    if spbleu_model_path().is_file():
        sp = BLEU(tokenize="flores200")
        spbleu = sp.corpus_score(list(hypotheses), refs).score
        spbleu_sig = str(sp.get_signature())
    else:
        notice = (
            f"spBLEU skipped: the flores200 SentencePiece model is not in sacrebleu's cache ({spbleu_model_path()}); "
            "nothing is downloaded."
        )

    ratios = [len(h) / max(len(r), 1) for h, r in zip(hypotheses, references, strict=True)]
    return TranslationScores(
        num_sentences=n,
        bleu=bleu_score.score,
        chrf=chrf_score.score,
        first_line_bleu=first.score,
        eos_rate=(sum(bool(e) for e in ended_with_eos) / n) if n else 0.0,
        length_ratio=(sum(ratios) / n) if n else 0.0,
        spbleu=spbleu,
        bleu_signature=str(bleu.get_signature()),
        chrf_signature=str(chrf.get_signature()),
        spbleu_signature=spbleu_sig,
        notice=notice,
    )
