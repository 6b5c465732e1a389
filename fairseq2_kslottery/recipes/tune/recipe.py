"""The tuning recipe: reference tuning (full / embedding-only) and ticket tuning, on parallel text.

Reading order: :meth:`TuneRecipe.setup_model` decides what trains (and, for tickets, swaps in the sparse-row
embedding); :meth:`TuneRecipe.create_task` wires data, validation units and fairseq2's trainer;
:class:`_TranslationTrainUnit` turns a batch into the summed target-token loss.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, final

import fairseq2.recipe  # noqa: F401  (fairseq2.trainer imports cleanly only after fairseq2.recipe)
import torch
from fairseq2.data.tokenizers import Tokenizer
from fairseq2.datasets import SequenceBatch
from fairseq2.logging import log
from fairseq2.metrics import MetricBag
from fairseq2.metrics.common import (
    add_nll_loss_metric,
    add_seq_batch_metrics,
    update_nll_loss_metric,
    update_seq_batch_metrics,
)
from fairseq2.nn.utils.module import broadcast_module, reset_non_persistent_buffers, to_empty
from fairseq2.recipe.base import Recipe, RecipeContext
from fairseq2.runtime.dependency import DependencyContainer
from fairseq2.task import Task
from fairseq2.trainer import TrainUnit
from torch import Tensor
from torch.nn import Module
from typing_extensions import override

from fairseq2_kslottery.data.dataset import ParallelDataset
from fairseq2_kslottery.embedding import (
    find_input_embedding,
    install_tickets,
    is_tied,
    trainable_parameter_count,
    untie_input_embedding,
)
from fairseq2_kslottery.errors import KSLotteryError, SelectionError, TicketFileError
from fairseq2_kslottery.evaluation import NllEvalUnit, TranslationEvalUnit, max_gen_len
from fairseq2_kslottery.export import load_original_model
from fairseq2_kslottery.io import atomic_path, atomic_write_text, tensor_fingerprint
from fairseq2_kslottery.recipes._common import register_user_errors
from fairseq2_kslottery.recipes.tune.config import TuneConfig
from fairseq2_kslottery.tickets import (
    TicketSet,
    explicit_tickets,
    most_frequent_tickets,
    random_tickets,
)
from fairseq2_kslottery.vocab import TokenizerError, load_token_vocabulary

__all__ = ["TuneRecipe", "TICKETS_USED", "INITIAL_MODEL", "resolve_ticket_set", "newline_token_ids"]

TICKETS_USED = "tickets_used.json"
"""The ticket set a ticket run trains (written at the start, read back on resume), in the output directory."""

INITIAL_MODEL = "initial_model.pt"
"""The weights of a randomly initialised model (fairseq2 keys), saved at the start of such a run."""


class TuningError(KSLotteryError):
    """A tuning run cannot start as configured."""


@final
class TuneRecipe(Recipe):
    """Reference tuning and ticket tuning of a decoder LLM on parallel text (see the package docs)."""

    @override
    def register(self, container: DependencyContainer) -> None:
        register_user_errors(container)

    @property
    @override
    def config_kls(self) -> type[object]:
        return TuneConfig

    @override
    def setup_model(self, context: RecipeContext, model: Module, newly_initialized: bool) -> Module:
        config = context.get_config_as(TuneConfig)
        mode = config.tuning.mode
        find_input_embedding(model)  # a clear error for models we cannot handle, in every mode
        # When a checkpoint exists, fairseq2 builds an uninitialised skeleton and restores it from the checkpoint.
        resuming = context.get_checkpoint_manager().has_checkpoint(exclude_model_only=True)
        if not resuming and mode != "full":
            _materialize_on_all_ranks(context, model)
        if newly_initialized and context.gangs.root.rank == 0:
            # A randomly initialised model exists nowhere else: keep it, as the base for selection and ticket runs.
            _save_state(model, context.output_dir / INITIAL_MODEL)
        if mode == "full":
            return model
        if mode == "embed":
            tied = is_tied(model)
            for p in model.parameters():
                p.requires_grad_(False)
            untie = tied and config.tuning.tied == "input_only"
            if untie:
                untie_input_embedding(model)
            find_input_embedding(model).weight.requires_grad_(True)  # type: ignore[union-attr]
            log.info("Embedding-only tuning{}.", " of the input side (output projection frozen)" if untie else "")
            return model

        # mode == "tickets": train only the ticket rows, starting from the original model.
        used = context.output_dir / TICKETS_USED
        if resuming:
            # The checkpoint holds only the delta; the frozen rest comes from the original model again.
            _load_original_weights(context, model)
            tickets = TicketSet.load(used)
        else:
            tickets = resolve_ticket_set(context, config, model)
            if context.gangs.root.rank == 0:
                tickets.save(used)
        embed = install_tickets(model, tickets.token_ids, tied_mode=config.tuning.tied)  # type: ignore[arg-type]
        log.info(
            "Ticket tuning of {} rows ({}); trainable parameters: {}.",
            embed.k,
            tickets.rule.get("kind"),
            trainable_parameter_count(model),
        )
        return model

    @override
    def create_task(self, context: RecipeContext) -> Task:
        config = context.get_config_as(TuneConfig)
        tokenizer = context.get_tokenizer()
        dataset = context.get_dataset_as(ParallelDataset)
        dp_model = context.get_data_parallel_model()
        model = context.get_model()
        _check_vocabulary(model, tokenizer)

        batching = config.batching
        train_reader = dataset.create_train_reader(
            tokenizer,
            context.gangs,
            batch_size=batching.batch_size,
            seed=config.common.seed,
            shuffle_window=batching.shuffle_window,
            bucket_by_length=batching.bucket_by_length,
            num_accumulate=batching.num_accumulate,
        )
        units: list[Any] = []
        readers: list[Any] = []
        validation = config.validation
        if validation.nll:
            units.append(NllEvalUnit(dp_model))
            readers.append(
                dataset.create_eval_reader(
                    validation.split, tokenizer, context.gangs, batch_size=validation.batch_size, prompt_only=False
                )
            )
        if validation.generate and context.gangs.dp.size > 1:
            raise TuningError(
                "`validation.generate: true` runs on a single process only (fairseq2's sequence generator does not "
                "take a data-parallel model); set `validation.generate: false` and evaluate with the evaluate recipe."
            )
        if validation.generate:
            units.append(
                TranslationEvalUnit(
                    context.get_seq_generator(),
                    tokenizer,
                    max_gen_len=max_gen_len(config.seq_generator.config),
                    cut_at_newline=validation.cut_at_newline,
                    hypotheses_dir=context.output_dir / "hypotheses",
                    split=validation.split,
                    rank=context.gangs.dp.rank,
                )
            )
            readers.append(
                dataset.create_eval_reader(
                    validation.split, tokenizer, context.gangs, batch_size=validation.batch_size, prompt_only=True
                )
            )
        _write_run_info(context, config, model)
        return context.create_trainer(_TranslationTrainUnit(dp_model), train_reader, units, readers)

    @override
    def has_static_autograd_graph(self, context: RecipeContext) -> bool:
        # In ticket mode a batch without any ticket token leaves the delta without gradient.
        return context.get_config_as(TuneConfig).tuning.mode != "tickets"


@final
class _TranslationTrainUnit(TrainUnit[SequenceBatch]):
    """Summed NLL of the target tokens (the trainer normalises by their count)."""

    def __init__(self, model: Module) -> None:
        self._model = model

    @override
    def prepare_metric_bag(self, metric_bag: MetricBag) -> None:
        add_nll_loss_metric(metric_bag)
        add_seq_batch_metrics(metric_bag)

    @override
    def process_batch(self, batch: SequenceBatch, metric_bag: MetricBag) -> tuple[Tensor, int]:
        input_batch, target_batch = batch.as_auto_regressive()
        seqs, layout = input_batch.as_input()
        loss = self._model(
            seqs, layout, targets=target_batch.seqs, target_mask=target_batch.target_mask, reduction="sum"
        )
        n = target_batch.num_target_elements
        update_nll_loss_metric(metric_bag, loss, n)
        update_seq_batch_metrics(metric_bag, target_batch)
        return loss, n


# --- ticket sets ------------------------------------------------------------------------------------------------


def resolve_ticket_set(context: RecipeContext, config: TuneConfig, model: Module) -> TicketSet:
    """The rows a ticket run trains: the ticket file's, or a baseline set of the same size."""
    tuning = config.tuning
    embed = find_input_embedding(model)
    vocab_size, dim = int(embed.num_embeddings), int(embed.embed_dim)
    tokenizer = context.get_tokenizer()
    reference = TicketSet.load(tuning.tickets, vocab_size=vocab_size) if tuning.tickets else None
    if reference is not None:
        _check_ticket_fingerprints(reference, embed.weight, config, str(tuning.tickets))  # type: ignore[arg-type]
        if reference.k == 0:
            raise TuningError(f"The ticket file `{tuning.tickets}` selects no row; there is nothing to train.")
    if tuning.baseline is None:
        assert reference is not None
        return reference

    k = tuning.k if tuning.k is not None else (reference.k if reference is not None else None)
    counts = None
    if tuning.baseline in ("random", "random_frequency", "most_frequent"):
        counts = context.get_dataset_as(ParallelDataset).target_token_counts(tokenizer, vocab_size)
    rule: dict[str, Any] = {"kind": tuning.baseline, "seed": tuning.seed}
    try:
        if tuning.baseline == "random":
            assert counts is not None and k is not None
            ids = random_tickets(vocab_size, k, seed=tuning.seed, counts=counts)
        elif tuning.baseline == "random_frequency":
            assert counts is not None and reference is not None
            ids = random_tickets(vocab_size, 0, seed=tuning.seed, counts=counts, match_ids=reference.token_ids)
            rule["matched"] = tuning.tickets
        elif tuning.baseline == "most_frequent":
            assert counts is not None and k is not None
            ids = most_frequent_tickets(counts, k)
        elif tuning.baseline == "newline":
            ids = explicit_tickets(newline_token_ids(tokenizer), vocab_size)
        else:
            ids = explicit_tickets(tuning.token_ids, vocab_size)
    except SelectionError as exc:
        raise TuningError(f"The `{tuning.baseline}` baseline cannot be built: {exc}") from None
    rule["k"] = int(len(ids))
    return TicketSet(
        token_ids=[int(i) for i in ids],
        rule=rule,
        vocab_size=vocab_size,
        embed_dim=dim,
        base_fingerprint=tensor_fingerprint(embed.weight),
    )  # type: ignore[arg-type]


