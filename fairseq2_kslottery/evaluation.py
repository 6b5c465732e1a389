"""Evaluation with generation, as fairseq2 eval units (used for validation inside training and by the standalone
``evaluate`` recipe).

:class:`TranslationEvalUnit` generates a translation for every prompt with fairseq2's sequence generator and feeds
BLEU, chrF, first-line BLEU, EOS rate, length ratio (and spBLEU when its model is cached) into the metric bag; the
metrics accumulate sacrebleu's sufficient statistics, so the corpus scores equal sacrebleu's on the same strings and
merge correctly across data-parallel ranks. Hypotheses are written to a JSONL file.

Hypothesis = the generated tokens after the prompt, up to the first EOS, decoded; a hypothesis that reaches
``max_gen_len`` tokens without EOS counts as not terminated. ``cut_at_newline`` keeps only its first line for the
BLEU/chrF scores (first-line BLEU always uses the first line).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import fairseq2.recipe  # noqa: F401  (fairseq2.evaluator imports cleanly only after fairseq2.recipe)
import torch
from fairseq2.data.tokenizers import Tokenizer
from fairseq2.datasets import SequenceBatch
from fairseq2.evaluator import EvalUnit
from fairseq2.generation import SequenceGenerator
from fairseq2.logging import log
from fairseq2.metrics import Mean, MetricBag, format_as_float
from fairseq2.metrics.common import (
    add_nll_loss_metric,
    add_seq_batch_metrics,
    update_nll_loss_metric,
    update_seq_batch_metrics,
)
from fairseq2.metrics.recorders import MetricDescriptor
from fairseq2.recipe.config import BeamSearchConfig, SamplingConfig
from torch import Tensor
from torch.nn import Module
from torcheval.metrics import Metric
from typing_extensions import Self, override

from fairseq2_kslottery.errors import KSLotteryError
from fairseq2_kslottery.io import atomic_write_text
from fairseq2_kslottery.metrics import clean_hypothesis, first_line, spbleu_model_path

__all__ = [
    "METRIC_DESCRIPTORS",
    "SacreStatsMetric",
    "TranslationEvalUnit",
    "NllEvalUnit",
    "extract_hypothesis",
    "max_gen_len",
]

METRIC_DESCRIPTORS: Final = (
    MetricDescriptor("kslottery_chrf", "chrF", 201, format_as_float, higher_better=True),
    MetricDescriptor("first_line_bleu", "First-line BLEU", 202, format_as_float, higher_better=True),
    MetricDescriptor("spbleu", "spBLEU", 203, format_as_float, higher_better=True),
    MetricDescriptor("eos_rate", "EOS Rate", 204, format_as_float, higher_better=True),
    MetricDescriptor("length_ratio", "Length Ratio", 205, format_as_float),
)
"""Display names of this package's metrics; the extension registers them so that ``regime.score_metric`` accepts
``first_line_bleu``, ``eos_rate``... BLEU is recorded under fairseq2's own name ``bleu`` (so ``score_metric: bleu``
keeps the best checkpoint) but computed exactly as sacrebleu's corpus BLEU, exponential smoothing included. chrF
gets its own name because fairseq2's ``chrf`` means chrF++."""


def max_gen_len(generator_config: object) -> int:
    """The ``max_gen_len`` of a beam-search or sampling generator config (a fixed number of tokens: the EOS rate
    counts a hypothesis as terminated when it stops within that budget)."""
    if isinstance(generator_config, (BeamSearchConfig, SamplingConfig)):
        value = generator_config.max_gen_len
        if isinstance(value, int):
            return value
        raise KSLotteryError(
            f"`seq_generator.config.max_gen_len` must be a number of tokens here, not the prompt-relative {value}."
        )
    raise KSLotteryError(f"Unsupported sequence generator configuration `{type(generator_config).__name__}`.")


class SacreStatsMetric(Metric[Tensor]):
    """A corpus-level sacrebleu metric (BLEU, chrF, ...) as a torcheval metric: it sums sacrebleu's sufficient
    statistics, so ``compute()`` equals ``metric.corpus_score(all_hyps, [all_refs]).score`` and states merge across
    ranks."""

    # sacrebleu's per-sentence statistics are integer counts (n-gram matches, lengths); their sums are the corpus
    # statistics from which it computes the corpus score.

    def __init__(self, factory: Callable[[], Any]) -> None:
        super().__init__()
        self._metric = factory()
        width = len(self._metric._extract_corpus_statistics(["a"], [["a"]])[0])
        self.stats: Tensor
        self._add_state("stats", torch.zeros((width,), dtype=torch.int64))

    @override
    @torch.inference_mode()
    def update(self, refs: Sequence[str], hyps: Sequence[str]) -> Self:
        rows = self._metric._extract_corpus_statistics(list(hyps), [list(refs)])
        if rows:
            self.stats += torch.tensor(rows, dtype=torch.int64, device=self.device).sum(dim=0)
        return self

    @override
    @torch.inference_mode()
    def compute(self) -> Tensor:
        score = self._metric._compute_score_from_stats(self.stats.tolist())
        return torch.tensor(float(score.score), dtype=torch.float64, device=self.device)

    @override
    @torch.inference_mode()
    def merge_state(self, metrics: Iterable[SacreStatsMetric]) -> Self:
        for other in metrics:
            self.stats += other.stats.to(self.device)
        return self


def _bleu() -> Any:
    from sacrebleu.metrics import BLEU

    return BLEU()


def _chrf() -> Any:
    from sacrebleu.metrics import CHRF

    return CHRF()


def _spbleu() -> Any:
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize="flores200")


