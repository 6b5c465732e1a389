"""The parallel-text dataset family (``kslottery_parallel``), registered with fairseq2 by the extension.

One dataset = one or more *sources* (a folder of split files, see :mod:`.parallel`; each with a direction and a
sampling weight), a prompt template and a length limit. It encodes every example once (prompt tokens, then
``" " + target`` + EOS), drops over-long ones (counted in the log), and builds fairseq2 data pipelines:

- training: shuffle (seeded), shard by data-parallel rank, optional length bucketing, collate, prefetch; several
  sources are mixed by weight. The pipeline is checkpointable, so a resumed run continues exactly.
- evaluation: prompts only (no shuffling), carrying the references, for generation.

Loss is on target tokens only: each :class:`~fairseq2.datasets.SequenceBatch` carries a ``target_mask`` that is True
on the target tokens and the EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import torch
from fairseq2.data.data_pipeline import (
    CollateOptionsOverride,
    Collater,
    DataPipeline,
    create_bucket_sizes,
    read_sequence,
)
from fairseq2.data.tokenizers import Tokenizer
from fairseq2.datasets import DataPipelineReader, SequenceBatch, SyncMode
from fairseq2.gang import Gangs
from fairseq2.logging import log
from fairseq2.utils.validation import ValidationResult

from fairseq2_kslottery.data.languages import LANGUAGES
from fairseq2_kslottery.data.parallel import SPLITS, DataError, ParallelExample, ReadReport, read_split
from fairseq2_kslottery.data.templates import PromptTemplate, TemplateError, get_template

__all__ = [
    "PARALLEL_DATASET_FAMILY",
    "ParallelSourceConfig",
    "ParallelDatasetConfig",
    "ParallelDataset",
    "EncodedExample",
    "open_parallel_dataset",
]

PARALLEL_DATASET_FAMILY: Final = "kslottery_parallel"


@dataclass(kw_only=True)
class ParallelSourceConfig:
    path: str = "builtin:smoke_en_de"
    """Folder with ``{split}.jsonl`` / ``{split}.tsv`` / ``{split}.{lang}`` files, ``builtin:NAME``, or
    ``bible:SRC:TGT`` (e.g. ``bible:eng-web:deu-elb``; its languages come from the Bible table)."""

    src_lang: str = "en"
    """Source language code (ISO 639-1/3); a JSONL line may override it."""

    tgt_lang: str = "de"
    """Target language code; a JSONL line may override it."""

    weight: float = 1.0
    """Sampling weight of this source in the training mix."""


@dataclass(kw_only=True)
class ParallelDatasetConfig:
    sources: list[ParallelSourceConfig] = field(default_factory=lambda: [ParallelSourceConfig()])
    """The parallel-text sources (directions) of this dataset."""

    template: str = "plain"
    """Prompt template: ``plain``, ``alpaca``, or a template string with ``{src}`` (and ``{src_lang}``,
    ``{tgt_lang}``)."""

    max_seq_len: int = 256
    """Longest prompt + target (tokens, incl. BOS/EOS) used for training; longer examples are dropped and counted."""

    max_examples: dict[str, int] = field(default_factory=dict)
    """Optional cap per split, e.g. ``{train: 2000, test: 32}`` (the first N of each split, in file order)."""

    def validate(self) -> ValidationResult:
        result = ValidationResult()
        if not self.sources:
            result.add_error("`sources` must name at least one parallel-text source.")
        for i, source in enumerate(self.sources):
            if source.weight <= 0:
                result.add_error(f"`sources[{i}].weight` must be positive, but is {source.weight}.")
            for name in ("src_lang", "tgt_lang"):
                code = getattr(source, name)
                if code.lower().split("_")[0].split("-")[0] not in LANGUAGES:
                    result.add_error(f"`sources[{i}].{name}` is an unknown language code: {code!r}.")
        try:
            get_template(self.template)
        except TemplateError as exc:
            result.add_error(str(exc))
        if self.max_seq_len < 4:
            result.add_error(f"`max_seq_len` must be at least 4, but is {self.max_seq_len}.")
        for split, n in self.max_examples.items():
            if split not in SPLITS:
                result.add_error(f"`max_examples` has an unknown split {split!r} (splits: {', '.join(SPLITS)}).")
            elif n < 1:
                result.add_error(f"`max_examples.{split}` must be positive, but is {n}.")
        return result


@dataclass(frozen=True)
class EncodedExample:
    prompt: torch.Tensor
    target: torch.Tensor
    example: ParallelExample
    source_index: int


class ParallelDataset:
    """Parallel text for KS-Lottery runs (see the module docstring)."""

    def __init__(self, config: ParallelDatasetConfig) -> None:
        self.config = config
        self.template: PromptTemplate = get_template(config.template)
        self._examples: dict[str, list[list[ParallelExample]]] = {}
        self._encoded: dict[tuple[str, int], list[EncodedExample]] = {}

    # --- raw examples -------------------------------------------------------------------------------------

    def examples(self, split: str) -> list[list[ParallelExample]]:
        """The usable pairs of ``split``, one list per source (read once, bad lines reported in the log)."""
        if split not in SPLITS:
            raise DataError(f"Unknown split `{split}`; splits are {', '.join(SPLITS)}.")
        if split not in self._examples:
            per_source = []
            for source in self.config.sources:
                report = ReadReport()
                found = read_split(source.path, split, source.src_lang, source.tgt_lang, report=report)
                cap = self.config.max_examples.get(split)
                if cap is not None:
                    found = found[:cap]
                log.info(
                    "Parallel data {} ({}, {}->{}): {}.",
                    source.path,
                    split,
                    source.src_lang,
                    source.tgt_lang,
                    report.summary(),
                )
                for problem in report.problems:
                    log.warning("Skipped {}", problem)
                per_source.append(found)
            self._examples[split] = per_source
        return self._examples[split]

    # --- encoding -----------------------------------------------------------------------------------------

    def encoded(self, split: str, tokenizer: Tokenizer, *, limit_length: bool = True) -> list[EncodedExample]:
        """Every example of ``split`` as prompt ids + target ids (``" " + tgt`` + EOS).

        With ``limit_length``, examples longer than ``max_seq_len`` tokens are dropped (and counted in the log).
        """
        key = (split, int(limit_length))
        if key in self._encoded:
            return self._encoded[key]
        prompt_encoder = tokenizer.create_encoder(mode="prompt")
        target_encoder = tokenizer.create_encoder(mode="prompt_response")
        out: list[EncodedExample] = []
        dropped = 0
        for source_index, examples in enumerate(self.examples(split)):
            for ex in examples:
                prompt = prompt_encoder(self.template.prompt(ex.src, ex.src_lang, ex.tgt_lang))
                target = target_encoder(self.template.target(ex.tgt))
                if limit_length and prompt.numel() + target.numel() > self.config.max_seq_len:
                    dropped += 1
                    continue
                out.append(EncodedExample(prompt, target, ex, source_index))
        if dropped:
            log.warning(
                "Dropped {} of {} {} examples longer than max_seq_len={} tokens.",
                dropped,
                dropped + len(out),
                split,
                self.config.max_seq_len,
            )
        if not out:
            raise DataError(
                f"No {split} example fits in max_seq_len={self.config.max_seq_len} tokens "
                f"({dropped} dropped); raise `dataset.config_overrides.max_seq_len`."
            )
        self._encoded[key] = out
        return out

    def target_token_counts(self, tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
        """How often each token id occurs in the training targets (incl. EOS); for frequency baselines."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        for item in self.encoded("train", tokenizer):
            ids = item.target.numpy()
            np.add.at(counts, ids[ids < vocab_size], 1)
        return counts

    # --- readers ------------------------------------------------------------------------------------------

    def create_train_reader(
        self,
        tokenizer: Tokenizer,
        gangs: Gangs,
        *,
        batch_size: int,
        seed: int,
        shuffle_window: int = 0,
        bucket_by_length: bool = False,
        num_accumulate: int = 1,
        num_prefetch: int = 2,
    ) -> DataPipelineReader[SequenceBatch]:
        """Shuffled, sharded, batched training examples; several sources are mixed by their weights."""
        encoded = self.encoded("train", tokenizer)
        by_source: list[list[dict[str, Any]]] = [[] for _ in self.config.sources]
        for item in encoded:
            by_source[item.source_index].append(_train_item(item))
        shuffled = [
            (read_sequence(items).shuffle(shuffle_window, seed=seed), source.weight)
            for source, items in zip(self.config.sources, by_source, strict=True)
            if items
        ]
        if len(shuffled) == 1:
            builder = shuffled[0][0]
        else:
            builder = DataPipeline.sample(
                [b.and_return() for b, _ in shuffled], weights=[w for _, w in shuffled], seed=seed
            )
        builder.shard(gangs.dp.rank, gangs.dp.size, allow_uneven=True)
        if bucket_by_length:
            sizes = create_bucket_sizes(
                max_num_elements=batch_size * self.config.max_seq_len, max_seq_len=self.config.max_seq_len
            )
            builder.bucket_by_length(sizes, selector="seqs", drop_remainder=False)
        else:
            builder.bucket(batch_size, drop_remainder=False)
        builder.map(_collater(tokenizer)).map(_to_train_batch).prefetch(num_prefetch)
        return DataPipelineReader[SequenceBatch](
            builder.and_return(),
            gangs,
            num_accumulate=num_accumulate,
            drop_remainder=False,
            sync=True,
            sync_mode=SyncMode.UNTIL_FIRST,
            strict_state=True,
        )

    def create_eval_reader(
        self,
        split: str,
        tokenizer: Tokenizer,
        gangs: Gangs,
        *,
        batch_size: int,
        prompt_only: bool,
    ) -> DataPipelineReader[SequenceBatch]:
        """Examples of ``split`` in file order, sharded by rank: prompts only (for generation) or full sequences
        with target masks (for validation loss). Each batch carries ``example`` = {src, ref, index, ...}."""
        encoded = self.encoded(split, tokenizer, limit_length=not prompt_only)
        items = [
            _prompt_item(item, index) if prompt_only else {**_train_item(item), "index": index}
            for index, item in enumerate(encoded)
        ]
        builder = read_sequence(items).shard(gangs.dp.rank, gangs.dp.size, allow_uneven=True)
        builder.bucket(batch_size, drop_remainder=False)
        builder.map(_collater(tokenizer)).map(_to_eval_batch if prompt_only else _to_train_batch)
        return DataPipelineReader[SequenceBatch](
            builder.and_return(),
            gangs,
            num_accumulate=1,
            drop_remainder=False,
            sync=True,
            sync_mode=SyncMode.UNTIL_LAST,
            strict_state=False,
        )


