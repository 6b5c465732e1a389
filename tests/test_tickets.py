"""Selection rules, baselines and the ticket file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fairseq2_kslottery.errors import SelectionError, TicketFileError
from fairseq2_kslottery.tickets import (
    TicketSet,
    explicit_tickets,
    most_frequent_tickets,
    random_tickets,
    rank_rows,
    reject_mask,
    select_by_alpha,
    select_top_k,
)


def _bh_reference(p: np.ndarray, alpha: float) -> np.ndarray:
    """Benjamini-Hochberg written out the textbook way (loop over ranks)."""
    m = len(p)
    order = np.argsort(p, kind="stable")
    largest = -1
    for rank, idx in enumerate(order, start=1):
        if p[idx] <= rank * alpha / m:
            largest = rank
    reject = np.zeros(m, dtype=bool)
    if largest > 0:
        reject[order[:largest]] = True
    return reject


def test_rank_rows_orders_by_p_then_d_then_id() -> None:
    p = np.array([0.5, 0.01, 0.01, 0.01, 0.2])
    d = np.array([0.1, 0.3, 0.4, 0.3, 0.2])
    assert rank_rows(d, p).tolist() == [2, 1, 3, 4, 0]
    assert select_top_k(d, p, 2).tolist() == [2, 1]


def test_select_top_k_rejects_k_out_of_range() -> None:
    d, p = np.zeros(5), np.ones(5)
    for k in (0, -1, 6):
        with pytest.raises(SelectionError, match=rf"^`k` must be between 1 and the vocabulary size 5, but is {k}\.$"):
            select_top_k(d, p, k)


def test_reject_mask_corrections_match_definitions() -> None:
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(0, 1, 500), rng.uniform(0, 1e-4, 20)])
    alpha = 0.05
    assert np.array_equal(reject_mask(p, alpha, "none"), p <= alpha)
    assert np.array_equal(reject_mask(p, alpha, "bonferroni"), p <= alpha / p.size)
    assert np.array_equal(reject_mask(p, alpha, "bh"), _bh_reference(p, alpha))
    # BH sits between Bonferroni and no correction.
    assert reject_mask(p, alpha, "bonferroni").sum() <= reject_mask(p, alpha, "bh").sum() <= (p <= alpha).sum()


def test_reject_mask_bh_with_no_rejection() -> None:
    p = np.array([0.5, 0.9, 0.7])
    assert not reject_mask(p, 0.05, "bh").any()


def test_select_by_alpha_ranks_and_caps() -> None:
    p = np.array([0.001, 0.2, 0.0001, 0.04, 0.03])
    d = np.array([0.5, 0.1, 0.6, 0.2, 0.3])
    assert select_by_alpha(d, p, 0.05, "none").tolist() == [2, 0, 4, 3]
    assert select_by_alpha(d, p, 0.05, "none", max_k=2).tolist() == [2, 0]
    assert select_by_alpha(d, p, 0.05, "bonferroni").tolist() == [2, 0]


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5])
def test_select_by_alpha_rejects_alpha_outside_unit_interval(alpha: float) -> None:
    with pytest.raises(SelectionError, match=rf"^`alpha` must be in \(0, 1\), but is {alpha}\.$"):
        select_by_alpha(np.zeros(3), np.ones(3), alpha)


def test_random_tickets_are_seeded_and_exclude() -> None:
    a = random_tickets(1000, 10, seed=1, exclude=range(500))
    b = random_tickets(1000, 10, seed=1, exclude=range(500))
    c = random_tickets(1000, 10, seed=2, exclude=range(500))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert len(set(a.tolist())) == 10 and a.min() >= 500


def test_random_tickets_with_counts_only_draw_tokens_that_occur() -> None:
    counts = np.zeros(100, dtype=np.int64)
    counts[[3, 9, 27, 81, 90]] = [5, 1, 7, 2, 9]
    got = random_tickets(100, 5, seed=0, counts=counts)
    assert sorted(got.tolist()) == [3, 9, 27, 81, 90]
    with pytest.raises(SelectionError, match=r"between 1 and 5 \(the eligible rows\), but is 6"):
        random_tickets(100, 6, seed=0, counts=counts)


def test_random_tickets_frequency_matched_follow_the_reference_profile() -> None:
    rng = np.random.default_rng(0)
    counts = (rng.pareto(1.2, 5000) * 10).astype(np.int64)
    reference = np.argsort(-counts)[:15]  # the most frequent tokens, like real tickets
    matched = random_tickets(5000, 0, seed=3, counts=counts, match_ids=reference, window=8)
    assert len(matched) == 15 and not set(matched.tolist()) & set(reference.tolist())
    rank = np.empty(5000, dtype=np.int64)
    rank[np.lexsort((np.arange(5000), -counts))] = np.arange(5000)
    # Every matched token sits within a few frequency ranks of its reference token.
    assert np.all(np.abs(rank[matched] - rank[reference]) <= 8 + 15)
    uniform = random_tickets(5000, 15, seed=3)
    assert np.median(counts[matched]) > 10 * max(1, np.median(counts[uniform]))
    assert random_tickets(5000, 0, seed=3, counts=counts, match_ids=reference, window=8).tolist() == matched.tolist()


def test_most_frequent_and_explicit_tickets() -> None:
    counts = np.array([5, 9, 9, 0, 7])
    assert most_frequent_tickets(counts, 3).tolist() == [1, 2, 4]
    assert most_frequent_tickets(counts, 2, exclude=[1]).tolist() == [2, 4]
    assert explicit_tickets([4, 2, 4], 5).tolist() == [4, 2]
    with pytest.raises(SelectionError, match=r"^Token id 5 is outside the vocabulary \[0, 5\)\.$"):
        explicit_tickets([5], 5)


def _ticket_set() -> TicketSet:
    return TicketSet(
        token_ids=[7, 2],
        statistics=[0.5, 0.25],
        pvalues=[1e-9, 0.01],
        rule={"kind": "top_k", "k": 2},
        vocab_size=10,
        embed_dim=4,
        tokens=["\n", " the"],
    )


def test_ticket_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    _ticket_set().save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "kslottery-tickets" and data["version"] == 1
    loaded = TicketSet.load(path)
    assert loaded == _ticket_set()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="other"), r"`format` is 'other', expected 'kslottery-tickets'"),
        (lambda d: d.update(version=99), r"`version` is 99; this release reads version 1"),
        (lambda d: d.update(token_ids=[7, 12]), r"token id 12 is outside the vocabulary \[0, 10\)"),
        (lambda d: d.pop("pvalues"), r"required field\(s\) `pvalues` missing"),
        (lambda d: d.update(statistics=[0.5]), r"`statistics` must be a list with one entry per token id"),
        (lambda d: d.update(token_ids=[7, 7]), r"`token_ids` contains duplicates"),
    ],
)
def test_ticket_file_load_says_what_is_wrong(tmp_path: Path, edit: object, message: str) -> None:
    path = tmp_path / "t.json"
    data = _ticket_set().to_json()
    edit(data)  # type: ignore[operator]
    path.write_text(json.dumps(data))
    with pytest.raises(TicketFileError, match=message):
        TicketSet.load(path)


def test_ticket_file_load_detects_truncation_and_vocab_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    _ticket_set().save(path)
    full = path.read_text()
    path.write_text(full[: len(full) // 2])
    with pytest.raises(TicketFileError, match=r"is not a valid ticket file: it is not complete JSON"):
        TicketSet.load(path)
    _ticket_set().save(path)
    with pytest.raises(TicketFileError, match=r"made for a vocabulary of 10 rows, but the model has 12"):
        TicketSet.load(path, vocab_size=12)
    with pytest.raises(TicketFileError, match=r"the file does not exist"):
        TicketSet.load(tmp_path / "missing.json")


def test_ticket_file_write_failure_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.json"
    _ticket_set().save(path)
    before = path.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    changed = _ticket_set()
    changed.token_ids = [1, 3]
    with pytest.raises(OSError, match="No space left"):
        changed.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]  # no temporary file left behind
