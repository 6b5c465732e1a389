"""Tiny llama-family models built and saved with fairseq2's own APIs, for the demo stand-in and for tests.

Everything here goes through fairseq2: the model hub creates the model from the ``kslottery_tiny`` architecture
(registered by this extension), the checkpoint manager writes the native ``checkpoints/step_N`` layout with its
``model.yaml`` card, and fairseq2's Hugging Face converter writes safetensors in Hugging Face naming.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "ensure_fairseq2",
    "create_tiny_llama",
    "save_fairseq2_checkpoint",
    "save_hugging_face_checkpoint",
]


def ensure_fairseq2() -> None:
    """Initialise fairseq2 (and this extension) once per process."""
    from fairseq2_kslottery.sources import _ensure_fairseq2

    _ensure_fairseq2()


def create_tiny_llama(*, vocab_size: int = 512, seed: int = 0, **overrides: object) -> tuple[torch.nn.Module, object]:
    """A randomly initialised ``kslottery_tiny`` LLaMA (fp32, CPU) and its config."""
    from fairseq2.device import CPU
    from fairseq2.models.llama import get_llama_model_hub

    from fairseq2_kslottery.extension import TINY_LLAMA_ARCH

    ensure_fairseq2()
    hub = get_llama_model_hub()
    config = hub.get_arch_config(TINY_LLAMA_ARCH)
    config.vocab_size = vocab_size
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = hub.create_new_model(config, device=CPU, dtype=torch.float32)
    return model, config


def save_fairseq2_checkpoint(model: torch.nn.Module, config: object, output_dir: Path, step: int = 1) -> Path:
    """Save a llama-family ``model`` in fairseq2's native training-run layout (see :mod:`fairseq2_kslottery.export`)."""
    from fairseq2_kslottery.export import save_fairseq2_checkpoint as save

    ensure_fairseq2()
    return save(model, "llama", config, output_dir, step)


def save_hugging_face_checkpoint(state_dict: dict[str, Tensor], config: object, save_dir: Path) -> Path:
    """Save a fairseq2 llama state dict as a Hugging Face folder (``config.json`` + ``model.safetensors``)."""
    from fairseq2_kslottery.export import save_hugging_face_checkpoint as save

    ensure_fairseq2()
    return save(state_dict, "llama", config, save_dir)
