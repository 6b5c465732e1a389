"""The sparse-row module: where a ticket row gets its gradient.

Ticket tuning is a reparameterisation, not a gradient mask on a dense matrix:

    E'[i] = E[i] + delta[slot(i)]   for the k ticket rows i,   E'[i] = E[i] otherwise,

with ``E`` the base embedding kept as a frozen buffer and ``delta`` a trainable (k, d) float32 master tensor, also
when the model computes in bf16. The forward pass looks rows up in ``E`` and adds the delta rows of the tokens that
occur — O(batch tokens x d) extra work, never a V x d copy — and the optimizer only ever sees ``delta``, so weight
decay cannot move a frozen row and the optimizer state is k x d.

For tied embeddings (the output projection shares ``E``) :class:`TicketTiedProjection` either keeps the output side
at the base matrix (``input_only``) or applies the same delta to the k output columns (``tied``): a logits correction
``logits[..., ids] += h @ delta.T`` costing O(tokens x k x d).

Models with :class:`TicketEmbedding` save only ``delta`` and the ticket ids (see :func:`install_tickets`), so a ticket
run's checkpoint is k x d, not a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Literal

import torch
from fairseq2.nn import Embedding, Projection
from torch import Tensor
from torch.nn import Module, Parameter
from torch.nn.functional import embedding, linear

from fairseq2_kslottery.errors import KSLotteryError

__all__ = [
    "UnsupportedModelError",
    "TicketEmbedding",
    "TicketTiedProjection",
    "TiedMode",
    "find_input_embedding",
    "install_tickets",
    "untie_input_embedding",
    "is_tied",
]

TiedMode = Literal["input_only", "tied"]
TIED_MODES: Final = ("input_only", "tied")


class UnsupportedModelError(KSLotteryError):
    """The model has no input embedding this package can reparameterise."""

    def __init__(self, model: Module, missing: str) -> None:
        super().__init__(
            f"`{type(model).__name__}` cannot be tuned by rows: {missing}. Supported are fairseq2 decoder models whose "
            "`decoder_frontend.embed` is a `fairseq2.nn.Embedding` with a (V, d) `weight` (llama, qwen, mistral, "
            "olmo, ...)."
        )
        self.model_type = type(model).__name__
        self.missing = missing


def find_input_embedding(model: Module) -> Embedding:
    """``model.decoder_frontend.embed``, checked to be a row-addressable :class:`fairseq2.nn.Embedding`."""
    frontend = getattr(model, "decoder_frontend", None)
    if frontend is None:
        raise UnsupportedModelError(model, "it has no `decoder_frontend`")
    embed = getattr(frontend, "embed", None)
    if not isinstance(embed, Embedding):
        raise UnsupportedModelError(model, "its `decoder_frontend.embed` is not a `fairseq2.nn.Embedding`")
    if isinstance(embed, TicketEmbedding):
        return embed
    weight = getattr(embed, "weight", None)
    if not isinstance(weight, Tensor) or tuple(weight.shape) != (embed.num_embeddings, embed.embed_dim):
        raise UnsupportedModelError(
            model, "its input embedding has no full (V, d) `weight` (a sharded embedding must be gathered first)"
        )
    return embed


def is_tied(model: Module) -> bool:
    """True when the output projection uses the same weight tensor as the input embedding."""
    embed = find_input_embedding(model)
    proj = getattr(model, "final_proj", None)
    if isinstance(proj, TicketTiedProjection):
        return True
    weight = getattr(proj, "weight", None)
    base = embed.base_weight if isinstance(embed, TicketEmbedding) else embed.weight
    return isinstance(weight, Tensor) and weight is base


class TicketEmbedding(Embedding):
    """Frozen base embedding plus a trainable float32 delta on k rows (see the module docstring)."""

    base_weight: Tensor
    token_ids: Tensor
    slot_of: Tensor

    def __init__(self, base_weight: Tensor, token_ids: Sequence[int] | Tensor, pad_idx: int | None) -> None:
        num_embeddings, embed_dim = base_weight.shape
        super().__init__(num_embeddings, embed_dim, pad_idx)
        ids = torch.as_tensor(token_ids, dtype=torch.int64, device=base_weight.device).flatten()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_embeddings):
            bad = int(ids[(ids < 0) | (ids >= num_embeddings)][0])
            raise KSLotteryError(f"Ticket token id {bad} is outside the vocabulary [0, {num_embeddings}).")
        if torch.unique(ids).numel() != ids.numel():
            raise KSLotteryError("Ticket token ids must be distinct.")
        # The base stays out of the state dict: a ticket checkpoint holds only the ids and the delta.
        self.register_buffer("base_weight", base_weight.detach(), persistent=False)
        self.register_buffer("token_ids", ids.clone(), persistent=True)
        slot_of = torch.full((num_embeddings,), -1, dtype=torch.int64, device=base_weight.device)
        slot_of[ids] = torch.arange(ids.numel(), device=base_weight.device)
        if pad_idx is not None:
            # Like a dense embedding, the padding row never trains.
            slot_of[pad_idx] = -1
        self.register_buffer("slot_of", slot_of, persistent=False)
        self.delta = Parameter(torch.zeros(ids.numel(), embed_dim, dtype=torch.float32, device=base_weight.device))

    @property
    def k(self) -> int:
        return int(self.token_ids.numel())

    def forward(self, x: Tensor) -> Tensor:
        out = embedding(x, self.base_weight, self.pad_idx)
        if self.k == 0:
            return out
        slots = self.slot_of[x]
        hit = (slots >= 0).unsqueeze(-1)
        # Gather one delta row per token (slot 0 for non-tickets, then masked out): O(tokens x d), no V x d tensor.
        rows = embedding(slots.clamp_min(0), self.delta)
        return out + torch.where(hit, rows, 0.0).to(out.dtype)

    def merged_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The full embedding ``E + delta`` on the ticket rows (a new tensor; for export and evaluation)."""
        merged = self.base_weight.detach().clone()
        if self.k:
            rows = self.base_weight[self.token_ids].float() + self.delta.detach()
            merged[self.token_ids] = rows.to(merged.dtype)
        return merged if dtype is None else merged.to(dtype)

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embed_dim={self.embed_dim}, k={self.k}, pad_idx={self.pad_idx}"


