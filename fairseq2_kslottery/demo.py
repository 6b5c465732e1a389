"""``make demo`` / ``fairseq2-kslottery demo``.

STAND-IN: the real demo (SmolLM2-135M fine-tuned on Bible en->de, ticket tuning, baselines, report) arrives with the
experiment runner. Until then this runs the selection stage end to end on a small example it creates: a random
tiny LLaMA saved as a fairseq2 checkpoint, and a "tuned" copy in which a few rows were shifted the way embedding
tuning shifts the rows of frequent tokens, plus small noise on 200 other rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from fairseq2_kslottery.selection import SelectionRequest, describe_outcome, run_selection

__all__ = ["run_standin_demo", "SHIFTED_ROWS"]

SHIFTED_ROWS = (3, 10, 42, 77, 128, 200, 311, 404)
"""The rows the stand-in moves clearly; the KS selection should find exactly these."""


def run_standin_demo(out_dir: Path, *, log: Callable[[str], None] = print) -> Path:
    """Create the example under ``out_dir``, run top-k and alpha selection, print the results; returns out_dir."""
    from fairseq2_kslottery.toy import create_tiny_llama, save_fairseq2_checkpoint

    log(
        "NOTE: this is a STAND-IN for the KS-Lottery demo experiment (a real model on real parallel text, with "
        "training, evaluation and a report), which is not built yet. It runs only the selection stage, on a random "
        "tiny LLaMA and a synthetic 'tuned' copy."
    )
    out_dir = Path(out_dir)
    model, config = create_tiny_llama(vocab_size=512, seed=0)
    base_ckpt = save_fairseq2_checkpoint(model, config, out_dir / "base")

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        embed = model.decoder_frontend.embed.weight  # type: ignore[union-attr]
        # Many rows move a little (noise), a few move a lot (shift + scale), as after embedding tuning.
        noisy = torch.randperm(embed.shape[0], generator=gen)[:200]
        embed[noisy] += 0.002 * torch.randn(noisy.numel(), embed.shape[1], generator=gen)
        rows = torch.tensor(SHIFTED_ROWS)
        embed[rows] += 1.5 * embed.std()
    tuned_ckpt = save_fairseq2_checkpoint(model, config, out_dir / "tuned")
    log(f"base checkpoint : {base_ckpt}\ntuned checkpoint: {tuned_ckpt}")

    for name, rule in (("tickets_top8.json", {"top_k": 8}), ("tickets_bh05.json", {"alpha": 0.05})):
        request = SelectionRequest(
            base=str(base_ckpt / "model.yaml"),
            tuned=str(tuned_ckpt),
            out=out_dir / name,
            correction="bh",
            **rule,  # type: ignore[arg-type]
        )
        outcome = run_selection(request, log=log)
        print(describe_outcome(outcome))
        found = sorted(outcome.tickets.token_ids)
        print(f"shifted rows {sorted(SHIFTED_ROWS)} -> selected {found}\nwrote {request.out}\n")
    return out_dir
