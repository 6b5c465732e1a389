"""The selection stage: base + tuned embedding -> per-row KS test -> tickets.json with its certificate.

Shared by the ``fairseq2-kslottery select`` command and the ``recipes.select`` fairseq2 recipe.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fairseq2_kslottery.certify import format_certificate, ks_certificate
from fairseq2_kslottery.errors import SelectionError
from fairseq2_kslottery.io import atomic_path, tensor_fingerprint
from fairseq2_kslottery.ks import KS_METHODS, KSResult, ks_2samp_rows
from fairseq2_kslottery.sources import LoadedEmbedding, load_input_embedding
from fairseq2_kslottery.tickets import CORRECTIONS, TicketSet, reject_mask, select_by_alpha, select_top_k
from fairseq2_kslottery.vocab import TokenizerError, TokenVocabulary, load_token_vocabulary

__all__ = ["SelectionRequest", "SelectionOutcome", "run_selection", "format_ticket_table", "count_changed_rows"]


@dataclass(kw_only=True)
class SelectionRequest:
    """What to compare and how to choose the tickets. Exactly one of ``top_k`` and ``alpha`` is set."""

    base: str
    """Source of the base (original) embedding: asset card, fairseq2 checkpoint, or safetensors/.pt file/folder."""

    tuned: str
    """Source of the tuned embedding, in any of the same forms."""

    out: Path
    """Where the ticket file is written (atomically)."""

    top_k: int | None = None
    """Keep the k best-ranked rows (p ascending, D descending, id ascending)."""

    alpha: float | None = None
    """Keep the rows that reject "unchanged" at this level (after ``correction``)."""

    correction: str = "none"
    """Multiple-testing correction for ``alpha`` and the certificate: none, bonferroni or bh."""

    max_k: int | None = None
    """With ``alpha``: keep at most this many of the rejecting rows."""

    cert_alpha: float = 0.05
    """Level of the KS certificate for a top-k rule (an alpha rule certifies at its own alpha)."""

    method: str = "auto"
    """p-value method of the KS test: auto, exact or asymp (as scipy.stats.ks_2samp)."""

    tokenizer: str | None = None
    """Tokenizer file/folder/card used to decode the ticket tokens; defaults to the one the base source names."""

    allow_dtype_mismatch: bool = False
    """Compare embeddings stored in different dtypes by upcasting both (otherwise a mismatch is an error)."""

    stats_out: Path | None = None
    """Optionally also write every row's statistic and p-value (safetensors), e.g. for plots."""

    def validate(self) -> None:
        """Check the rule before any file is read; raises :class:`SelectionError` naming the problem."""
        if (self.top_k is None) == (self.alpha is None):
            raise SelectionError("Give exactly one selection rule: `top_k` or `alpha`.")
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
            raise SelectionError(f"`k` must be a positive integer, but is {self.top_k}.")
        if self.alpha is not None and not 0.0 < self.alpha < 1.0:
            raise SelectionError(f"`alpha` must be in (0, 1), but is {self.alpha}.")
        if not 0.0 < self.cert_alpha < 1.0:
            raise SelectionError(f"`cert_alpha` must be in (0, 1), but is {self.cert_alpha}.")
        if self.correction not in CORRECTIONS:
            raise SelectionError(f"`correction` must be one of {', '.join(CORRECTIONS)}, but is {self.correction!r}.")
        if self.max_k is not None and self.max_k < 1:
            raise SelectionError(f"`max_k` must be a positive integer, but is {self.max_k}.")
        if self.method not in KS_METHODS:
            raise SelectionError(f"`method` must be one of {', '.join(KS_METHODS)}, but is {self.method!r}.")


@dataclass
class SelectionOutcome:
    tickets: TicketSet
    result: KSResult
    changed_rows: int
    vocabulary: TokenVocabulary | None = None