class TicketTiedProjection(Projection):
    """Output projection of a tied model whose input embedding is a :class:`TicketEmbedding`.

    ``input_only``: logits from the frozen base matrix (the ticket rows change the input side only).
    ``tied``: the ticket delta also changes the k output columns, ``logits[..., ids] += x @ delta.T``.
    """

    def __init__(self, embed: TicketEmbedding, mode: TiedMode) -> None:
        super().__init__(input_dim=embed.embed_dim, output_dim=embed.num_embeddings)
        if mode not in TIED_MODES:
            raise KSLotteryError(f"`tied mode` must be one of {', '.join(TIED_MODES)}, but is {mode!r}.")
        # Not a submodule: the embedding (and its delta) is registered once, under decoder_frontend.embed.
        object.__setattr__(self, "_embed", embed)
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        embed: TicketEmbedding = self._embed  # type: ignore[attr-defined]
        logits = linear(x, embed.base_weight)
        if self.mode == "tied" and embed.k:
            correction = linear(x.to(embed.delta.dtype), embed.delta).to(logits.dtype)
            logits.index_add_(-1, embed.token_ids, correction)
        return logits

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


def install_tickets(
    model: Module, token_ids: Sequence[int] | Tensor, *, tied_mode: TiedMode = "input_only"
) -> TicketEmbedding:
    """Reparameterise ``model`` in place for ticket tuning and freeze everything else.

    After this, ``model.parameters()`` that require grad are exactly ``[delta]``; ``model.state_dict()`` holds only
    ``decoder_frontend.embed.token_ids`` and ``decoder_frontend.embed.delta``, and ``load_state_dict`` accepts such
    a state dict (the frozen rest of the model is whatever the model was built from).

    :param tied_mode: for tied models, whether the delta also changes the output projection (``tied``) or only the
        input embedding (``input_only``, the default). Ignored for untied models.
    :raises UnsupportedModelError: the model has no row-addressable input embedding.
    """
    embed = find_input_embedding(model)
    if isinstance(embed, TicketEmbedding):
        raise KSLotteryError("The model already has ticket rows installed.")
    tied = is_tied(model)
    ticket_embed = TicketEmbedding(embed.weight, token_ids, embed.pad_idx)  # type: ignore[arg-type]
    for p in model.parameters():
        p.requires_grad_(False)
    model.decoder_frontend.embed = ticket_embed  # type: ignore[union-attr]
    if tied:
        model.final_proj = TicketTiedProjection(ticket_embed, tied_mode)  # type: ignore[assignment]
    _keep_only_trainable_state(model)
    return ticket_embed


def untie_input_embedding(model: Module) -> None:
    """Give a tied model its own trainable input embedding; the output projection keeps the original (frozen)
    matrix. Used for the reference (embedding-only) tuning of tied models, so that the softmax gradient does not
    move every row (see the method notes)."""
    embed = find_input_embedding(model)
    if not is_tied(model):
        return
    original: Parameter = embed.weight  # type: ignore[assignment]
    original.requires_grad_(False)
    embed.weight = Parameter(original.detach().clone())  # type: ignore[union-attr]


def _trainable_keys(model: Module) -> set[str]:
    keys = {name for name, p in model.named_parameters() if p.requires_grad}
    keys |= {name for name, _ in model.named_buffers() if name.endswith("embed.token_ids")}
    return keys


def _keep_only_trainable_state(model: Module) -> None:
    """Make ``state_dict`` drop frozen entries and ``load_state_dict`` accept their absence."""
    keep = _trainable_keys(model)

    def drop_frozen(module: Module, state: dict[str, Tensor], prefix: str, local_metadata: object) -> None:
        for key in list(state):
            if key.removeprefix(prefix) not in keep:
                del state[key]

    def allow_missing(module: Module, incompatible: object) -> None:
        missing: list[str] = incompatible.missing_keys  # type: ignore[attr-defined]
        missing[:] = [key for key in missing if key in keep]

    model._register_state_dict_hook(drop_frozen)
    model.register_load_state_dict_post_hook(allow_missing)


def trainable_parameter_count(model: Module) -> int:
    """Number of parameters the optimizer will update."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
