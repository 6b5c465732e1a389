"""The sparse-row module: gradients, frozen rows, tied projections, small state dicts."""

from __future__ import annotations

import pytest
import torch
from fairseq2.nn import BatchLayout

from fairseq2_kslottery.embedding import (
    TicketEmbedding,
    TicketTiedProjection,
    UnsupportedModelError,
    install_tickets,
    is_tied,
    untie_input_embedding,
)
from fairseq2_kslottery.toy import create_tiny_llama

TICKETS = [5, 9, 17, 33]


def _batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    seqs = torch.randint(3, vocab, (3, 12), generator=gen)
    seqs[:, 2] = torch.tensor(TICKETS[:3])  # make sure tickets occur
    seqs[0, 7] = TICKETS[0]
    return seqs[:, :-1], seqs[:, 1:]


def _loss(model: torch.nn.Module, seqs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return model(seqs, BatchLayout.of(seqs), targets)


@pytest.mark.parametrize("tied", [False, True])
def test_delta_gradient_equals_dense_gradient_rows(fairseq2_ready: None, tied: bool) -> None:
    dense, _ = create_tiny_llama(vocab_size=64, seed=0, tied_embeddings=tied)
    ticket, _ = create_tiny_llama(vocab_size=64, seed=0, tied_embeddings=tied)
    seqs, targets = _batch(64)
    if tied:
        untie_input_embedding(dense)  # the reference: only the input side trains
    for p in dense.parameters():
        p.requires_grad_(False)
    dense.decoder_frontend.embed.weight.requires_grad_(True)
    _loss(dense, seqs, targets).backward()
    dense_grad = dense.decoder_frontend.embed.weight.grad

    embed = install_tickets(ticket, TICKETS, tied_mode="input_only")
    _loss(ticket, seqs, targets).backward()
    assert embed.delta.grad is not None
    torch.testing.assert_close(embed.delta.grad, dense_grad[TICKETS], rtol=1e-5, atol=1e-7)
    # Tokens that occur in the batch but are not tickets get no trainable parameter at all.
    assert [n for n, p in ticket.named_parameters() if p.requires_grad] == ["decoder_frontend.embed.delta"]


def test_tied_mode_adds_the_delta_to_the_output_columns(fairseq2_ready: None) -> None:
    model, _ = create_tiny_llama(vocab_size=64, seed=0, tied_embeddings=True)
    assert is_tied(model)
    seqs, targets = _batch(64)
    reference, _ = create_tiny_llama(vocab_size=64, seed=0, tied_embeddings=True)

    embed = install_tickets(model, TICKETS, tied_mode="tied")
    assert isinstance(model.final_proj, TicketTiedProjection)
    with torch.no_grad():
        embed.delta.normal_(0, 0.1)
        # Reference: the dense tied model with the merged rows.
        reference.decoder_frontend.embed.weight[TICKETS] += embed.delta
    out = model(seqs, BatchLayout.of(seqs))
    ref = reference(seqs, BatchLayout.of(seqs))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_input_only_mode_keeps_the_output_projection_at_base(fairseq2_ready: None) -> None:
    model, _ = create_tiny_llama(vocab_size=64, seed=0, tied_embeddings=True)
    base_logits_weight = model.decoder_frontend.embed.weight.detach().clone()
    embed = install_tickets(model, TICKETS, tied_mode="input_only")
    with torch.no_grad():
        embed.delta.fill_(0.5)
    h = torch.randn(2, 3, 64)
    torch.testing.assert_close(model.final_proj(h), h @ base_logits_weight.T)


def test_optimizer_steps_change_only_ticket_rows_bitwise(fairseq2_ready: None) -> None:
    model, _ = create_tiny_llama(vocab_size=64, seed=0)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    embed = install_tickets(model, TICKETS)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(3):
        seqs, targets = _batch(64, seed=step)
        opt.zero_grad()
        _loss(model, seqs, targets).backward()
        opt.step()
    merged = embed.merged_weight()
    others = [i for i in range(64) if i not in TICKETS]
    assert torch.equal(merged[others], before["decoder_frontend.embed.weight"][others])
    assert (merged[TICKETS] != before["decoder_frontend.embed.weight"][TICKETS]).any(dim=1).all()
    assert torch.equal(embed.base_weight, before["decoder_frontend.embed.weight"])
    for name, p in model.named_parameters():
        if name != "decoder_frontend.embed.delta":
            assert torch.equal(p, before[name]), name


def test_ticket_state_dict_holds_only_ids_and_delta_and_reloads(fairseq2_ready: None) -> None:
    model, _ = create_tiny_llama(vocab_size=64, seed=0)
    embed = install_tickets(model, TICKETS)
    with torch.no_grad():
        embed.delta.normal_()
    state = model.state_dict()
    assert sorted(state) == ["decoder_frontend.embed.delta", "decoder_frontend.embed.token_ids"]
    fresh, _ = create_tiny_llama(vocab_size=64, seed=0)
    fresh_embed = install_tickets(fresh, TICKETS)
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh_embed.delta, embed.delta)


