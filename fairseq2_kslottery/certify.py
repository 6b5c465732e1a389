"""Certificates.

The KS-level certificate is the paper's statistical notion, stated for what it is: at level alpha, under a
multiple-testing correction, does every NON-ticket row fail to reject "this row's value distribution is unchanged"?
It is a statement about embedding rows and a hypothesis test — failing to reject is not evidence of no change, and
it says nothing directly about the model's predictions.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fairseq2_kslottery.ks import KSMethod, ks_critical_value
from fairseq2_kslottery.tickets import Correction, per_test_level, reject_mask

__all__ = ["ks_certificate", "format_certificate"]

KS_CERTIFICATE_NOTE = (
    "KS-level certificate: a statistical statement about embedding rows (no non-ticket row rejects "
    "'unchanged' at the stated level), not a guarantee about the model's predictions."
)


def ks_certificate(
    statistic: np.ndarray,
    pvalue: np.ndarray,
    ticket_ids: np.ndarray,
    *,
    n: int,
    alpha: float,
    correction: Correction,
    method: KSMethod,
) -> dict[str, Any]:
    """The KS-level certificate of a ticket set.

    :param statistic: (V,) KS statistics of all rows; ``pvalue`` the matching p-values.
    :param ticket_ids: the ticket rows.
    :param n: the sample size per row (the embedding dimension).

    :returns: a JSON-ready dict: ``certified`` (no non-ticket row rejects), ``violations`` (how many do),
        ``violating_ids`` (up to 20, best-ranked first), ``max_non_ticket_statistic`` and its ``row``,
        ``critical_statistic`` (the smallest D that would reject at the per-test level, ``None`` when no D can),
        ``per_test_level`` and the settings.
    """
    statistic = np.asarray(statistic, dtype=np.float64)
    pvalue = np.asarray(pvalue, dtype=np.float64)
    vocab = statistic.shape[0]
    non_ticket = np.ones(vocab, dtype=np.bool_)
    non_ticket[np.asarray(ticket_ids, dtype=np.int64)] = False

    rejected = reject_mask(pvalue, alpha, correction)
    violating = np.nonzero(rejected & non_ticket)[0]
    violating = violating[np.lexsort((violating, -statistic[violating], pvalue[violating]))]
    level = per_test_level(pvalue, alpha, correction)
    critical = ks_critical_value(n, level, method) if 0.0 < level < 1.0 else math.inf

    if non_ticket.any():
        candidates = np.nonzero(non_ticket)[0]
        worst = int(candidates[np.argmax(statistic[candidates])])
        max_stat: float | None = float(statistic[worst])
        worst_row: int | None = worst
    else:
        max_stat, worst_row = None, None

    return {
        "kind": "ks",
        "alpha": float(alpha),
        "correction": correction,
        "method": method,
        "num_rows": int(vocab),
        "num_non_ticket_rows": int(non_ticket.sum()),
        "per_test_level": float(level),
        "critical_statistic": None if math.isinf(critical) else float(critical),
        "max_non_ticket_statistic": max_stat,
        "max_non_ticket_row": worst_row,
        "violations": int(violating.size),
        "violating_ids": [int(i) for i in violating[:20]],
        "certified": bool(violating.size == 0),
        "note": KS_CERTIFICATE_NOTE,
    }


def format_certificate(cert: dict[str, Any], token_text: dict[int, str] | None = None) -> str:
    """A few human-readable lines describing ``cert`` (as produced by :func:`ks_certificate`)."""
    token_text = token_text or {}
    corr = {"none": "no correction", "bonferroni": "Bonferroni", "bh": "Benjamini-Hochberg"}[cert["correction"]]
    verdict = "CERTIFIED" if cert["certified"] else "NOT certified"
    lines = [
        f"KS certificate at alpha={cert['alpha']:g} ({corr}, per-test level {cert['per_test_level']:.3g}): "
        f"{verdict} - {cert['violations']} of {cert['num_non_ticket_rows']} non-ticket rows reject 'unchanged'."
    ]
    crit = cert["critical_statistic"]
    crit_text = f"{crit:.5f}" if crit is not None else "unreachable (no statistic is significant at this level)"
    if cert["max_non_ticket_statistic"] is not None:
        row = cert["max_non_ticket_row"]
        label = f" {token_text[row]!r}" if row in token_text else ""
        lines.append(
            f"  largest non-ticket D = {cert['max_non_ticket_statistic']:.5f} (row {row}{label}); "
            f"critical D = {crit_text}"
        )
    if cert["violating_ids"]:
        shown = ", ".join(str(i) for i in cert["violating_ids"][:10])
        more = " ..." if cert["violations"] > 10 else ""
        lines.append(f"  violating rows: {shown}{more}")
    lines.append(f"  ({cert['note']})")
    return "\n".join(lines)
