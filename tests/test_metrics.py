"""Translation metrics agree with sacrebleu; the diagnostics on hand-made cases."""

from __future__ import annotations

from pathlib import Path

import pytest
import sacrebleu

from fairseq2_kslottery.metrics import clean_hypothesis, first_line, score_translations

REFS = ["The cat sits on the mat.", "A dog runs in the park.", "It is raining today."]


def test_bleu_and_chrf_equal_sacrebleu_on_the_same_strings() -> None:
    hyps = ["The cat sat on the mat.", "A dog is running in a park.", "Today it rains."]
    got = score_translations(hyps, REFS, [True, True, False])
    assert got.bleu == sacrebleu.corpus_bleu(hyps, [REFS]).score
    assert got.chrf == sacrebleu.corpus_chrf(hyps, [REFS]).score
    assert got.bleu_signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert got.chrf_signature.startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")


def test_first_line_bleu_and_eos_rate_on_hand_made_cases() -> None:
    # Perfect first lines followed by chatter: BLEU drops, first-line BLEU is perfect.
    hyps = [r + "\nEnglish: and then some more text" for r in REFS]
    got = score_translations(hyps, REFS, [False, True, False])
    assert got.first_line_bleu == pytest.approx(100.0)
    assert got.bleu < 60.0
    assert got.eos_rate == pytest.approx(1 / 3)
    assert got.length_ratio > 1.5
    exact = score_translations(REFS, REFS, [True, True, True])
    assert exact.bleu == pytest.approx(100.0) and exact.eos_rate == 1.0 and exact.length_ratio == 1.0


def test_spbleu_is_skipped_with_a_notice_when_the_model_is_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SACREBLEU", str(tmp_path))
    got = score_translations(REFS, REFS, [True] * 3)
    assert got.spbleu is None and got.spbleu_signature is None
    assert got.notice is not None and "spBLEU skipped" in got.notice and "nothing is downloaded" in got.notice
    assert not any(tmp_path.iterdir())  # no download attempt left files behind


def test_hypothesis_cleanup() -> None:
    assert first_line("\n  Hallo Welt.  \nEnglish: hi") == "Hallo Welt."
    assert clean_hypothesis(" a\nb ", cut_at_newline=True) == "a"
    assert clean_hypothesis(" a\nb ", cut_at_newline=False) == "a\nb"
    with pytest.raises(ValueError, match="must have the same length"):
        score_translations(["a"], ["a", "b"], [True])


def test_metric_bag_units_equal_sacrebleu_and_merge_across_ranks() -> None:
    from fairseq2_kslottery.evaluation import SacreStatsMetric, _bleu, _chrf

    hyps = ["The cat sat on the mat.", "A dog is running in a park.", "Today it rains."]
    for factory, reference in ((_bleu, sacrebleu.corpus_bleu), (_chrf, sacrebleu.corpus_chrf)):
        # Two "ranks" see different sentences; merging their statistics gives the corpus score.
        rank0, rank1 = SacreStatsMetric(factory), SacreStatsMetric(factory)
        rank0.update(REFS[:2], hyps[:2])
        rank1.update(REFS[2:], hyps[2:])
        rank0.merge_state([rank1])
        assert float(rank0.compute()) == reference(hyps, [REFS]).score


def test_extract_hypothesis_cuts_at_eos_and_at_the_length_limit() -> None:
    import torch

    from fairseq2_kslottery.evaluation import extract_hypothesis

    assert extract_hypothesis(torch.tensor([5, 6, 2]), eos_idx=2, max_gen_len=8) == ([5, 6], True)
    # The generator forces EOS at the limit: not a real stop.
    assert extract_hypothesis(torch.tensor([5, 6, 7, 2]), eos_idx=2, max_gen_len=3) == ([5, 6, 7], False)
    # A shorter prompt in the batch may get extra tokens; they are cut at max_gen_len.
    assert extract_hypothesis(torch.tensor([5, 6, 7, 8, 9, 2]), eos_idx=2, max_gen_len=3) == ([5, 6, 7], False)