def _train_item(item: EncodedExample) -> dict[str, Any]:
    seqs = torch.cat([item.prompt, item.target])
    mask = torch.zeros(seqs.numel(), dtype=torch.bool)
    mask[item.prompt.numel() :] = True
    return {"seqs": seqs, "target_mask": mask, "ref": item.example.tgt, "src": item.example.src}


def _prompt_item(item: EncodedExample, index: int) -> dict[str, Any]:
    ex = item.example
    return {
        "seqs": item.prompt,
        "ref": ex.tgt,
        "src": ex.src,
        "index": index,
        "src_lang": ex.src_lang,
        "tgt_lang": ex.tgt_lang,
    }


def _collater(tokenizer: Tokenizer) -> Collater:
    info = tokenizer.vocab_info
    # Padding positions are excluded by the batch layout (sequence lengths) and the target mask, so any valid id
    # works as pad value when the tokenizer has none.
    pad = info.pad_idx if info.pad_idx is not None else 0
    return Collater(pad_value=pad, overrides=[CollateOptionsOverride("target_mask", pad_value=0)])


def _to_train_batch(data: dict[str, Any]) -> SequenceBatch:
    seqs = data["seqs"]
    example = {key: data[key] for key in ("ref", "src", "index") if key in data}
    return SequenceBatch(seqs["seqs"], seqs["seq_lens"], target_mask=data["target_mask"]["seqs"], example=example)


def _to_eval_batch(data: dict[str, Any]) -> SequenceBatch:
    seqs = data["seqs"]
    example = {key: data[key] for key in ("ref", "src", "index", "src_lang", "tgt_lang")}
    return SequenceBatch(seqs["seqs"], seqs["seq_lens"], example=example)


def open_parallel_dataset(config: ParallelDatasetConfig) -> ParallelDataset:
    """The fairseq2 dataset opener of the ``kslottery_parallel`` family."""
    return ParallelDataset(config)
