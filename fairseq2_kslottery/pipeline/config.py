"""The experiment file: one YAML (read with OmegaConf — interpolation, ``key=value`` overrides) that describes a whole
KS-Lottery experiment. Every field is documented here and in the README; unknown keys, wrong types and unresolved
interpolations are errors that name the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fairseq2_kslottery.errors import KSLotteryError

__all__ = [
    "ExperimentConfigError",
    "ExperimentConfig",
    "ModelConfig",
    "DirectionConfig",
    "DataConfig",
    "TrainingConfig",
    "SelectionConfig",
    "RuleConfig",
    "EvaluationConfig",
    "load_experiment",
]


class ExperimentConfigError(KSLotteryError):
    """The experiment file cannot be read or does not describe a valid experiment."""


@dataclass
class ModelConfig:
    name: str | None = "smollm2_135m_instruct"
    """fairseq2 model asset card of the base model."""

    path: str | None = None
    """Instead of ``name``: a checkpoint path (then ``family``/``arch``/``config_overrides`` describe it)."""

    family: str | None = None
    arch: str | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)

    tokenizer: str = "smollm2_135m_instruct_tokenizer"
    """fairseq2 tokenizer asset card, or a tokenizer file path (then ``tokenizer_family`` says how to read it)."""

    tokenizer_family: str | None = None
    """With a tokenizer path: its fairseq2 tokenizer family (e.g. ``llama``)."""

    prepare: str | None = "smollm2"
    """Offline asset to convert before the first stage (``smollm2``), or null."""

    dtype: str = "float32"


@dataclass
class DirectionConfig:
    name: str = "en-de"
    """Short name; used for stage folders."""

    source: str = "bible:eng-web:deu-elb"
    """A parallel-text source: ``bible:SRC:TGT``, a folder of split files, or ``builtin:NAME``."""

    src_lang: str = "en"
    tgt_lang: str = "de"
    weight: float = 1.0
    """Weight of this direction in a mixed (union) run."""


@dataclass
class DataConfig:
    template: str = "plain"
    """Prompt template: ``plain``, ``alpaca`` or a string with ``{src}``."""

    max_seq_len: int = 256
    max_examples: dict[str, int] = field(default_factory=dict)
    """Per-split caps, e.g. ``{train: 2000, valid: 32, test: 32}``."""


@dataclass
class TrainingConfig:
    """One training stage (reference or ticket tuning)."""

    steps: int | None = 100
    """Optimizer steps; or null and ``epochs``."""

    epochs: float | None = None
    """Passes over the training data (turned into steps from the number of training examples)."""

    lr: float = 1e-3
    batch_size: int = 8
    num_accumulate: int = 1
    weight_decay: float = 0.0
    warmup_steps: int = 0
    checkpoint_every_n_steps: int | None = None
    """Default: about 4 checkpoints per stage (interrupted stages resume from the last one)."""

    data_parallelism: str = "ddp"
    """``ddp`` or ``fsdp`` when the stage runs on several processes (``launcher``)."""


@dataclass
class RuleConfig:
    top_k: int | None = None
    alpha: float | None = None
    correction: str = "none"
    max_k: int | None = None

    def label(self) -> str:
        if self.top_k is not None:
            return f"top{self.top_k}"
        suffix = f"_max{self.max_k}" if self.max_k is not None else ""
        return f"alpha{self.alpha:g}_{self.correction}{suffix}".replace(".", "p")


@dataclass
class SelectionConfig:
    rules: list[RuleConfig] = field(default_factory=lambda: [RuleConfig(top_k=20)])
    method: str = "auto"
    cert_alpha: float = 0.05
    correction: str = "none"
    """Correction for the certificate of top-k rules."""


@dataclass
class EvaluationConfig:
    split: str = "test"
    beam_size: int = 1
    max_gen_len: int = 64
    batch_size: int = 16
    cut_at_newline: bool = False


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    output_dir: str | None = None
    """Default: ``runs/<name>`` (relative to the working directory)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    directions: list[DirectionConfig] = field(default_factory=lambda: [DirectionConfig()])
    data: DataConfig = field(default_factory=DataConfig)

    reference_mode: str = "embed"
    """Reference tuning: ``embed`` (the paper's) or ``full``."""

    tied: str = "input_only"
    """For tied models: ``input_only`` or ``tied`` (see the tune recipe)."""

    reference: TrainingConfig = field(default_factory=TrainingConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    tickets: TrainingConfig = field(default_factory=lambda: TrainingConfig(lr=1e-2))

    baselines: list[str] = field(default_factory=lambda: ["random_frequency", "most_frequent", "newline"])
    """Baselines trained at the k of each rule: ``random``, ``random_frequency``, ``most_frequent``, ``newline``."""

    transfer: bool = True
    """Also evaluate the partial transfer (tuned rows copied into the base model) of each rule."""

    union: bool = False
    """With several directions: also train the union of their tickets (first rule) on the mixed data."""

    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    evaluate_base: bool = True

    seed: int = 2
    launcher: list[str] = field(default_factory=list)
    """Command prefix for training stages, e.g. ``[torchrun, --nproc-per-node, "8"]``; default: this Python."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Raw fairseq2 config overrides for every tune stage (e.g. ``{trainer: {mixed_precision: {mode: static}}}``)."""

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name


_CHOICES = {
    "reference_mode": ("embed", "full"),
    "tied": ("input_only", "tied"),
}


def _validate(cfg: ExperimentConfig) -> None:
    problems = []
    for key, allowed in _CHOICES.items():
        if getattr(cfg, key) not in allowed:
            problems.append(f"`{key}` must be one of {', '.join(allowed)}, but is {getattr(cfg, key)!r}")
    if not cfg.directions:
        problems.append("`directions` must list at least one direction")
    names = [d.name for d in cfg.directions]
    if len(set(names)) != len(names):
        problems.append("`directions[*].name` must be distinct")
    if not cfg.selection.rules:
        problems.append("`selection.rules` must list at least one rule")
    for i, rule in enumerate(cfg.selection.rules):
        if (rule.top_k is None) == (rule.alpha is None):
            problems.append(f"`selection.rules[{i}]` needs exactly one of `top_k` and `alpha`")
        if rule.correction not in ("none", "bonferroni", "bh"):
            problems.append(f"`selection.rules[{i}].correction` must be none, bonferroni or bh")
    for b in cfg.baselines:
        if b not in ("random", "random_frequency", "most_frequent", "newline"):
            problems.append(f"unknown baseline {b!r} (random, random_frequency, most_frequent, newline)")
    for stage in ("reference", "tickets"):
        t: TrainingConfig = getattr(cfg, stage)
        if (t.steps is None) == (t.epochs is None):
            problems.append(f"`{stage}` needs exactly one of `steps` and `epochs`")
        if t.batch_size < 1 or t.lr <= 0:
            problems.append(f"`{stage}.batch_size` and `{stage}.lr` must be positive")
    if cfg.model.name is None and cfg.model.path is None:
        problems.append("`model.name` or `model.path` must be set")
    if cfg.union and len(cfg.directions) < 2:
        problems.append("`union: true` needs at least two directions")
    if problems:
        raise ExperimentConfigError("The experiment file is not valid: " + "; ".join(problems) + ".")


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read ``path`` (OmegaConf YAML) with ``key=value`` overrides into a validated :class:`ExperimentConfig`.

    :raises ExperimentConfigError: unreadable file, unknown key, wrong type, unresolved interpolation, invalid values.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise ExperimentConfigError(f"The experiment file `{path}` does not exist.")
    try:
        schema = OmegaConf.structured(ExperimentConfig)
        loaded = OmegaConf.load(path)
        merged = OmegaConf.merge(schema, loaded, OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.resolve(merged)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ExperimentConfigError(f"`{path}`: {_omegaconf_message(exc)}") from None
    except (OSError, ValueError) as exc:
        raise ExperimentConfigError(f"`{path}` cannot be read ({exc}).") from None
    assert isinstance(cfg, ExperimentConfig)
    _validate(cfg)
    return cfg


def _omegaconf_message(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    head = text[0] if text else type(exc).__name__
    key = getattr(exc, "full_key", None)
    return f"{head} (key `{key}`)" if key and key not in head else head
