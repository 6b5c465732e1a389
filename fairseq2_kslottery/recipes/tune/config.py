"""Configuration of the tuning recipe (``python -m fairseq2_kslottery.recipes.tune``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from fairseq2.recipe.config import (
    AdamWConfig,
    BeamSearchConfig,
    CommonSection,
    CosineAnnealingLRConfig,
    DatasetSection,
    GangSection,
    LRSchedulerSection,
    MixedPrecisionConfig,
    ModelSection,
    OptimizerSection,
    RegimeSection,
    SequenceGeneratorSection,
    TokenizerSection,
    TrainerSection,
)
from fairseq2.utils.validation import ValidationResult

from fairseq2_kslottery.data.dataset import PARALLEL_DATASET_FAMILY
from fairseq2_kslottery.embedding import TIED_MODES
from fairseq2_kslottery.optim import TRAINABLE_ADAMW

__all__ = ["TuneConfig", "TuningSection", "BatchingSection", "ValidationSection", "MODES", "BASELINES"]

MODES: Final = ("full", "embed", "tickets")
BASELINES: Final = ("random", "random_frequency", "most_frequent", "newline", "explicit")


@dataclass(kw_only=True)
class TuningSection:
    mode: str = "embed"
    """``full`` (every parameter), ``embed`` (the input embedding only: the reference tuning) or ``tickets`` (only
    the rows of a ticket file or of a baseline set)."""

    tickets: str | None = None
    """With ``tickets``: the ticket file whose rows are trained (its k also sizes the baselines)."""

    baseline: str | None = None
    """With ``tickets``, instead of (or sized by) the ticket file: ``random`` (uniform over tokens that occur in the
    training targets), ``random_frequency`` (matched token by token to the training frequency of the ticket file's
    tokens), ``most_frequent`` (the k most frequent target tokens), ``newline`` (the newline token(s) only) or
    ``explicit`` (``token_ids``)."""

    k: int | None = None
    """Size of a ``random``/``most_frequent`` baseline; default: the size of ``tickets``."""

    token_ids: list[int] = field(default_factory=list)
    """The rows of an ``explicit`` baseline."""

    seed: int = 0
    """Seed of the random baselines."""

    tied: str = "input_only"
    """For models with tied input/output embeddings, in ``embed`` and ``tickets`` modes: ``input_only`` (default;
    the output projection keeps the original matrix — otherwise the softmax gradient moves every row) or ``tied``
    (the trained rows also change the output projection)."""

    def validate(self) -> ValidationResult:
        result = ValidationResult()
        if self.mode not in MODES:
            result.add_error(f"`tuning.mode` must be one of {', '.join(MODES)}, but is {self.mode!r}.")
        if self.tied not in TIED_MODES:
            result.add_error(f"`tuning.tied` must be one of {', '.join(TIED_MODES)}, but is {self.tied!r}.")
        if self.baseline is not None and self.baseline not in BASELINES:
            result.add_error(f"`tuning.baseline` must be one of {', '.join(BASELINES)}, but is {self.baseline!r}.")
        if self.mode == "tickets":
            if self.baseline is None and self.tickets is None:
                result.add_error("`tuning.mode: tickets` needs `tuning.tickets` (a ticket file) or `tuning.baseline`.")
            if self.baseline == "random_frequency" and self.tickets is None:
                result.add_error("`tuning.baseline: random_frequency` matches the tokens of `tuning.tickets`; set it.")
            if self.baseline in ("random", "most_frequent") and self.tickets is None and self.k is None:
                result.add_error(f"`tuning.baseline: {self.baseline}` needs `tuning.k` or `tuning.tickets`.")
            if self.baseline == "explicit" and not self.token_ids:
                result.add_error("`tuning.baseline: explicit` needs `tuning.token_ids`.")
        elif self.tickets is not None or self.baseline is not None:
            result.add_error(f"`tuning.tickets`/`tuning.baseline` only apply to `mode: tickets`, not {self.mode!r}.")
        if self.k is not None and self.k < 1:
            result.add_error(f"`tuning.k` must be positive, but is {self.k}.")
        return result


@dataclass(kw_only=True)
class BatchingSection:
    batch_size: int = 8
    """Training examples per batch (per data-parallel rank)."""

    num_accumulate: int = 1
    """Batches accumulated per optimizer step."""

    shuffle_window: int = 0
    """Shuffle buffer (0 = shuffle the whole training set)."""

    bucket_by_length: bool = False
    """Batch examples of similar length together (batch size then adapts to a token budget)."""

    def validate(self) -> ValidationResult:
        result = ValidationResult()
        if self.batch_size < 1:
            result.add_error(f"`batching.batch_size` must be positive, but is {self.batch_size}.")
        if self.num_accumulate < 1:
            result.add_error(f"`batching.num_accumulate` must be positive, but is {self.num_accumulate}.")
        return result


@dataclass(kw_only=True)
class ValidationSection:
    split: str = "valid"
    """Split used for validation during training."""

    generate: bool = True
    """Translate the validation split and score it (BLEU, chrF, first-line BLEU, EOS rate...)."""

    nll: bool = True
    """Also report the loss on the validation targets."""

    batch_size: int = 16
    """Prompts per generation batch."""

    cut_at_newline: bool = False
    """Score only the first line of each hypothesis (first-line BLEU is reported either way)."""


@dataclass(kw_only=True)
class TuneConfig:
    model: ModelSection = field(default_factory=lambda: ModelSection(family="llama", arch="kslottery_tiny"))
    """The model to tune: ``name`` (asset card), ``path`` + ``family`` (checkpoint), or ``family`` + ``arch``
    (random initialisation; its initial weights are saved as ``initial_model.pt``)."""

    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)

    dataset: DatasetSection = field(default_factory=lambda: DatasetSection(family=PARALLEL_DATASET_FAMILY))

    tuning: TuningSection = field(default_factory=TuningSection)

    batching: BatchingSection = field(default_factory=BatchingSection)

    validation: ValidationSection = field(default_factory=ValidationSection)

    trainer: TrainerSection = field(
        default_factory=lambda: TrainerSection(mixed_precision=MixedPrecisionConfig(mode="off"), gc_every_n_steps=None)
    )

    regime: RegimeSection = field(
        default_factory=lambda: RegimeSection(
            num_steps=200,
            validate_every_n_steps=100,
            checkpoint_every_n_steps=100,
            keep_last_n_checkpoints=1,
            publish_metrics_every_n_steps=10,
        )
    )

    optimizer: OptimizerSection = field(
        default_factory=lambda: OptimizerSection(name=TRAINABLE_ADAMW, config=AdamWConfig(lr=1e-3, weight_decay=0.0))
    )

    lr_scheduler: LRSchedulerSection = field(
        default_factory=lambda: LRSchedulerSection(
            name="cosine_annealing", config=CosineAnnealingLRConfig(num_warmup_steps=0, final_lr_scale=0.1)
        )
    )

    seq_generator: SequenceGeneratorSection = field(
        default_factory=lambda: SequenceGeneratorSection(
            name="beam_search", config=BeamSearchConfig(beam_size=1, max_gen_len=64)
        )
    )

    common: CommonSection = field(default_factory=CommonSection)

    gang: GangSection = field(default_factory=GangSection)

    def validate(self) -> ValidationResult:
        result = ValidationResult()
        generated = {"bleu", "kslottery_chrf", "first_line_bleu", "spbleu", "eos_rate", "length_ratio"}
        if self.regime.score_metric in generated and not self.validation.generate:
            result.add_error(
                f"`regime.score_metric: {self.regime.score_metric}` comes from generation; set "
                "`validation.generate: true` or choose `nll_loss`."
            )
        if self.regime.score_metric == "nll_loss" and not self.validation.nll:
            result.add_error("`regime.score_metric: nll_loss` needs `validation.nll: true`.")
        return result
