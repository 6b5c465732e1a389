"""Recipe and config of the standalone evaluation (see the package docstring for the command line).

Writes ``hypotheses/{split}_step_0.jsonl`` (source, reference, hypothesis, raw continuation, EOS flag per example)
and ``scores.json`` (BLEU, chrF, first-line BLEU, EOS rate, length ratio, spBLEU or the notice why not, sacrebleu
signatures), besides fairseq2's ``metrics/`` and ``logs/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import final

import fairseq2.recipe  # noqa: F401  (fairseq2.evaluator imports cleanly only after fairseq2.recipe)
from fairseq2.evaluator import Evaluator
from fairseq2.logging import log
from fairseq2.recipe.base import Recipe, RecipeContext
from fairseq2.recipe.config import (
    BeamSearchConfig,
    CommonSection,
    DatasetSection,
    EvaluatorSection,
    GangSection,
    ReferenceModelSection,
    SequenceGeneratorSection,
    TokenizerSection,
)
from fairseq2.runtime.dependency import DependencyContainer
from fairseq2.task import Task
from fairseq2.utils.validation import ValidationResult
from torch.nn import Module
from typing_extensions import override

from fairseq2_kslottery.data.dataset import PARALLEL_DATASET_FAMILY, ParallelDataset
from fairseq2_kslottery.data.parallel import SPLITS
from fairseq2_kslottery.evaluation import TranslationEvalUnit, max_gen_len
from fairseq2_kslottery.io import atomic_write_text
from fairseq2_kslottery.metrics import score_translations
from fairseq2_kslottery.patches import TicketPatch, apply_patch
from fairseq2_kslottery.recipes._common import register_user_errors

__all__ = ["EvaluateConfig", "EvaluateRecipe", "EvaluationSection"]


@dataclass(kw_only=True)
class EvaluationSection:
    split: str = "test"
    """Which split of the dataset to translate."""

    batch_size: int = 16
    """Prompts per generation batch."""

    cut_at_newline: bool = False
    """Score only the first line of each hypothesis (first-line BLEU is reported either way)."""

    def validate(self) -> ValidationResult:
        result = ValidationResult()
        if self.split not in SPLITS:
            result.add_error(f"`evaluation.split` must be one of {', '.join(SPLITS)}, but is {self.split!r}.")
        if self.batch_size < 1:
            result.add_error(f"`evaluation.batch_size` must be positive, but is {self.batch_size}.")
        return result


@dataclass(kw_only=True)
class EvaluateConfig:
    model: ReferenceModelSection = field(default_factory=ReferenceModelSection)
    """The model: ``name`` (asset card, e.g. ``last_checkpoint`` with ``common.assets.prev_checkpoint_dir``) or
    ``path`` + ``family`` (+ ``arch``, ``config_overrides``)."""

    patch: str | None = None
    """A ticket patch (``fairseq2-kslottery export``/``transfer``) applied to the model before generation."""

    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)

    dataset: DatasetSection = field(default_factory=lambda: DatasetSection(family=PARALLEL_DATASET_FAMILY))

    evaluation: EvaluationSection = field(default_factory=EvaluationSection)

    seq_generator: SequenceGeneratorSection = field(
        default_factory=lambda: SequenceGeneratorSection(
            name="beam_search", config=BeamSearchConfig(beam_size=1, max_gen_len=64)
        )
    )

    evaluator: EvaluatorSection = field(default_factory=EvaluatorSection)

    common: CommonSection = field(default_factory=CommonSection)

    gang: GangSection = field(default_factory=GangSection)


@final
class EvaluateRecipe(Recipe):
    """Translate a split with a model (optionally patched) and score it."""

    @override
    def register(self, container: DependencyContainer) -> None:
        register_user_errors(container)

    @property
    @override
    def config_kls(self) -> type[object]:
        return EvaluateConfig

    @override
    def setup_model(self, context: RecipeContext, model: Module, newly_initialized: bool) -> Module:
        # In an inference recipe fairseq2 calls this hook for the `model` section.
        config = context.get_config_as(EvaluateConfig)
        if config.patch:
            patch = TicketPatch.load(config.patch)
            apply_patch(model, patch)
            log.info("Applied the ticket patch {} ({} rows, output side {}).", config.patch, patch.k, patch.output_side)
        return model

    @override
    def create_task(self, context: RecipeContext) -> Task:
        config = context.get_config_as(EvaluateConfig)
        tokenizer = context.get_tokenizer()
        dataset = context.get_dataset_as(ParallelDataset)
        section = config.evaluation
        unit = TranslationEvalUnit(
            context.get_seq_generator(),
            tokenizer,
            max_gen_len=max_gen_len(config.seq_generator.config),
            cut_at_newline=section.cut_at_newline,
            hypotheses_dir=context.output_dir / "hypotheses",
            split=section.split,
            rank=context.gangs.dp.rank,
            total=_shard_size(len(dataset.encoded(section.split, tokenizer, limit_length=False)), context.gangs),
        )
        reader = dataset.create_eval_reader(
            section.split, tokenizer, context.gangs, batch_size=section.batch_size, prompt_only=True
        )
        evaluator = context.create_evaluator([unit], [reader])
        return _ScoringTask(evaluator, unit, context.output_dir, context.gangs.root.rank == 0)


def _shard_size(count: int, gangs: object) -> int:
    dp = gangs.dp  # type: ignore[attr-defined]
    return len(range(dp.rank, count, dp.size))


@final
class _ScoringTask(Task):
    """fairseq2's evaluator, then ``scores.json`` from the hypotheses (rank 0)."""

    def __init__(self, evaluator: Evaluator, unit: TranslationEvalUnit, output_dir: Path, is_root: bool) -> None:
        self._evaluator = evaluator
        self._unit = unit
        self._output_dir = output_dir
        self._is_root = is_root

    @override
    def run(self) -> None:
        self._evaluator.run()
        if not self._is_root:
            return
        records = self._unit.last_records
        scores = score_translations(
            [r["hyp"] for r in records], [r["ref"] for r in records], [r["eos"] for r in records]
        )
        if scores.notice:
            log.info("{}", scores.notice)
        path = self._output_dir / "scores.json"
        atomic_write_text(path, json.dumps(scores.as_dict(), indent=2) + "\n")
        log.info(
            "BLEU {:.2f} | chrF {:.2f} | first-line BLEU {:.2f} | EOS rate {:.3f} | length ratio {:.3f} -> {}",
            scores.bleu,
            scores.chrf,
            scores.first_line_bleu,
            scores.eos_rate,
            scores.length_ratio,
            path,
        )

    @override
    def request_stop(self) -> None:
        self._evaluator.request_stop()

    @property
    @override
    def step_nr(self) -> int:
        return self._evaluator.step_nr

    @override
    def close(self) -> None:
        self._evaluator.close()