def run_selection(
    request: SelectionRequest,
    *,
    log: Callable[[str], None] = lambda _: None,
    progress: Callable[[int, int], None] | None = None,
    gang: Any = None,
) -> SelectionOutcome | None:
    """Run the whole selection stage and write the ticket file. Nothing is written if any step fails.

    With a fairseq2 ``gang`` of several processes, each process tests a contiguous slice of the rows and the slices
    are gathered (rows are independent, so the result is identical to one process); only rank 0 selects, writes the
    files and gets the outcome — the other ranks get ``None``.
    """
    request.validate()
    _check_writable(request.out)
    if request.stats_out is not None:
        _check_writable(request.stats_out)

    base = load_input_embedding(request.base)
    log(f"base  : {base.source} -> {tuple(base.weight.shape)} {_dtype(base.weight)} ({base.key})")
    tuned = load_input_embedding(request.tuned)
    log(f"tuned : {tuned.source} -> {tuple(tuned.weight.shape)} {_dtype(tuned.weight)} ({tuned.key})")
    a, b = _comparable(base, tuned, request.allow_dtype_mismatch)
    vocab_size, dim = int(a.shape[0]), int(a.shape[1])
    if request.top_k is not None and request.top_k > vocab_size:
        raise SelectionError(f"`k` must be between 1 and the vocabulary size {vocab_size}, but is {request.top_k}.")
    if request.max_k is not None and request.max_k > vocab_size:
        raise SelectionError(f"`max_k` must be between 1 and the vocabulary size {vocab_size}, but is {request.max_k}.")

    vocabulary = _vocabulary(request.tokenizer or base.tokenizer_hint, vocab_size, explicit=request.tokenizer)

    changed = count_changed_rows(a, b)
    log(f"rows changed (bitwise): {changed} of {vocab_size}")
    result = _ks_over_ranks(a, b, request.method, progress, gang)
    if gang is not None and gang.rank != 0:
        return None
    stat, pval = result.statistic.numpy(), result.pvalue.numpy()

    if request.top_k is not None:
        ids = select_top_k(stat, pval, request.top_k)
        rule: dict[str, Any] = {"kind": "top_k", "k": request.top_k}
        cert_alpha = request.cert_alpha
    else:
        assert request.alpha is not None
        ids = select_by_alpha(stat, pval, request.alpha, request.correction, request.max_k)  # type: ignore[arg-type]
        rule = {"kind": "alpha", "alpha": request.alpha, "correction": request.correction, "max_k": request.max_k}
        cert_alpha = request.alpha
        if ids.size == 0:
            log(
                f"no row rejects 'unchanged' at alpha={request.alpha:g} ({request.correction}): the ticket set is empty"
            )

    certificate = ks_certificate(
        stat,
        pval,
        ids,
        n=dim,
        alpha=cert_alpha,
        correction=request.correction,
        method=request.method,  # type: ignore[arg-type]
    )
    summary = {
        "rows_changed": changed,
        "max_statistic": float(stat.max()) if stat.size else None,
        "min_pvalue": _finite_or_none(float(np.nanmin(pval))) if pval.size and not np.isnan(pval).all() else None,
        "significant_rows": {
            c: int(reject_mask(pval, cert_alpha, c).sum())
            for c in CORRECTIONS  # type: ignore[arg-type]
        },
        "significance_alpha": cert_alpha,
        "dtype": _dtype(a),
    }
    tickets = TicketSet(
        token_ids=[int(i) for i in ids],
        statistics=[float(stat[i]) for i in ids],
        pvalues=[_finite_or_none(float(pval[i])) for i in ids],
        rule=rule,
        vocab_size=vocab_size,
        embed_dim=dim,
        tokens=[vocabulary.text(int(i)) for i in ids] if vocabulary is not None else None,
        ks_method=request.method,
        base_fingerprint=tensor_fingerprint(base.weight),
        tokenizer_fingerprint=vocabulary.fingerprint if vocabulary is not None else None,
        certificate=certificate,
        summary=summary,
        sources={
            "base": base.source,
            "tuned": tuned.source,
            **({"tokenizer": vocabulary.source} if vocabulary else {}),
        },
    )
    if request.stats_out is not None:
        _save_stats(request.stats_out, result)
    tickets.save(request.out)
    return SelectionOutcome(tickets=tickets, result=result, changed_rows=changed, vocabulary=vocabulary)