def test_padding_row_never_trains_and_bad_ids_are_refused(fairseq2_ready: None) -> None:
    weight = torch.randn(10, 4)
    embed = TicketEmbedding(weight, [0, 3], pad_idx=0)
    out = embed(torch.tensor([[0, 3, 0]]))
    out.sum().backward()
    assert embed.delta.grad is not None
    assert torch.equal(embed.delta.grad[0], torch.zeros(4))  # the pad token's delta gets no gradient
    assert torch.equal(embed.delta.grad[1], torch.ones(4))
    with pytest.raises(Exception, match=r"Ticket token id 10 is outside the vocabulary \[0, 10\)"):
        TicketEmbedding(weight, [10], pad_idx=None)


def test_unsupported_model_gets_a_clear_error() -> None:
    with pytest.raises(UnsupportedModelError, match=r"`Linear` cannot be tuned by rows: it has no `decoder_frontend`"):
        install_tickets(torch.nn.Linear(2, 2), [0])


def test_bf16_model_keeps_an_fp32_delta(fairseq2_ready: None) -> None:
    model, _ = create_tiny_llama(vocab_size=64, seed=0)
    model.to(torch.bfloat16)
    embed = install_tickets(model, TICKETS)
    assert embed.delta.dtype == torch.float32 and embed.base_weight.dtype == torch.bfloat16
    out = embed(torch.tensor([[5, 6]]))
    assert out.dtype == torch.bfloat16


def _tiny_config(family: str) -> tuple[object, object]:
    from fairseq2.models import ModelHubAccessor

    hub = ModelHubAccessor(family, torch.nn.Module, object)()
    config = hub.get_arch_config(sorted(hub.get_archs())[0])
    overrides = {
        "model_dim": 32,
        "num_layers": 1,
        "vocab_size": 64,
        "num_attn_heads": 2,
        "num_key_value_heads": 2,
        "ffn_inner_dim": 64,
        "head_dim": 16,
        "max_seq_len": 64,
        "pad_idx": None,
    }
    for key, value in overrides.items():
        if hasattr(config, key):
            setattr(config, key, value)
    return hub, config


@pytest.mark.parametrize("family", ["qwen", "mistral", "olmo"])
def test_other_fairseq2_decoder_families_take_tickets(fairseq2_ready: None, family: str) -> None:
    from fairseq2.device import CPU

    hub, config = _tiny_config(family)
    torch.manual_seed(0)
    model = hub.create_new_model(config, device=CPU, dtype=torch.float32)
    embed = install_tickets(model, TICKETS)
    seqs, targets = _batch(64)
    _loss(model, seqs, targets).backward()
    assert embed.delta.grad is not None and embed.delta.grad.abs().sum() > 0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["decoder_frontend.embed.delta"]