def newline_token_ids(tokenizer: Tokenizer) -> list[int]:
    """The token(s) that spell a newline in this tokenizer (e.g. SentencePiece ``<0x0A>``, byte-level ``Ċ``)."""
    encoder = tokenizer.create_raw_encoder()
    decoder = tokenizer.create_decoder(skip_special_tokens=False)
    ids = [int(i) for i in encoder("a\nb").tolist()]
    found = [i for i in ids if decoder(torch.tensor([i])).strip(" ") == "\n"]
    if not found:
        raise TuningError("The tokenizer has no token that decodes to a newline.")
    return list(dict.fromkeys(found))


def _check_ticket_fingerprints(tickets: TicketSet, weight: Tensor, config: TuneConfig, path: str) -> None:
    """A ticket file names token ids of one tokenizer: refuse it for another. A different base embedding is only
    warned about (a dtype change alone changes that fingerprint)."""
    if tickets.tokenizer_fingerprint:
        spec = config.tokenizer.name or (str(config.tokenizer.path) if config.tokenizer.path else None)
        if spec is not None:
            try:
                our_tokenizer = load_token_vocabulary(spec).fingerprint
            except TokenizerError:
                our_tokenizer = None  # a tokenizer we cannot hash: nothing to compare
            if our_tokenizer is not None and our_tokenizer != tickets.tokenizer_fingerprint:
                raise TicketFileError(
                    path,
                    f"it was made with another tokenizer (fingerprint {tickets.tokenizer_fingerprint}; this run's "
                    f"tokenizer `{spec}` has {our_tokenizer}), so its token ids mean other tokens here.",
                )
    ours = tensor_fingerprint(weight) if tickets.base_fingerprint else None
    if ours is not None and ours != tickets.base_fingerprint:
        log.warning(
            "The ticket file was made from a different base embedding (fingerprint {} here, {} in the file); "
            "check that it belongs to this model (a dtype change alone also changes the fingerprint).",
            ours,
            tickets.base_fingerprint,
        )