def _ks_over_ranks(a: torch.Tensor, b: torch.Tensor, method: str, progress: Any, gang: Any) -> KSResult:
    """The KS test of every row, split by rows across the processes of ``gang`` (if any) and gathered."""
    if gang is None or gang.size == 1:
        return ks_2samp_rows(a, b, method=method, progress=progress)  # type: ignore[arg-type]
    rows = a.shape[0]
    per_rank = -(-rows // gang.size)
    start, stop = min(rows, gang.rank * per_rank), min(rows, (gang.rank + 1) * per_rank)
    local = ks_2samp_rows(a[start:stop], b[start:stop], method=method, progress=progress)  # type: ignore[arg-type]
    mine = torch.zeros(2, per_rank, dtype=torch.float64)
    mine[0, : stop - start] = local.statistic
    mine[1, : stop - start] = local.pvalue
    device = gang.device
    gathered = [torch.empty(2, per_rank, dtype=torch.float64, device=device) for _ in range(gang.size)]
    gang.all_gather_to_list(gathered, mine.to(device))
    full = torch.cat([g.cpu() for g in gathered], dim=1)[:, :rows]
    return KSResult(full[0].contiguous(), full[1].contiguous(), local.n, method)


def count_changed_rows(a: torch.Tensor, b: torch.Tensor, chunk_rows: int = 8192) -> int:
    """How many rows differ in at least one coordinate (bitwise), read in chunks."""
    changed = 0
    for start in range(0, a.shape[0], chunk_rows):
        changed += int((a[start : start + chunk_rows] != b[start : start + chunk_rows]).any(dim=1).sum())
    return changed


def _comparable(
    base: LoadedEmbedding, tuned: LoadedEmbedding, allow_dtype_mismatch: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = base.weight, tuned.weight
    if a.shape != b.shape:
        raise SelectionError(
            f"The base and tuned embeddings have different shapes: {tuple(a.shape)} (`{base.source}`) and "
            f"{tuple(b.shape)} (`{tuned.source}`)."
        )
    if a.dtype != b.dtype:
        if not allow_dtype_mismatch:
            raise SelectionError(
                f"The base and tuned embeddings have different dtypes: {_dtype(a)} and {_dtype(b)}. Pass "
                "--allow-dtype-mismatch to compare both in the wider dtype."
            )
        wide = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(wide), b.to(wide)
    return a, b


def _vocabulary(spec: str | None, vocab_size: int, *, explicit: str | None) -> TokenVocabulary | None:
    if spec is None:
        return None
    try:
        vocabulary = load_token_vocabulary(spec)
    except TokenizerError:
        if explicit is not None:
            raise
        return None  # a tokenizer merely hinted at by the source is optional
    if vocabulary.size > vocab_size:
        raise TokenizerError(
            spec,
            f"it has {vocabulary.size} tokens but the embedding has only {vocab_size} rows; they do not belong "
            "together.",
        )
    return vocabulary


def _check_writable(path: Path) -> None:
    """Fail before the (possibly long) computation if the output cannot be written."""
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SelectionError(f"The output folder `{parent}` cannot be created ({exc.strerror or exc}).") from None
    if Path(path).is_dir():
        raise SelectionError(f"The output path `{path}` is a directory.")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".kslottery-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise SelectionError(f"The output folder `{parent}` is not writable ({exc.strerror or exc}).") from None


def _save_stats(path: Path, result: KSResult) -> None:
    from safetensors.torch import save_file

    with atomic_path(Path(path)) as tmp:
        save_file(
            {"statistic": result.statistic.contiguous(), "pvalue": result.pvalue.contiguous()},
            str(tmp),
            # One metadata key: safetensors writes several keys in no fixed order, and the file should be reproducible.
            metadata={"kslottery": json.dumps({"method": result.method, "n": result.n}, sort_keys=True)},
        )


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _finite_or_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def format_ticket_table(tickets: TicketSet, limit: int = 50) -> str:
    """The tickets as an aligned text table: rank, id, token, D, p."""
    lines = [f"{'#':>4}  {'id':>7}  {'token':<18}  {'D':>8}  {'p':>10}"]
    for rank, tid in enumerate(tickets.token_ids[:limit], start=1):
        idx = rank - 1
        token = repr(tickets.tokens[idx]) if tickets.tokens is not None else ""
        d = tickets.statistics[idx]
        p = tickets.pvalues[idx]
        d_text = f"{d:.5f}" if d is not None else "-"
        p_text = f"{p:.3e}" if p is not None else "-"
        lines.append(f"{rank:>4}  {tid:>7}  {token[:18]:<18}  {d_text:>8}  {p_text:>10}")
    if tickets.k > limit:
        lines.append(f"  ... {tickets.k - limit} more in the ticket file")
    return "\n".join(lines)


def describe_outcome(outcome: SelectionOutcome) -> str:
    """Table + certificate, as printed by the command."""
    t = outcome.tickets
    token_text = {}
    if outcome.vocabulary is not None and t.certificate and t.certificate.get("max_non_ticket_row") is not None:
        row = int(t.certificate["max_non_ticket_row"])
        token_text[row] = outcome.vocabulary.text(row)
    sig = t.summary["significant_rows"]
    lines = [
        f"{t.k} ticket(s) by rule {t.rule} from {t.vocab_size} rows x {t.embed_dim} dims "
        f"({t.summary['rows_changed']} rows changed).",
        f"rows significant at alpha={t.summary['significance_alpha']:g}: {sig['none']} uncorrected, "
        f"{sig['bh']} Benjamini-Hochberg, {sig['bonferroni']} Bonferroni.",
        format_ticket_table(t),
    ]
    if t.certificate is not None:
        lines.append(format_certificate(t.certificate, token_text))
    return "\n".join(lines)
