"""Token texts and tokenizer fingerprints."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import sentencepiece as spm

from conftest import SENTENCES
from fairseq2_kslottery.vocab import TokenizerError, load_token_vocabulary


def test_sentencepiece_pieces_become_readable_text(sp_model: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    vocab = load_token_vocabulary(str(sp_model))
    assert vocab.size == sp.get_piece_size()
    assert vocab.text(sp.piece_to_id("<0x0A>")) == "\n"
    the = sp.piece_to_id("\u2581the")
    assert the != sp.unk_id() and vocab.text(the) == " the"
    assert vocab.text(vocab.size + 3) == f"<row {vocab.size + 3}: not in tokenizer>"
    # The same file, found through its folder, has the same fingerprint; another file does not.
    assert load_token_vocabulary(str(sp_model.parent)).fingerprint == vocab.fingerprint


def test_hugging_face_tokenizer_json(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES * 10, trainers.BpeTrainer(vocab_size=200, special_tokens=["<|endoftext|>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    vocab = load_token_vocabulary(str(tmp_path))
    assert vocab.size == tok.get_vocab_size()
    the = tok.token_to_id("\u0120the")  # byte-level BPE spells a leading space as U+0120
    assert the is not None and vocab.text(the) == " the"
    assert vocab.text(0) == "<|endoftext|>"


def test_tiktoken_file(tmp_path: Path) -> None:
    lines = [base64.b64encode(t).decode() + f" {i}" for i, t in enumerate([b"a", b"\n", b" the", b"\xe2\x82"])]
    path = tmp_path / "tokenizer.model"
    path.write_text("\n".join(lines) + "\n")
    vocab = load_token_vocabulary(str(path))
    assert vocab.size == 4
    assert [vocab.text(i) for i in range(3)] == ["a", "\n", " the"]
    assert vocab.text(3) == "\ufffd"  # a partial UTF-8 sequence is shown as the replacement character


def test_unreadable_tokenizers(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"no such file or directory"):
        load_token_vocabulary(str(tmp_path / "nope.model"))
    (tmp_path / "junk.model").write_bytes(b"\x00\x01\x02 not a model")
    with pytest.raises(TokenizerError, match=r"is neither a SentencePiece nor a tiktoken model"):
        load_token_vocabulary(str(tmp_path / "junk.model"))
