"""`fairseq2-kslottery select` on checkpoints made with fairseq2's model API, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import TinyPaths
from fairseq2_kslottery.cli import main
from fairseq2_kslottery.tickets import TicketSet

REPO = Path(__file__).resolve().parents[1]


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["select", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_select_top_k_on_native_checkpoints(
    tiny: TinyPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tickets.json"
    code, stdout, _ = _run(
        capsys,
        "--base",
        str(tiny.base_run / "checkpoints" / "model.yaml"),
        "--tuned",
        str(tiny.tuned_run / "checkpoints" / "step_1"),
        "--top-k",
        str(len(tiny.shifted)),
        "--out",
        str(out),
    )
    assert code == 0
    tickets = TicketSet.load(out)
    assert sorted(tickets.token_ids) == sorted(tiny.shifted)
    assert tickets.rule == {"kind": "top_k", "k": len(tiny.shifted)}
    assert tickets.vocab_size == tiny.vocab_size and tickets.embed_dim == 64
    assert tickets.summary["rows_changed"] == len(tiny.shifted) + 40
    assert tickets.base_fingerprint and tickets.base_fingerprint.startswith("blake2b-128:")
    assert tickets.tokens is None  # no tokenizer known for a bare checkpoint
    assert tickets.certificate is not None and tickets.certificate["certified"]
    # The table lists every ticket id and the certificate.
    for tid in tiny.shifted:
        assert f" {tid} " in stdout
    assert "KS certificate at alpha=0.05" in stdout and "CERTIFIED" in stdout


def test_select_alpha_on_hugging_face_safetensors_with_tokenizer(
    tiny: TinyPaths, sp_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sentencepiece as spm

    out = tmp_path / "tickets.json"
    stats = tmp_path / "stats.safetensors"
    code, stdout, _ = _run(
        capsys,
        "--base",
        str(tiny.hf_base),
        "--tuned",
        str(tiny.hf_tuned),
        "--alpha",
        "0.01",
        "--correction",
        "bonferroni",
        "--tokenizer",
        str(sp_model),
        "--stats-out",
        str(stats),
        "--out",
        str(out),
    )
    assert code == 0
    tickets = TicketSet.load(out)
    assert sorted(tickets.token_ids) == sorted(tiny.shifted)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert tickets.tokens is not None
    for tid, text in zip(tickets.token_ids, tickets.tokens, strict=True):
        if not sp.is_byte(tid):
            assert text == sp.id_to_piece(tid).replace("\u2581", " ")
    assert tickets.tokenizer_fingerprint and tickets.certificate["correction"] == "bonferroni"
    assert tickets.certificate["certified"]
    from safetensors.torch import load_file

    saved = load_file(str(stats))
    assert saved["statistic"].shape == (tiny.vocab_size,)
    assert saved["pvalue"][list(tiny.shifted)].max() < 0.01 / tiny.vocab_size


def test_select_matches_between_fairseq2_and_hugging_face_layouts(
    tiny: TinyPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert (
        _run(capsys, "--base", str(tiny.base_run), "--tuned", str(tiny.tuned_run), "--top-k", "9", "--out", str(a))[0]
        == 0
    )
    assert (
        _run(capsys, "--base", str(tiny.hf_base), "--tuned", str(tiny.hf_tuned), "--top-k", "9", "--out", str(b))[0]
        == 0
    )
    ta, tb = TicketSet.load(a), TicketSet.load(b)
    assert ta.token_ids == tb.token_ids and ta.statistics == tb.statistics and ta.pvalues == tb.pvalues


def test_select_by_card_name_decodes_tokens_with_the_cards_tokenizer(
    tiny: TinyPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "t.json"
    code, stdout, _ = _run(
        capsys, "--base", "test_tiny_base", "--tuned", str(tiny.tuned_run), "--top-k", "3", "--out", str(out)
    )
    assert code == 0
    tickets = TicketSet.load(out)
    assert tickets.tokens is not None and len(tickets.tokens) == 3
    assert repr(tickets.tokens[0]) in stdout


def _bad_inputs(tiny: TinyPaths, tmp_path: Path) -> list[tuple[list[str], str]]:
    no_embed = tmp_path / "no_embed.safetensors"
    save_file({"lm_head.weight": torch.zeros(3, 2)}, str(no_embed))
    small = tmp_path / "small.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(10, 64)}, str(small))
    nan_tuned = tmp_path / "nan.safetensors"
    bad = tiny.tuned_embed.clone()
    bad[7, 3] = float("nan")
    save_file({"model.embed_tokens.weight": bad}, str(nan_tuned))
    base = str(tiny.base_run)
    return [
        (
            ["--base", str(tmp_path / "missing"), "--tuned", base, "--top-k", "3"],
            r"missing`: no such file or directory",
        ),
        (["--base", str(no_embed), "--tuned", base, "--top-k", "3"], r"holds no input embedding"),
        (["--base", base, "--tuned", str(small), "--top-k", "3"], r"different shapes: \(\d+, 64\) .* and \(10, 64\)"),
        (
            ["--base", base, "--tuned", str(tiny.tuned_run), "--top-k", "100000"],
            r"`k` must be between 1 and the vocabulary size",
        ),
        (["--base", base, "--tuned", str(tiny.tuned_run), "--top-k", "0"], r"`k` must be a positive integer, but is 0"),
        (
            ["--base", base, "--tuned", str(tiny.tuned_run), "--alpha", "1.5"],
            r"`alpha` must be in \(0, 1\), but is 1.5",
        ),
        (["--base", base, "--tuned", str(tiny.tuned_run), "--alpha", "0"], r"`alpha` must be in \(0, 1\), but is 0.0"),
        (["--base", base, "--tuned", str(nan_tuned), "--top-k", "3"], r"Row 7 of `a` or `b` contains NaN or Inf"),
    ]


def test_select_bad_input_is_one_line_exit_2_and_no_output(
    tiny: TinyPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    for args, message in _bad_inputs(tiny, tmp_path):
        out = tmp_path / "never.json"
        code, _, err = _run(capsys, *args, "--out", str(out))
        assert code == 2, args
        lines = err.strip().splitlines()
        assert re.search(message, lines[-1]), (args, err)
        assert lines[-1].startswith("error: ")
        assert "Traceback" not in err
        assert not out.exists(), args


def test_select_dtype_mismatch_needs_a_flag(
    tiny: TinyPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    half = tmp_path / "half.safetensors"
    save_file({"model.embed_tokens.weight": tiny.tuned_embed.to(torch.bfloat16)}, str(half))
    out = tmp_path / "t.json"
    code, _, err = _run(capsys, "--base", str(tiny.base_run), "--tuned", str(half), "--top-k", "2", "--out", str(out))
    assert code == 2 and "different dtypes: float32 and bfloat16" in err and not out.exists()
    code, _, _ = _run(
        capsys,
        "--base",
        str(tiny.base_run),
        "--tuned",
        str(half),
        "--top-k",
        "2",
        "--allow-dtype-mismatch",
        "--out",
        str(out),
    )
    assert code == 0 and out.exists()


def test_select_refuses_a_tokenizer_larger_than_the_embedding(
    tiny: TinyPaths, tmp_path: Path, sp_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small_base = tmp_path / "b.safetensors"
    small_tuned = tmp_path / "t.safetensors"
    save_file({"model.embed_tokens.weight": tiny.base_embed[:50].contiguous()}, str(small_base))
    save_file({"model.embed_tokens.weight": tiny.tuned_embed[:50].contiguous()}, str(small_tuned))
    code, _, err = _run(
        capsys,
        "--base",
        str(small_base),
        "--tuned",
        str(small_tuned),
        "--top-k",
        "2",
        "--tokenizer",
        str(sp_model),
        "--out",
        str(tmp_path / "x.json"),
    )
    assert code == 2
    assert f"has {tiny.vocab_size} tokens but the embedding has only 50 rows" in err


def test_select_debug_flag_shows_the_traceback(tiny: TinyPaths, tmp_path: Path) -> None:
    from fairseq2_kslottery.errors import SourceError

    with pytest.raises(SourceError):
        main(
            [
                "--debug",
                "select",
                "--base",
                str(tmp_path / "nope"),
                "--tuned",
                "x",
                "--top-k",
                "1",
                "--out",
                str(tmp_path / "o.json"),
            ]
        )


def test_console_script_and_module_entry_points(tiny: TinyPaths, tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "fairseq2-kslottery"
    env = {**os.environ}
    ok = subprocess.run(
        [
            str(exe),
            "select",
            "--base",
            str(tiny.hf_base),
            "--tuned",
            str(tiny.hf_tuned),
            "--top-k",
            "4",
            "--out",
            str(tmp_path / "a.json"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(tmp_path / "a.json")
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "fairseq2_kslottery",
            "select",
            "--base",
            str(tmp_path / "missing"),
            "--tuned",
            str(tiny.hf_tuned),
            "--top-k",
            "4",
            "--out",
            str(tmp_path / "b.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: Cannot read the embedding from `{tmp_path / 'missing'}`: no such file or directory."
    ]
    assert not (tmp_path / "b.json").exists()
    assert json.loads((tmp_path / "a.json").read_text())["format"] == "kslottery-tickets"
