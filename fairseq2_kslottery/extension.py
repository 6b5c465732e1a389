"""The fairseq2 extension: the one place where this package touches fairseq2's dependency container.

fairseq2 calls :func:`setup_fairseq2_extension` (entry point group ``fairseq2.extension``) at the end of its own
registration, in ``init_fairseq2()`` and in every recipe's ``main()``.
"""

from __future__ import annotations

from importlib.resources import as_file, files
from pathlib import Path
from typing import Final

import fairseq2.recipe  # noqa: F401  (fairseq2's recipe modules import cleanly in this order)
from fairseq2.composition import register_dataset_family, register_file_assets, register_in_memory_assets
from fairseq2.metrics.recorders import MetricDescriptor
from fairseq2.models.llama import LLaMAConfig
from fairseq2.recipe.component import register_component
from fairseq2.recipe.config import AdamWConfig
from fairseq2.runtime.config_registry import ConfigRegistrar
from fairseq2.runtime.dependency import DependencyContainer
from torch.optim import Optimizer

__all__ = ["setup_fairseq2_extension", "asset_dir", "TINY_LLAMA_ARCH"]

TINY_LLAMA_ARCH: Final = "kslottery_tiny"
"""A llama-family architecture small enough to train in seconds on a CPU (smoke runs and tests)."""


def setup_fairseq2_extension(container: DependencyContainer) -> None:
    """Register the package's asset cards, model architectures, the parallel-text dataset family, the metric
    display names and the ``adamw_trainable`` optimizer with fairseq2."""
    from fairseq2_kslottery.data.dataset import (
        PARALLEL_DATASET_FAMILY,
        ParallelDataset,
        ParallelDatasetConfig,
        open_parallel_dataset,
    )
    from fairseq2_kslottery.evaluation import METRIC_DESCRIPTORS
    from fairseq2_kslottery.optim import TRAINABLE_ADAMW, create_trainable_adamw
    from fairseq2_kslottery.smollm2 import asset_cards as smollm2_cards

    register_file_assets(container, asset_dir())
    register_in_memory_assets(container, "kslottery_cache", smollm2_cards())
    _register_llama_archs(container)
    register_dataset_family(
        container, PARALLEL_DATASET_FAMILY, ParallelDataset, ParallelDatasetConfig, opener=open_parallel_dataset
    )
    for descriptor in METRIC_DESCRIPTORS:
        container.collection.register_instance(MetricDescriptor, descriptor)
    register_component(container, Optimizer, TRAINABLE_ADAMW, config_kls=AdamWConfig, factory=create_trainable_adamw)


def asset_dir() -> Path:
    """The folder of asset cards shipped with the package (``assets/`` in a source checkout)."""
    # A wheel ships the cards as the package data `fairseq2_kslottery.assets` (a plain directory, so the context
    # manager returns a stable path); a source checkout or editable install reads the top-level assets/ folder.
    try:
        with as_file(files("fairseq2_kslottery.assets")) as path:
            return Path(path)
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "assets"


def _register_llama_archs(container: DependencyContainer) -> None:
    arch = ConfigRegistrar(container, LLaMAConfig)

    @arch(TINY_LLAMA_ARCH)
    def _tiny() -> LLaMAConfig:
        # 2 layers of width 64; the FFN is 4x the width so that fairseq2's Hugging Face export round-trips.
        return LLaMAConfig(
            model_dim=64,
            max_seq_len=512,
            vocab_size=512,
            num_layers=2,
            num_attn_heads=4,
            num_key_value_heads=2,
            ffn_inner_dim=256,
            ffn_inner_dim_scale=1.0,
            ffn_inner_dim_multiple_of=1,
            rope_theta=10000.0,
            shard_embed_dim=False,
        )
