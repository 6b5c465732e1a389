"""Human-readable token texts and a tokenizer fingerprint, for ticket files and reports.

Reads tokenizer files directly (no model, no fairseq2 pipeline): SentencePiece ``.model``, Hugging Face
``tokenizer.json``, or tiktoken BPE files (LLaMA-3's ``tokenizer.model``). A fairseq2 tokenizer asset-card name is
resolved to its local file first.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fairseq2_kslottery.errors import KSLotteryError
from fairseq2_kslottery.io import file_fingerprint

__all__ = ["TokenizerError", "TokenVocabulary", "load_token_vocabulary"]


class TokenizerError(KSLotteryError):
    """A tokenizer cannot be read or does not fit the embedding."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"Cannot use the tokenizer `{source}`: {reason}")
        self.source = source
        self.reason = reason


@dataclass
class TokenVocabulary:
    """Token id -> display text (``' the'``, ``'\\n'``...), plus the tokenizer's size and fingerprint."""

    source: str
    path: Path
    size: int
    fingerprint: str
    _text: Callable[[int], str]

    def text(self, token_id: int) -> str:
        """What token ``token_id`` stands for; rows beyond the tokenizer (padded vocabularies) say so."""
        if not 0 <= token_id < self.size:
            return f"<row {token_id}: not in tokenizer>"
        return self._text(token_id)


def load_token_vocabulary(spec: str) -> TokenVocabulary:
    """Load the tokenizer named by ``spec``: a file, a folder holding one, or a fairseq2 tokenizer card name.

    :raises TokenizerError: nothing readable is found.
    """
    path = Path(spec).expanduser()
    if not path.exists():
        if "/" in spec or Path(spec).suffix:
            raise TokenizerError(spec, "no such file or directory.")
        from fairseq2_kslottery.sources import resolve_card_paths

        _, tok_path = resolve_card_paths(spec)
        if tok_path is None or not tok_path.exists():
            raise TokenizerError(spec, "the asset card names no local tokenizer file.")
        path = tok_path
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            models = sorted(path.glob("*.model"))
            if not models:
                raise TokenizerError(spec, "the folder holds no tokenizer.json or .model file.")
            path = models[0]
    size, text = _open(path, spec)
    return TokenVocabulary(source=spec, path=path, size=size, fingerprint=file_fingerprint(path), _text=text)


def _open(path: Path, spec: str) -> tuple[int, Callable[[int], str]]:
    if path.name.endswith(".json"):
        return _open_hf(path, spec)
    try:
        return _open_sentencepiece(path)
    except (RuntimeError, OSError):
        pass
    try:
        return _open_tiktoken(path)
    except (ValueError, UnicodeDecodeError, OSError):
        raise TokenizerError(spec, f"`{path.name}` is neither a SentencePiece nor a tiktoken model.") from None


def _open_hf(path: Path, spec: str) -> tuple[int, Callable[[int], str]]:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises plain Exception subclasses
        raise TokenizerError(spec, f"`{path.name}` cannot be read ({exc}).") from None

    def text(i: int) -> str:
        return tok.decode([i], skip_special_tokens=False) or (tok.id_to_token(i) or "")

    return tok.get_vocab_size(with_added_tokens=True), text


def _open_sentencepiece(path: Path) -> tuple[int, Callable[[int], str]]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))

    def text(i: int) -> str:
        piece = sp.id_to_piece(i)
        if sp.is_byte(i) and len(piece) == 6:  # "<0x0A>" byte-fallback pieces
            value = int(piece[3:5], 16)
            return chr(value) if value < 128 else piece
        return piece.replace("\u2581", " ")

    return sp.get_piece_size(), text


def _open_tiktoken(path: Path) -> tuple[int, Callable[[int], str]]:
    ranks: dict[int, bytes] = {}
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            token, rank = line.split()
            ranks[int(rank)] = base64.b64decode(token, validate=True)
    if not ranks:
        raise ValueError("empty")
    size = max(ranks) + 1

    def text(i: int) -> str:
        data = ranks.get(i)
        if data is None:
            return f"<special {i}>"
        return data.decode("utf-8", errors="replace")

    return size, text
