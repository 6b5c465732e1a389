"""Parallel-text sources: every malformed-input class is reported with file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fairseq2_kslottery.data.languages import UnknownLanguageError, language_name
from fairseq2_kslottery.data.parallel import DataError, ReadReport, read_split
from fairseq2_kslottery.data.templates import TemplateError, get_template


def _jsonl(path: Path, rows: list[object]) -> None:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")


def test_builtin_smoke_text_has_all_splits() -> None:
    sizes = {s: len(read_split("builtin:smoke_en_de", s, "en", "de")) for s in ("train", "valid", "test")}
    assert sizes == {"train": 48, "valid": 8, "test": 8}
    ex = read_split("builtin:smoke_en_de", "train", "en", "de")[0]
    assert (ex.src, ex.tgt, ex.src_lang, ex.tgt_lang) == ("The house is small.", "Das Haus ist klein.", "en", "de")
    assert ex.origin.endswith("train.jsonl:1")


def test_jsonl_bad_lines_are_skipped_counted_and_located(tmp_path: Path) -> None:
    _jsonl(
        tmp_path / "train.jsonl",
        [
            {"src": "a", "tgt": "b"},
            "{not json",
            {"src": "only source"},
            {"src": "  ", "tgt": "x"},
            [1, 2],
            {"src": "c", "tgt": "d", "tgt_lang": "fr"},
        ],
    )
    report = ReadReport()
    got = read_split(str(tmp_path), "train", "en", "de", report=report)
    assert [(e.src, e.tgt, e.tgt_lang) for e in got] == [("a", "b", "de"), ("c", "d", "fr")]
    assert report.kept == 2 and report.num_skipped == 4
    assert report.problems == [
        f"{tmp_path}/train.jsonl:2: bad JSON",
        f"{tmp_path}/train.jsonl:3: missing `src` or `tgt`",
        f"{tmp_path}/train.jsonl:4: empty side",
        f"{tmp_path}/train.jsonl:5: not a JSON object",
    ]


def test_tsv_and_invalid_utf8(tmp_path: Path) -> None:
    (tmp_path / "valid.tsv").write_bytes(b"hello\thallo\nno tab here\n\xff\xfe bad\tbytes\nbye\ttschuess\n")
    report = ReadReport()
    got = read_split(str(tmp_path), "valid", "en", "de", report=report)
    assert [(e.src, e.tgt) for e in got] == [("hello", "hallo"), ("bye", "tschuess")]
    assert report.problems == [
        f"{tmp_path}/valid.tsv:3: invalid UTF-8",
        f"{tmp_path}/valid.tsv:2: fewer than 2 tab-separated columns",
    ]


def test_file_pair_with_mismatched_line_counts(tmp_path: Path) -> None:
    (tmp_path / "train.en").write_text("one\ntwo\nthree\n", encoding="utf-8")
    (tmp_path / "train.de").write_text("eins\nzwei\n", encoding="utf-8")
    report = ReadReport()
    got = read_split(str(tmp_path), "train", "en", "de", report=report)
    assert [(e.src, e.tgt) for e in got] == [("one", "eins"), ("two", "zwei")]
    assert report.problems == [f"{tmp_path}/train.en:3: no aligned line (train.en has 3 lines, train.de 2)"]


def test_file_pair_with_a_missing_side(tmp_path: Path) -> None:
    (tmp_path / "train.en").write_text("one\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train.de` is missing: a plain-text pair needs both"):
        read_split(str(tmp_path), "train", "en", "de")


def test_nothing_usable_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"train.jsonl` holds no usable sentence pair\.$"):
        read_split(str(tmp_path), "train", "en", "de")
    _jsonl(tmp_path / "test.jsonl", ["{oops", {"src": "", "tgt": ""}])
    with pytest.raises(
        DataError, match=r"holds no usable sentence pair \(0 pairs, 2 lines skipped .*test.jsonl:1: bad"
    ):
        read_split(str(tmp_path), "test", "en", "de")
    with pytest.raises(DataError, match=r"has no valid data: expected valid.jsonl, valid.tsv, or valid.en \+ valid.de"):
        read_split(str(tmp_path), "valid", "en", "de")
    assert read_split(str(tmp_path), "valid", "en", "de", required=False) == []
    with pytest.raises(DataError, match=r"folder `/no/where` does not exist"):
        read_split("/no/where", "train", "en", "de")
    with pytest.raises(DataError, match=r"no built-in parallel text `nope`"):
        read_split("builtin:nope", "train", "en", "de")


def test_templates_and_language_names() -> None:
    plain = get_template("plain")
    assert plain.prompt("Hello.", "en", "de") == (
        "Translate the following sentence from English to German.\nEnglish: Hello.\nGerman:"
    )
    assert plain.target(" Hallo. ") == " Hallo."
    alpaca = get_template("alpaca").prompt("Hi", "eng", "cat")
    assert "from English to Catalan" in alpaca and alpaca.endswith("### Input:\nHi\n\n### Response:")
    assert get_template("{src} => ({tgt_lang})").prompt("x", "en", "fr") == "x => (French)"
    with pytest.raises(TemplateError, match=r"neither a template name \(alpaca, plain\) nor a template string"):
        get_template("no placeholder")
    with pytest.raises(TemplateError, match=r"unknown placeholder\(s\) tgt"):
        get_template("{src} {tgt}")
    assert language_name("deu_Latn") == "German" and language_name("RO") == "Romanian"
    with pytest.raises(UnknownLanguageError, match=r"Unknown language code `xx`"):
        language_name("xx")


def test_encoding_drops_overlong_examples_and_counts_target_tokens(fairseq2_ready: None) -> None:
    import numpy as np
    from fairseq2.data.tokenizers import load_tokenizer

    from fairseq2_kslottery.data.dataset import ParallelDataset, ParallelDatasetConfig

    tokenizer = load_tokenizer("kslottery_smoke_tokenizer")
    dataset = ParallelDataset(ParallelDatasetConfig(max_seq_len=64))
    encoded = dataset.encoded("train", tokenizer)
    assert len(encoded) == 48
    first = encoded[0]
    assert first.prompt[0].item() == tokenizer.vocab_info.bos_idx  # prompt mode adds BOS for this tokenizer
    assert first.target[-1].item() == tokenizer.vocab_info.eos_idx  # the target ends with EOS
    counts = dataset.target_token_counts(tokenizer, 400)
    assert counts[tokenizer.vocab_info.eos_idx] == 48
    assert counts.sum() == sum(e.target.numel() for e in encoded)
    expected = np.bincount(np.concatenate([e.target.numpy() for e in encoded]), minlength=400)
    assert np.array_equal(counts, expected)
    short = ParallelDataset(ParallelDatasetConfig(max_seq_len=40)).encoded("train", tokenizer)
    assert 0 < len(short) < 48 and all(e.prompt.numel() + e.target.numel() <= 40 for e in short)
    with pytest.raises(DataError, match=r"No train example fits in max_seq_len=8 tokens \(48 dropped\)"):
        ParallelDataset(ParallelDatasetConfig(max_seq_len=8)).encoded("train", tokenizer)


def test_training_reader_mixes_sources_and_carries_target_masks(fairseq2_ready: None, tmp_path: Path) -> None:
    from fairseq2.data.tokenizers import load_tokenizer
    from fairseq2.device import CPU
    from fairseq2.gang import create_fake_gangs

    from fairseq2_kslottery.data.dataset import ParallelDataset, ParallelDatasetConfig, ParallelSourceConfig

    _jsonl(tmp_path / "train.jsonl", [{"src": f"house {i}", "tgt": f"maison {i}"} for i in range(12)])
    config = ParallelDatasetConfig(
        sources=[ParallelSourceConfig(), ParallelSourceConfig(path=str(tmp_path), src_lang="en", tgt_lang="fr")],
        max_seq_len=64,
    )
    tokenizer = load_tokenizer("kslottery_smoke_tokenizer")
    reader = ParallelDataset(config).create_train_reader(tokenizer, create_fake_gangs(CPU), batch_size=4, seed=1)
    refs: list[str] = []
    for batches in reader:
        for batch in batches:
            assert batch.target_mask is not None
            # Target positions are a suffix of each sequence: the loss never covers prompt tokens.
            for row, length in zip(batch.target_mask, batch.seq_lens, strict=True):
                first = int(row.int().argmax())
                assert row[:first].sum() == 0 and row[first:length].all() and not row[length:].any()
            refs.extend(batch.example["ref"])
    assert {r for r in refs if r.startswith("maison")} == {f"maison {i}" for i in range(12)}
    assert sum(1 for r in refs if not r.startswith("maison")) == 48  # every pair of both sources, once per epoch
