"""The ticket patch: the k rows a ticket run (or a partial transfer) changes, as one small file.

Format (safetensors, written atomically):

- ``token_ids``: int64 (k,) — the rows;
- ``rows``: (k, d) in the embedding's dtype — the new values of those rows (applying a patch *sets* them, so a
  partial transfer copies the tuned rows exactly);
- ``delta``: float32 (k, d) — ``rows - base rows`` (the trained delta of a ticket run), for analysis;
- metadata: ``format = kslottery-patch``, ``version``, ``vocab_size``, ``embed_dim``, ``output_side``
  (``input_only``: a tied model is untied, its output projection keeps the base matrix; ``tied``: the shared matrix
  changes on both sides), ``base_fingerprint``, ``source``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch
from torch import Tensor
from torch.nn import Module

from fairseq2_kslottery.embedding import TIED_MODES, find_input_embedding, is_tied, untie_input_embedding
from fairseq2_kslottery.errors import KSLotteryError
from fairseq2_kslottery.io import atomic_path, tensor_fingerprint

__all__ = ["PATCH_FORMAT", "PatchError", "TicketPatch", "apply_patch", "changed_rows_patch"]

PATCH_FORMAT: Final = "kslottery-patch"
PATCH_VERSION: Final = 1


class PatchError(KSLotteryError):
    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"`{path}` is not a usable ticket patch: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class TicketPatch:
    token_ids: Tensor
    rows: Tensor
    delta: Tensor
    vocab_size: int
    output_side: str = "input_only"
    base_fingerprint: str | None = None
    source: str = ""

    @property
    def k(self) -> int:
        return int(self.token_ids.numel())

    @property
    def embed_dim(self) -> int:
        return int(self.rows.shape[1])

    @classmethod
    def from_rows(
        cls, base_weight: Tensor, token_ids: Tensor, rows: Tensor, *, output_side: str = "input_only", source: str = ""
    ) -> TicketPatch:
        """A patch that sets ``base_weight[token_ids]`` to ``rows`` (cast to the base dtype)."""
        ids = torch.as_tensor(token_ids, dtype=torch.int64).flatten().cpu()
        new_rows = rows.detach().to(device="cpu", dtype=base_weight.dtype).contiguous()
        delta = new_rows.float() - base_weight.detach()[ids].cpu().float()
        return cls(
            ids,
            new_rows,
            delta.contiguous(),
            int(base_weight.shape[0]),
            output_side,
            tensor_fingerprint(base_weight),
            source,
        )

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        if self.output_side not in TIED_MODES:
            raise PatchError(path, f"`output_side` must be one of {', '.join(TIED_MODES)}.")
        metadata = {
            "format": PATCH_FORMAT,
            "version": str(PATCH_VERSION),
            "vocab_size": str(self.vocab_size),
            "embed_dim": str(self.embed_dim),
            "output_side": self.output_side,
            "base_fingerprint": self.base_fingerprint or "",
            "source": self.source,
        }
        tensors = {"token_ids": self.token_ids.contiguous(), "rows": self.rows, "delta": self.delta}
        with atomic_path(Path(path)) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> TicketPatch:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise PatchError(path, "the file does not exist.")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != PATCH_FORMAT:
                    raise PatchError(path, f"its format is {meta.get('format')!r}, expected {PATCH_FORMAT!r}.")
                if meta.get("version") != str(PATCH_VERSION):
                    raise PatchError(path, f"version {meta.get('version')!r}; this release reads {PATCH_VERSION}.")
                missing = {"token_ids", "rows", "delta"} - set(f.keys())
                if missing:
                    raise PatchError(path, f"tensor(s) {', '.join(sorted(missing))} missing.")
                ids, rows, delta = f.get_tensor("token_ids"), f.get_tensor("rows"), f.get_tensor("delta")
        except (SafetensorError, OSError, ValueError) as exc:
            raise PatchError(path, f"it cannot be read ({exc}).") from None
        vocab = int(meta.get("vocab_size", "0"))
        if ids.dim() != 1 or rows.dim() != 2 or rows.shape[0] != ids.numel() or delta.shape != rows.shape:
            raise PatchError(path, "`token_ids`, `rows` and `delta` have inconsistent shapes.")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise PatchError(path, f"a token id is outside the vocabulary [0, {vocab}).")
        return cls(
            ids,
            rows,
            delta,
            vocab,
            meta.get("output_side", "input_only"),
            meta.get("base_fingerprint") or None,
            meta.get("source", ""),
        )

    def describe(self) -> str:
        return json.dumps(
            {
                "k": self.k,
                "vocab_size": self.vocab_size,
                "embed_dim": self.embed_dim,
                "output_side": self.output_side,
                "source": self.source,
            }
        )


def changed_rows_patch(
    base: Tensor, tuned: Tensor, *, output_side: str = "input_only", source: str = ""
) -> TicketPatch:
    """A patch of every row that differs between two embeddings (e.g. the result of embedding-only tuning)."""
    if base.shape != tuned.shape:
        raise PatchError(
            source or "<patch>", f"the embeddings differ in shape: {tuple(base.shape)} and {tuple(tuned.shape)}."
        )
    changed = torch.nonzero((base != tuned.to(base.dtype)).any(dim=1)).flatten()
    return TicketPatch.from_rows(base, changed, tuned[changed], output_side=output_side, source=source)


def apply_patch(model: Module, patch: TicketPatch) -> None:
    """Set the patched rows of ``model``'s input embedding (and, for ``output_side: tied`` on a tied model, of the
    shared output matrix). A tied model patched ``input_only`` is untied first, so its output projection keeps the
    base matrix.

    :raises PatchError: the patch does not fit the model (vocabulary or width).
    """
    embed = find_input_embedding(model)
    weight: Tensor = embed.weight  # type: ignore[assignment]
    if (embed.num_embeddings, embed.embed_dim) != (patch.vocab_size, patch.embed_dim):
        raise PatchError(
            patch.source or "<patch>",
            f"it is for a {patch.vocab_size}x{patch.embed_dim} embedding, but the model's is "
            f"{embed.num_embeddings}x{embed.embed_dim}.",
        )
    if is_tied(model) and patch.output_side == "input_only":
        untie_input_embedding(model)
        weight = embed.weight  # type: ignore[assignment]
    with torch.no_grad():
        weight[patch.token_ids.to(weight.device)] = patch.rows.to(device=weight.device, dtype=weight.dtype)
