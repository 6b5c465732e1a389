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
    """Save ``model`` as a fairseq2 training run would: ``output_dir/checkpoints/{model.yaml, step_N/model/...}``.

    Returns the ``checkpoints`` folder.
    """
    from fairseq2.checkpoint import ModelMetadataDumper, StandardCheckpointManager
    from fairseq2.device import CPU
    from fairseq2.file_system import FileSystem
    from fairseq2.gang import create_fake_gangs
    from fairseq2.io import TensorFileDumper, TensorFileLoader
    from fairseq2.runtime.dependency import get_dependency_resolver
    from fairseq2.utils.threading import ThreadPool

    ensure_fairseq2()
    resolver = get_dependency_resolver()
    manager = StandardCheckpointManager(
        Path(output_dir),
        create_fake_gangs(CPU),
        resolver.resolve(FileSystem),
        resolver.resolve(TensorFileLoader),
        resolver.resolve(TensorFileDumper),
        resolver.resolve(ThreadPool),
    )
    manager.save_model_only(step, model, blocking=True)
    checkpoints = Path(output_dir) / "checkpoints"
    resolver.resolve(ModelMetadataDumper).dump(checkpoints, "llama", config)
    return checkpoints


def save_hugging_face_checkpoint(state_dict: dict[str, Tensor], config: object, save_dir: Path) -> Path:
    """Save a fairseq2 llama state dict as a Hugging Face folder (``config.json`` + ``model.safetensors``)."""
    from fairseq2.models.hg import get_hugging_face_converter, save_hugging_face_model

    ensure_fairseq2()
    converter = get_hugging_face_converter("llama")
    # The converter permutes q/k projections in place: give it a copy.
    hg_state = converter.to_hg_state_dict({k: v.clone() for k, v in state_dict.items()}, config)
    save_hugging_face_model(Path(save_dir), hg_state, converter.to_hg_config(config))
    return Path(save_dir)