def _check_vocabulary(model: Module, tokenizer: Tokenizer) -> None:
    rows = find_input_embedding(model).num_embeddings
    if tokenizer.vocab_info.size > rows:
        raise TuningError(
            f"The tokenizer has {tokenizer.vocab_info.size} tokens but the model's embedding only {rows} rows."
        )


# --- resume of ticket runs --------------------------------------------------------------------------------------


def _load_original_weights(context: RecipeContext, model: Module) -> None:
    """Fill an uninitialised (possibly meta-device) skeleton with the original weights: the pretrained ones loaded
    the way fairseq2 loaded them at the start, or the saved initial weights of a randomly initialised model."""
    original, _, _ = load_original_model(context.output_dir, resolver=context.resolver, gangs=context.gangs)
    to_empty(model, torch.device("cpu"))
    model.load_state_dict(original.state_dict())
    # Buffers outside the state dict (e.g. rotary frequency tables) are recomputed, as fairseq2 does for meta modules.
    reset_non_persistent_buffers(model)
    for p in model.parameters():
        p.requires_grad_(True)


def _materialize_on_all_ranks(context: RecipeContext, model: Module) -> None:
    """With several processes fairseq2 loads the weights on rank 0 only and leaves the others on the meta device until
    data-parallel wrapping. Freezing, untying and the ticket reparameterisation need the real weights on every rank,
    so they are broadcast from rank 0 here."""
    gang = context.gangs.dp
    if gang.size == 1 and not any(p.device.type == "meta" for p in model.parameters()):
        return
    broadcast_module(model, gang)
    if gang.rank != 0:
        reset_non_persistent_buffers(model)


def _save_state(model: Module, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)


def _write_run_info(context: RecipeContext, config: TuneConfig, model: Module) -> None:
    """``run_info.json``: what trains and how many parameters / optimizer-state bytes that means (for reports)."""
    if context.gangs.root.rank != 0:
        return
    optimizer = context.get_optimizer()
    trainable = trainable_parameter_count(model)
    in_optimizer = sum(p.numel() for g in optimizer.param_groups for p in g["params"] if p.requires_grad)
    embed = find_input_embedding(model)
    info = {
        "mode": config.tuning.mode,
        "tied": config.tuning.tied,
        "model_tied_embeddings": bool(getattr(model, "final_proj", None) is not None and is_tied(model)),
        "vocab_size": int(embed.num_embeddings),
        "embed_dim": int(embed.embed_dim),
        "trainable_parameters": int(trainable),
        "optimizer_parameters": int(in_optimizer),
        # AdamW keeps two float32 moments per trained value.
        "optimizer_state_bytes": int(2 * 4 * in_optimizer),
        "total_parameters": int(sum(p.numel() for p in model.parameters())),
    }
    atomic_write_text(context.output_dir / "run_info.json", json.dumps(info, indent=2) + "\n")