def extract_hypothesis(seq: Tensor, eos_idx: int, max_gen_len: int) -> tuple[list[int], bool]:
    """Generated ids up to the first EOS, and whether that EOS came within ``max_gen_len`` tokens.

    fairseq2's generator forces an EOS at the length limit, and shorter prompts in a batch may get a few more
    tokens than longer ones; cutting at ``max_gen_len`` makes the EOS rate independent of batch composition.
    """
    ids = seq.tolist()
    end = ids.index(eos_idx) if eos_idx in ids else len(ids)
    if end < max_gen_len:
        return ids[:end], True
    return ids[: min(end, max_gen_len)], False


class TranslationEvalUnit(EvalUnit[SequenceBatch]):
    """Generate, score and record translations (see the module docstring)."""

    def __init__(
        self,
        generator: SequenceGenerator,
        tokenizer: Tokenizer,
        *,
        max_gen_len: int,
        cut_at_newline: bool,
        hypotheses_dir: Path | None,
        split: str,
        name: str = "translation",
        rank: int = 0,
        total: int | None = None,
    ) -> None:
        self._generator = generator
        self._decoder = tokenizer.create_decoder(skip_special_tokens=True)
        eos = tokenizer.vocab_info.eos_idx
        if eos is None:
            raise ValueError("The tokenizer has no EOS token; generation needs one.")
        self._eos = int(eos)
        self._vocab_size = int(tokenizer.vocab_info.size)
        self._max_gen_len = max_gen_len
        self._cut = cut_at_newline
        self._dir = hypotheses_dir
        self._split = split
        self._name = name
        self._rank = rank
        self._step_nr = 0
        self._total = total
        self._records: list[dict[str, Any]] = []
        self._spbleu = spbleu_model_path().is_file()
        self.last_records: list[dict[str, Any]] = []

    @property
    @override
    def name(self) -> str | None:
        return self._name

    @override
    def set_train_step_nr(self, step_nr: int) -> None:
        self._step_nr = step_nr

    @override
    def prepare_metric_bag(self, metric_bag: MetricBag) -> None:
        self._records = []
        metric_bag.add("bleu", SacreStatsMetric(_bleu))
        metric_bag.add("kslottery_chrf", SacreStatsMetric(_chrf))
        metric_bag.add("first_line_bleu", SacreStatsMetric(_bleu))
        if self._spbleu:
            metric_bag.add("spbleu", SacreStatsMetric(_spbleu))
        metric_bag.add("eos_rate", Mean())
        metric_bag.add("length_ratio", Mean())

    @override
    def process_batch(self, batch: SequenceBatch, metric_bag: MetricBag) -> None:
        seqs, layout = batch.as_input()
        output = self._generator(seqs, layout)
        example: dict[str, list[Any]] = batch.example  # type: ignore[assignment]
        refs: list[str] = example["ref"]
        hyps, firsts, ended = [], [], []
        for i, hypotheses in enumerate(output.hypotheses):
            ids, eos = extract_hypothesis(hypotheses[0].seq, self._eos, self._max_gen_len)
            # Models with padded vocabularies can emit ids the tokenizer does not know; they decode to nothing.
            known = [i for i in ids if i < self._vocab_size]
            raw = self._decoder(torch.tensor(known, dtype=torch.int64)) if known else ""
            hyp = clean_hypothesis(raw, cut_at_newline=self._cut)
            hyps.append(hyp)
            firsts.append(first_line(raw))
            ended.append(eos)
            self._records.append(
                {
                    "index": int(example["index"][i]),
                    "src": example["src"][i],
                    "ref": refs[i],
                    "hyp": hyp,
                    "raw": raw,
                    "eos": eos,
                    "num_tokens": len(ids),
                }
            )
        metric_bag.get("bleu", SacreStatsMetric).update(refs, hyps)
        metric_bag.get("kslottery_chrf", SacreStatsMetric).update(refs, hyps)
        metric_bag.get("first_line_bleu", SacreStatsMetric).update(refs, firsts)
        if self._spbleu:
            metric_bag.get("spbleu", SacreStatsMetric).update(refs, hyps)
        n = len(refs)
        if self._total:
            log.info("Generated {}/{} translations.", len(self._records), self._total)
        metric_bag.get("eos_rate", Mean).update(torch.tensor(sum(ended) / n), weight=n)
        ratio = sum(len(h) / max(len(r), 1) for h, r in zip(hyps, refs, strict=True)) / n
        metric_bag.get("length_ratio", Mean).update(torch.tensor(ratio), weight=n)

    @override
    def finalize(self, metric_bag: MetricBag) -> None:
        self.last_records = sorted(self._records, key=lambda r: r["index"])
        if self._dir is None:
            return
        self._dir.mkdir(parents=True, exist_ok=True)
        suffix = f".rank_{self._rank}" if self._rank else ""
        path = self._dir / f"{self._split}_step_{self._step_nr}{suffix}.jsonl"
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.last_records)
        atomic_write_text(path, text)


class NllEvalUnit(EvalUnit[SequenceBatch]):
    """Loss on the target tokens of a validation split (no generation)."""

    def __init__(self, model: Module, name: str = "nll") -> None:
        self._model = model
        self._name = name

    @property
    @override
    def name(self) -> str | None:
        return self._name

    @override
    def prepare_metric_bag(self, metric_bag: MetricBag) -> None:
        add_nll_loss_metric(metric_bag)
        add_seq_batch_metrics(metric_bag)

    @override
    def process_batch(self, batch: SequenceBatch, metric_bag: MetricBag) -> None:
        input_batch, target_batch = batch.as_auto_regressive()
        seqs, layout = input_batch.as_input()
        loss = self._model(seqs, layout, targets=target_batch.seqs, target_mask=target_batch.target_mask)
        update_nll_loss_metric(metric_bag, loss, target_batch.num_target_elements)
        update_seq_batch_metrics(metric_bag, target_batch)
