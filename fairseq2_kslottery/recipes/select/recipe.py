"""Recipe and config of the selection stage (see the package docstring for the command line)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import final

from fairseq2.gang import Gang
from fairseq2.logging import log
from fairseq2.recipe.base import Recipe, RecipeContext
from fairseq2.recipe.config import CommonSection, GangSection
from fairseq2.runtime.dependency import DependencyContainer
from fairseq2.task import Task
from fairseq2.utils.validation import ValidationResult
from typing_extensions import override

from fairseq2_kslottery.ks import KS_METHODS
from fairseq2_kslottery.recipes._common import register_user_errors
from fairseq2_kslottery.selection import SelectionRequest, describe_outcome, run_selection
from fairseq2_kslottery.tickets import CORRECTIONS


@dataclass(kw_only=True)
class SelectRuleSection:
    top_k: int | None = None
    """Keep the k rows with the smallest p-values (ties: larger D, then smaller id)."""

    alpha: float | None = None
    """Keep the rows that reject 'unchanged' at this level, after `correction`."""

    correction: str = "none"
    """Multiple-testing correction for `alpha` and the certificate: none, bonferroni or bh."""

    max_k: int | None = None
    """With `alpha`: keep at most this many rows."""

    cert_alpha: float = 0.05
    """Certificate level for a top-k rule."""

    def validate(self) -> ValidationResult:
        result = ValidationResult()
        if (self.top_k is None) == (self.alpha is None):
            result.add_error("Exactly one of `rule.top_k` and `rule.alpha` must be set.")
        if self.top_k is not None and self.top_k < 1:
            result.add_error(f"`rule.top_k` must be a positive integer, but is {self.top_k}.")
        if self.alpha is not None and not 0.0 < self.alpha < 1.0:
            result.add_error(f"`rule.alpha` must be in (0, 1), but is {self.alpha}.")
        if self.correction not in CORRECTIONS:
            result.add_error(f"`rule.correction` must be one of {', '.join(CORRECTIONS)}, but is {self.correction!r}.")
        if self.max_k is not None and self.max_k < 1:
            result.add_error(f"`rule.max_k` must be a positive integer, but is {self.max_k}.")
        if not 0.0 < self.cert_alpha < 1.0:
            result.add_error(f"`rule.cert_alpha` must be in (0, 1), but is {self.cert_alpha}.")
        return result


@dataclass(kw_only=True)
class SelectRecipeConfig:
    base: str = ""
    """The original model: asset card, fairseq2 checkpoint, or safetensors/.pt file or folder."""

    tuned: str = ""
    """The tuned model, in any of the same forms."""

    rule: SelectRuleSection = field(default_factory=SelectRuleSection)
    """How tickets are chosen."""

    method: str = "auto"
    """KS p-value method: auto, exact or asymp (as scipy.stats.ks_2samp)."""

    tokenizer: str | None = None
    """Tokenizer card, file or folder used to decode the ticket tokens (default: the one the base names)."""

    allow_dtype_mismatch: bool = False
    """Compare embeddings stored in different dtypes by upcasting both."""

    out_name: str = "tickets.json"
    """File name of the ticket file inside the output directory."""

    stats_name: str | None = "ks_stats.safetensors"
    """File name for every row's statistic and p-value (null: do not write)."""

    common: CommonSection = field(default_factory=CommonSection)

    gang: GangSection = field(default_factory=GangSection)

    def validate(self) -> ValidationResult:
        result = ValidationResult()
        if not self.base:
            result.add_error("`base` must name the original model.")
        if not self.tuned:
            result.add_error("`tuned` must name the tuned model.")
        if self.method not in KS_METHODS:
            result.add_error(f"`method` must be one of {', '.join(KS_METHODS)}, but is {self.method!r}.")
        if not self.out_name or "/" in self.out_name:
            result.add_error(f"`out_name` must be a plain file name, but is {self.out_name!r}.")
        return result


@final
class SelectRecipe(Recipe):
    """KS ticket selection as a fairseq2 (inference) recipe."""

    @override
    def register(self, container: DependencyContainer) -> None:
        register_user_errors(container)

    @override
    def create_task(self, context: RecipeContext) -> Task:
        config = context.get_config_as(SelectRecipeConfig)
        return _SelectTask(config, context.output_dir, context.gangs.root)

    @property
    @override
    def config_kls(self) -> type[object]:
        return SelectRecipeConfig


@final
class _SelectTask(Task):
    def __init__(self, config: SelectRecipeConfig, output_dir: Path, gang: Gang) -> None:
        self._config = config
        self._output_dir = output_dir
        self._gang = gang
        self._step_nr = 0

    @override
    def run(self) -> None:
        c = self._config
        request = SelectionRequest(
            base=c.base,
            tuned=c.tuned,
            out=self._output_dir / c.out_name,
            top_k=c.rule.top_k,
            alpha=c.rule.alpha,
            correction=c.rule.correction,
            max_k=c.rule.max_k,
            cert_alpha=c.rule.cert_alpha,
            method=c.method,
            tokenizer=c.tokenizer,
            allow_dtype_mismatch=c.allow_dtype_mismatch,
            stats_out=self._output_dir / c.stats_name if c.stats_name else None,
        )
        # With several processes (torchrun), the rows are split across them; rank 0 writes the files.
        outcome = run_selection(request, log=lambda m: log.info("{}", m), gang=self._gang)
        if outcome is not None:
            for line in describe_outcome(outcome).splitlines():
                log.info("{}", line)
            log.info("Ticket file written to {}.", request.out)
        self._step_nr = 1

    @override
    def request_stop(self) -> None:
        pass  # one short, atomic step: nothing to interrupt

    @property
    @override
    def step_nr(self) -> int:
        return self._step_nr

    @override
    def close(self) -> None:
        pass
