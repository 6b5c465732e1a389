"""Ticket selection rules, baseline ticket sets and the ticket file (the one artifact every later stage reads).

A *ticket set* is a list of vocabulary row ids. KS rules pick the rows whose value distribution shifted most between
the base and the tuned embedding; baselines pick rows by other means at the same k, so that a gain can be attributed
honestly (random frequency-matched rows, the most frequent tokens, an explicit list such as the newline token).
Every rule is deterministic: the same inputs (and seed) give the same ids in the same order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from fairseq2_kslottery.errors import SelectionError, TicketFileError
from fairseq2_kslottery.io import atomic_write_text

__all__ = [
    "TICKET_FORMAT",
    "TICKET_VERSION",
    "CORRECTIONS",
    "Correction",
    "TicketSet",
    "rank_rows",
    "reject_mask",
    "select_top_k",
    "select_by_alpha",
    "random_tickets",
    "most_frequent_tickets",
    "explicit_tickets",
]

TICKET_FORMAT: Final = "kslottery-tickets"
TICKET_VERSION: Final = 1

Correction = Literal["none", "bonferroni", "bh"]
CORRECTIONS: Final = ("none", "bonferroni", "bh")


# --- KS rules ---------------------------------------------------------------------------------------------------


def rank_rows(statistic: np.ndarray, pvalue: np.ndarray) -> np.ndarray:
    """All row ids ordered by p-value ascending, then statistic descending, then id ascending."""
    statistic = np.asarray(statistic, dtype=np.float64)
    pvalue = np.asarray(pvalue, dtype=np.float64)
    ids = np.arange(statistic.shape[0])
    # np.lexsort sorts by the last key first. NaN p-values (degenerate d = 1) rank last.
    p_key = np.where(np.isnan(pvalue), np.inf, pvalue)
    return np.lexsort((ids, -statistic, p_key))


def select_top_k(statistic: np.ndarray, pvalue: np.ndarray, k: int) -> np.ndarray:
    """The k best-ranked rows (see :func:`rank_rows`)."""
    vocab = int(np.asarray(statistic).shape[0])
    _check_k(k, vocab)
    return rank_rows(statistic, pvalue)[:k]


def reject_mask(pvalue: np.ndarray, alpha: float, correction: Correction) -> np.ndarray:
    """Which rows reject "unchanged" at level ``alpha`` under a multiple-testing correction.

    ``none``: p <= alpha. ``bonferroni``: p <= alpha / V (family-wise error rate). ``bh``: Benjamini–Hochberg
    step-up at false-discovery rate alpha: with sorted p-values p_(1) <= ... <= p_(V), reject the rows with
    p <= p_(r) where r is the largest i with p_(i) <= i * alpha / V.
    """
    _check_alpha(alpha)
    p = np.asarray(pvalue, dtype=np.float64)
    p = np.where(np.isnan(p), np.inf, p)
    return p <= per_test_level(p, alpha, correction)


def per_test_level(pvalue: np.ndarray, alpha: float, correction: Correction) -> float:
    """The p-value threshold a single row is compared with under ``correction`` (data-dependent for BH).

    For BH with no rejection this is ``alpha / V``, the threshold the smallest p-value would have had to meet.
    """
    _check_alpha(alpha)
    p = np.asarray(pvalue, dtype=np.float64)
    vocab = p.shape[0]
    if correction == "none":
        return alpha
    if correction == "bonferroni":
        return alpha / max(vocab, 1)
    if correction == "bh":
        if vocab == 0:
            return alpha
        ordered = np.sort(np.where(np.isnan(p), np.inf, p))
        bounds = np.arange(1, vocab + 1) * alpha / vocab
        passing = np.nonzero(ordered <= bounds)[0]
        if passing.size == 0:
            return alpha / vocab
        return float(ordered[passing[-1]])
    raise SelectionError(f"`correction` must be one of {', '.join(CORRECTIONS)}, but is {correction!r}.")


def select_by_alpha(
    statistic: np.ndarray,
    pvalue: np.ndarray,
    alpha: float,
    correction: Correction = "none",
    max_k: int | None = None,
) -> np.ndarray:
    """Rows that reject "unchanged" (see :func:`reject_mask`), best-ranked first, at most ``max_k`` of them."""
    mask = reject_mask(pvalue, alpha, correction)
    ranked = rank_rows(statistic, pvalue)
    chosen = ranked[mask[ranked]]
    if max_k is not None:
        _check_k(max_k, int(np.asarray(statistic).shape[0]))
        chosen = chosen[:max_k]
    return chosen


# --- baselines --------------------------------------------------------------------------------------------------


def random_tickets(
    vocab_size: int,
    k: int,
    *,
    seed: int,
    exclude: Sequence[int] = (),
    counts: np.ndarray | None = None,
    match_ids: Sequence[int] | None = None,
    window: int = 10,
) -> np.ndarray:
    """k random rows, seeded; optionally frequency-matched.

    Plain: k distinct ids drawn uniformly from the vocabulary minus ``exclude``, restricted to tokens that occur
    (count > 0) when ``counts`` is given. Frequency-matched (``counts`` and ``match_ids``): for each id in
    ``match_ids`` (k = len(match_ids)), one id drawn uniformly among the ``window`` not-yet-chosen, non-excluded
    tokens closest to it in the ranking by count — so the random set has the same training-frequency profile as
    the set it is compared with. ``match_ids`` are always excluded.
    """
    rng = np.random.default_rng(seed)
    banned = set(int(i) for i in exclude)
    if match_ids is not None:
        if counts is None:
            raise SelectionError("Frequency-matched random tickets need per-token `counts`.")
        counts = _check_counts(counts, vocab_size)
        k = len(match_ids)
        banned |= set(int(i) for i in match_ids)
        # Rank by count descending, ties by id, so neighbours in this order have similar frequency.
        order = np.lexsort((np.arange(vocab_size), -counts))
        position = np.empty(vocab_size, dtype=np.int64)
        position[order] = np.arange(vocab_size)
        taken: set[int] = set()
        chosen = []
        for tid in match_ids:
            _check_id(int(tid), vocab_size)
            pool = _nearest_free(order, int(position[int(tid)]), window, banned | taken)
            if not pool:
                raise SelectionError(f"Not enough tokens left to match token {tid} by frequency.")
            pick = int(pool[int(rng.integers(len(pool)))])
            taken.add(pick)
            chosen.append(pick)
        return np.asarray(chosen, dtype=np.int64)

    candidates = np.arange(vocab_size)
    if counts is not None:
        counts = _check_counts(counts, vocab_size)
        candidates = candidates[counts > 0]
    if banned:
        candidates = candidates[~np.isin(candidates, np.fromiter(banned, dtype=np.int64))]
    if k < 1 or k > candidates.size:
        raise SelectionError(f"`k` must be between 1 and {candidates.size} (the eligible rows), but is {k}.")
    return np.sort(rng.choice(candidates, size=k, replace=False)).astype(np.int64)


def _nearest_free(order: np.ndarray, centre: int, window: int, banned: set[int]) -> list[int]:
    """Up to ``window`` ids of ``order`` nearest to position ``centre`` that are not banned."""
    pool: list[int] = []
    step = 1
    lo_pos, hi_pos = centre - 1, centre + 1
    n = order.shape[0]
    while len(pool) < window and (lo_pos >= 0 or hi_pos < n):
        # Alternate below/above so the pool is centred on the matched token's frequency rank.
        for pos in (hi_pos, lo_pos) if step % 2 else (lo_pos, hi_pos):
            if 0 <= pos < n and int(order[pos]) not in banned and len(pool) < window:
                pool.append(int(order[pos]))
        lo_pos -= 1
        hi_pos += 1
        step += 1
    return pool


def most_frequent_tickets(counts: np.ndarray, k: int, *, exclude: Sequence[int] = ()) -> np.ndarray:
    """The k most frequent tokens (count descending, then id ascending), skipping ``exclude``."""
    counts = _check_counts(counts, int(np.asarray(counts).shape[0]))
    vocab = counts.shape[0]
    order = np.lexsort((np.arange(vocab), -counts))
    if exclude:
        order = order[~np.isin(order, np.asarray(list(exclude), dtype=np.int64))]
    if k < 1 or k > order.size:
        raise SelectionError(f"`k` must be between 1 and {order.size}, but is {k}.")
    return order[:k].astype(np.int64)


def explicit_tickets(ids: Sequence[int], vocab_size: int) -> np.ndarray:
    """An explicit list of ids (e.g. only the newline token), validated and de-duplicated in order."""
    seen: dict[int, None] = {}
    for tid in ids:
        _check_id(int(tid), vocab_size)
        seen.setdefault(int(tid), None)
    if not seen:
        raise SelectionError("An explicit ticket list must name at least one token id.")
    return np.asarray(list(seen), dtype=np.int64)


def _check_k(k: int, vocab: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or k > vocab:
        raise SelectionError(f"`k` must be between 1 and the vocabulary size {vocab}, but is {k}.")


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 < float(alpha) < 1.0):
        raise SelectionError(f"`alpha` must be in (0, 1), but is {alpha}.")


def _check_id(tid: int, vocab_size: int) -> None:
    if not 0 <= tid < vocab_size:
        raise SelectionError(f"Token id {tid} is outside the vocabulary [0, {vocab_size}).")


def _check_counts(counts: np.ndarray, vocab_size: int) -> np.ndarray:
    arr = np.asarray(counts)
    if arr.shape != (vocab_size,):
        raise SelectionError(f"`counts` must have shape ({vocab_size},), but has {arr.shape}.")
    if arr.size and arr.min() < 0:
        raise SelectionError("`counts` must be non-negative.")
    return arr.astype(np.int64)


# --- the ticket file --------------------------------------------------------------------------------------------


@dataclass
class TicketSet:
    """The ticket artifact: which rows, why, and for which embedding and tokenizer.

    ``statistics``/``pvalues`` hold the KS statistic and p-value of each ticket row when the rows were tested
    (``None`` entries otherwise, e.g. for a baseline built without a KS run). ``rule`` describes how the ids were
    chosen (``{"kind": "top_k", "k": 20}``, ``{"kind": "alpha", "alpha": 0.05, "correction": "bh"}``,
    ``{"kind": "random", ...}``...). ``certificate`` is the KS-level certificate (see :mod:`certify`).
    """

    token_ids: list[int]
    rule: dict[str, Any]
    vocab_size: int
    embed_dim: int
    statistics: list[float | None] = field(default_factory=list)
    pvalues: list[float | None] = field(default_factory=list)
    tokens: list[str] | None = None
    ks_method: str | None = None
    base_fingerprint: str | None = None
    tokenizer_fingerprint: str | None = None
    certificate: dict[str, Any] | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.statistics:
            self.statistics = [None] * len(self.token_ids)
        if not self.pvalues:
            self.pvalues = [None] * len(self.token_ids)

    @property
    def k(self) -> int:
        return len(self.token_ids)

    def to_json(self) -> dict[str, Any]:
        data = {"format": TICKET_FORMAT, "version": TICKET_VERSION}
        data.update(asdict(self))
        return data

    def save(self, path: str | Path) -> None:
        """Write the ticket file atomically: a crash or a full disk leaves any previous file intact."""
        self.validate(path)
        text = json.dumps(self.to_json(), indent=2, ensure_ascii=False, allow_nan=False, default=_json_default)
        atomic_write_text(Path(path), text + "\n")

    @classmethod
    def load(cls, path: str | Path, *, vocab_size: int | None = None) -> TicketSet:
        """Read and validate a ticket file; ``vocab_size``, when given, must match the file's."""
        path = Path(path)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TicketFileError(path, "the file does not exist.") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TicketFileError(path, f"it cannot be read ({exc}).") from None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise TicketFileError(path, f"it is not complete JSON ({exc.msg} at line {exc.lineno}).") from None
        return cls.from_json(data, path, vocab_size=vocab_size)

    @classmethod
    def from_json(cls, data: Any, path: str | Path = "<memory>", *, vocab_size: int | None = None) -> TicketSet:
        if not isinstance(data, Mapping):
            raise TicketFileError(path, "the top level is not a JSON object.")
        if data.get("format") != TICKET_FORMAT:
            raise TicketFileError(path, f"`format` is {data.get('format')!r}, expected {TICKET_FORMAT!r}.")
        if data.get("version") != TICKET_VERSION:
            raise TicketFileError(
                path, f"`version` is {data.get('version')!r}; this release reads version {TICKET_VERSION}."
            )
        required = ("token_ids", "statistics", "pvalues", "rule", "vocab_size", "embed_dim")
        missing = [key for key in required if key not in data]
        if missing:
            raise TicketFileError(path, f"required field(s) {', '.join(f'`{m}`' for m in missing)} missing.")
        known = {f for f in cls.__dataclass_fields__}
        fields = {key: value for key, value in data.items() if key in known}
        tickets = cls(**fields)
        tickets.validate(path)
        if vocab_size is not None and tickets.vocab_size != vocab_size:
            raise TicketFileError(
                path, f"it was made for a vocabulary of {tickets.vocab_size} rows, but the model has {vocab_size}."
            )
        return tickets

    def validate(self, path: str | Path = "<memory>") -> None:
        """Check internal consistency; raises :class:`TicketFileError` naming the first problem."""
        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise TicketFileError(path, f"`vocab_size` must be a positive integer, but is {self.vocab_size!r}.")
        if not isinstance(self.embed_dim, int) or self.embed_dim < 1:
            raise TicketFileError(path, f"`embed_dim` must be a positive integer, but is {self.embed_dim!r}.")
        if not isinstance(self.token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in self.token_ids
        ):
            raise TicketFileError(path, "`token_ids` must be a list of integers.")
        bad = [t for t in self.token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise TicketFileError(path, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size}).")
        if len(set(self.token_ids)) != len(self.token_ids):
            raise TicketFileError(path, "`token_ids` contains duplicates.")
        for name in ("statistics", "pvalues"):
            values = getattr(self, name)
            if not isinstance(values, list) or len(values) != len(self.token_ids):
                raise TicketFileError(path, f"`{name}` must be a list with one entry per token id.")
        if self.tokens is not None and (not isinstance(self.tokens, list) or len(self.tokens) != len(self.token_ids)):
            raise TicketFileError(path, "`tokens` must be a list with one entry per token id.")
        if not isinstance(self.rule, dict) or "kind" not in self.rule:
            raise TicketFileError(path, "`rule` must be an object with a `kind`.")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
