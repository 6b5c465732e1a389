"""The KS-level certificate."""

from __future__ import annotations

import numpy as np
import torch

from fairseq2_kslottery.certify import format_certificate, ks_certificate
from fairseq2_kslottery.ks import ks_2samp_rows, ks_critical_value
from fairseq2_kslottery.tickets import select_by_alpha


def _stats(shifted: list[int], vocab: int = 300, dim: int = 128) -> tuple[np.ndarray, np.ndarray]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(vocab, dim, generator=gen)
    tuned = base + 0.01 * torch.randn(vocab, dim, generator=gen)
    tuned[shifted] += 1.0
    res = ks_2samp_rows(base, tuned)
    return res.statistic.numpy(), res.pvalue.numpy()


def test_certificate_holds_when_tickets_cover_the_shifted_rows() -> None:
    d, p = _stats([3, 50, 77])
    tickets = select_by_alpha(d, p, 0.05, "bonferroni")
    assert sorted(tickets.tolist()) == [3, 50, 77]
    cert = ks_certificate(d, p, tickets, n=128, alpha=0.05, correction="bonferroni", method="auto")
    assert cert["certified"] and cert["violations"] == 0
    assert cert["critical_statistic"] == ks_critical_value(128, 0.05 / 300)
    assert cert["max_non_ticket_statistic"] < cert["critical_statistic"]
    assert cert["max_non_ticket_row"] not in (3, 50, 77)


def test_certificate_counts_violations_when_a_shifted_row_is_left_out() -> None:
    d, p = _stats([3, 50, 77])
    cert = ks_certificate(d, p, np.array([3]), n=128, alpha=0.05, correction="none", method="auto")
    assert not cert["certified"]
    assert cert["violations"] >= 2
    assert {50, 77} <= set(cert["violating_ids"])
    assert cert["max_non_ticket_statistic"] >= cert["critical_statistic"]
    text = format_certificate(cert)
    assert "NOT certified" in text and "not a guarantee about the model's predictions" in text


def test_certificate_bh_level_is_the_largest_rejected_pvalue() -> None:
    d, p = _stats([1, 2, 3, 4])
    cert = ks_certificate(d, p, np.array([1, 2, 3, 4]), n=128, alpha=0.05, correction="bh", method="auto")
    rejected = p[[1, 2, 3, 4]]
    assert cert["per_test_level"] == rejected.max()
    assert cert["certified"]
