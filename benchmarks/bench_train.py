"""Training-step time and peak memory: full / embedding-only / ticket tuning with fairseq2, and the same ticket rows
trained with Hugging Face PEFT's TrainableTokens on the equivalent transformers model — in one run.

    python benchmarks/bench_train.py                    # ~100M-parameter LLaMA (random init), batch 8 x 128
    python benchmarks/bench_train.py --layers 2 --steps 3   # quick look

Every configuration runs in its own subprocess (a fresh process, so peak RSS is its own); step time is the median
over ``--steps`` steps after one warm-up step. Needs the ``bench`` extra (``pip install -e '.[bench]'``) for PEFT.
Machines here are noisy: read the ratios, and repeat.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

CONFIGS = ("fairseq2-full", "fairseq2-embed", "fairseq2-tickets", "peft-trainable-tokens")
LAYER_CONFIGS = ("layer-tickets", "layer-peft")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _batch(args: argparse.Namespace, gen: Any) -> Any:
    import torch

    return torch.randint(3, args.vocab, (args.batch, args.seq + 1), generator=gen)


def _ticket_ids(args: argparse.Namespace) -> list[int]:
    import torch

    gen = torch.Generator().manual_seed(0)
    return sorted(torch.randperm(args.vocab - 3, generator=gen)[: args.k].add(3).tolist())


def _run_fairseq2(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    import torch
    from fairseq2 import init_fairseq2
    from fairseq2.device import CPU
    from fairseq2.models.llama import LLaMAConfig, get_llama_model_hub
    from fairseq2.nn import BatchLayout

    from fairseq2_kslottery.embedding import install_tickets

    init_fairseq2(no_progress=True)
    config = LLaMAConfig(
        model_dim=args.dim,
        max_seq_len=args.seq + 8,
        vocab_size=args.vocab,
        num_layers=args.layers,
        num_attn_heads=args.heads,
        num_key_value_heads=args.heads,
        ffn_inner_dim=args.ffn,
        ffn_inner_dim_scale=1.0,
        ffn_inner_dim_multiple_of=1,
        shard_embed_dim=False,
    )
    torch.manual_seed(0)
    model = get_llama_model_hub().create_new_model(config, device=CPU, dtype=torch.float32)
    model.train()
    if mode == "embed":
        for p in model.parameters():
            p.requires_grad_(False)
        model.decoder_frontend.embed.weight.requires_grad_(True)
    elif mode == "tickets":
        install_tickets(model, _ticket_ids(args))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    after_build = _peak_rss_mib()
    gen = torch.Generator().manual_seed(1)

    def step() -> float:
        batch = _batch(args, gen)
        seqs, targets = batch[:, :-1], batch[:, 1:]
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(seqs, BatchLayout.of(seqs), targets, reduction="sum") / targets.numel()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - t0

    return _measure(step, args, params, optimizer, after_build, sum(p.numel() for p in model.parameters()))


def _run_peft(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers
    from peft import TrainableTokensConfig, get_peft_model

    config = transformers.LlamaConfig(
        hidden_size=args.dim,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq + 8,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model = get_peft_model(
        model, TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=_ticket_ids(args))
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    after_build = _peak_rss_mib()
    gen = torch.Generator().manual_seed(1)

    def step() -> float:
        batch = _batch(args, gen)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        # transformers shifts labels itself: same tokens, same targets as the fairseq2 runs.
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        return time.perf_counter() - t0

    return _measure(step, args, params, optimizer, after_build, sum(p.numel() for p in model.parameters()))


def _run_layer(args: argparse.Namespace, impl: str) -> dict[str, Any]:
    """The input-embedding layer alone (forward, backward, optimizer step) at LLaMA-7B size: where PEFT's
    per-forward V x d rebuild shows."""
    import torch

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(args.layer_vocab, args.layer_dim, generator=gen) * 0.02
    ids = _ticket_ids(argparse.Namespace(vocab=args.layer_vocab, k=args.k))
    if impl == "tickets":
        from fairseq2_kslottery.embedding import TicketEmbedding

        layer: Any = TicketEmbedding(weight, ids, pad_idx=None)
    else:
        from peft import TrainableTokensConfig, get_peft_model

        class _Host(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embed_tokens = torch.nn.Embedding.from_pretrained(weight, freeze=False)

            def forward(self, x: Any) -> Any:
                return self.embed_tokens(x)

        layer = get_peft_model(_Host(), TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=ids))
    params = [p for p in layer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    after_build = _peak_rss_mib()
    data_gen = torch.Generator().manual_seed(1)

    def step() -> float:
        x = torch.randint(0, args.layer_vocab, (args.batch, args.seq), generator=data_gen)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        layer(x).float().square().mean().backward()
        optimizer.step()
        return time.perf_counter() - t0

    return _measure(step, args, params, optimizer, after_build, sum(p.numel() for p in layer.parameters()))


def _measure(
    step: Any, args: argparse.Namespace, params: list[Any], optimizer: Any, after_build: float, total: int
) -> dict[str, Any]:
    step()  # warm-up (allocates optimizer state)
    times = [step() for _ in range(args.steps)]
    state_bytes = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if hasattr(t, "numel") and t.dim() > 0
    )
    return {
        "step_s": statistics.median(times),
        "peak_rss_mib": _peak_rss_mib(),
        "rss_after_build_mib": after_build,
        "trainable": sum(p.numel() for p in params),
        "total_params": total,
        "optimizer_state_bytes": state_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=10)
    parser.add_argument("--ffn", type=int, default=1728)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--k", type=int, default=18, help="ticket rows (the paper's en->ca ticket size)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layer-vocab", type=int, default=32000, help="embedding-layer comparison: rows")
    parser.add_argument("--layer-dim", type=int, default=4096, help="embedding-layer comparison: width")
    parser.add_argument("--only", choices=CONFIGS + LAYER_CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.only is not None:
        if args.only == "peft-trainable-tokens":
            result = _run_peft(args)
        elif args.only in LAYER_CONFIGS:
            result = _run_layer(args, args.only.removeprefix("layer-"))
        else:
            result = _run_fairseq2(args, args.only.removeprefix("fairseq2-"))
        print("RESULT " + json.dumps(result))
        return

    results: dict[str, dict[str, Any]] = {}
    for name in CONFIGS + LAYER_CONFIGS:
        cmd = [sys.executable, __file__, "--only", name] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "only"
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{name}: failed\n{proc.stderr[-2000:]}")
            continue
        results[name] = json.loads(line.removeprefix("RESULT "))

    if not results:
        return
    layer = {name: results.pop(name) for name in LAYER_CONFIGS if name in results}
    total = next(iter(results.values()))["total_params"] if results else 0
    print(
        f"model: {total / 1e6:.1f}M parameters (dim {args.dim}, {args.layers} layers, vocab {args.vocab}); "
        f"batch {args.batch} x {args.seq}; k = {args.k}; median of {args.steps} steps"
    )
    print(
        f"{'configuration':<24}{'step (s)':>10}{'peak RSS (MiB)':>16}{'train mem (MiB)':>17}"
        f"{'trainable':>12}{'opt. state':>12}"
    )
    for name, r in results.items():
        print(
            f"{name:<24}{r['step_s']:>10.3f}{r['peak_rss_mib']:>16.0f}"
            f"{r['peak_rss_mib'] - r['rss_after_build_mib']:>17.0f}{r['trainable']:>12,}"
            f"{r['optimizer_state_bytes'] / 1024:>10.1f}KiB"
        )
    tickets, peft = results.get("fairseq2-tickets"), results.get("peft-trainable-tokens")
    if tickets and peft:
        print(
            f"PEFT TrainableTokens / fairseq2 tickets: step time x{peft['step_s'] / tickets['step_s']:.2f}, "
            f"peak RSS x{peft['peak_rss_mib'] / tickets['peak_rss_mib']:.2f}"
        )
    full = results.get("fairseq2-full")
    if full and tickets:
        print(f"fairseq2 full / tickets: step time x{full['step_s'] / tickets['step_s']:.2f}")
    if len(layer) == 2:
        ours, theirs = layer["layer-tickets"], layer["layer-peft"]
        print(
            f"\nembedding layer alone ({args.layer_vocab} x {args.layer_dim}, batch {args.batch} x {args.seq}, "
            f"k = {args.k}): fwd + bwd + AdamW step"
        )
        for name, r in layer.items():
            print(
                f"{name:<24}{r['step_s'] * 1e3:>10.2f} ms{r['peak_rss_mib'] - r['rss_after_build_mib']:>12.0f} MiB "
                "above the model"
            )
        print(f"PEFT TrainableTokens / TicketEmbedding: step time x{theirs['step_s'] / ours['step_s']:.1f}")


if __name__ == "__main__":
    main()
