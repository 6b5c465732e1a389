"""Shared fixtures: one fairseq2 initialisation per test session, tiny tokenizers and checkpoints made with
fairseq2's own APIs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Make a failing extension raise instead of only logging a warning, in this process and its children.
os.environ["FAIRSEQ2_EXTENSION_TRACE"] = "1"
os.environ.setdefault("FAIRSEQ2_NO_PROGRESS", "1")

SENTENCES = [
    "the cat sat on the mat .",
    "a dog ran in the park , and the cat watched .",
    "in the beginning was the word .",
    "light shines in the darkness , and the darkness has not overcome it .",
    "the quick brown fox jumps over the lazy dog .",
    "we translate sentences from english to german and french .",
    "numbers like 1 , 2 , 3 and 42 appear too .",
    "newlines and punctuation ; colons : and questions ?",
]


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SentencePiece BPE model trained on a few sentences (with byte fallback, so '\\n' is a piece)."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20),
        model_prefix=str(folder / "tiny"),
        vocab_size=300,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return folder / "tiny.model"


@dataclass
class TinyPaths:
    vocab_size: int
    base_run: Path
    tuned_run: Path
    hf_base: Path
    hf_tuned: Path
    shifted: tuple[int, ...]
    base_embed: torch.Tensor
    tuned_embed: torch.Tensor


SHIFTED = (5, 17, 60, 123, 250)


@pytest.fixture(scope="session")
def sp_vocab_size(sp_model: Path) -> int:
    import sentencepiece as spm

    return int(spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size())


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def asset_dir(tmp_path_factory: pytest.TempPathFactory, tiny_root: Path, sp_model: Path, sp_vocab_size: int) -> Path:
    """A user asset-card folder, written and registered before fairseq2 first loads its (load-once) asset store."""
    path = tmp_path_factory.mktemp("user_assets")
    (path / "tiny.yaml").write_text(
        f"name: test_tiny_base\nmodel_family: llama\nmodel_arch: kslottery_tiny\n"
        f"model_config: {{vocab_size: {sp_vocab_size}}}\n"
        f"checkpoint: {tiny_root}/base_run/checkpoints/step_1/model\n"
        f"tokenizer: {sp_model}\ntokenizer_family: llama\ntokenizer_config: {{impl: sp}}\n"
        "---\n"
        "name: test_remote\nmodel_family: llama\nmodel_arch: kslottery_tiny\n"
        "checkpoint: hg://nobody/nothing\n"
    )
    os.environ["FAIRSEQ2_USER_ASSET_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def fairseq2_ready(asset_dir: Path) -> None:
    """fairseq2 initialised once for the session, with this extension and the test asset cards."""
    from fairseq2_kslottery.toy import ensure_fairseq2

    ensure_fairseq2()


@pytest.fixture(scope="session")
def tiny(fairseq2_ready: None, tiny_root: Path, sp_vocab_size: int) -> TinyPaths:
    """Base and tuned tiny LLaMA checkpoints in fairseq2's native layout and in Hugging Face safetensors naming.

    The tuned model differs from the base in the rows ``SHIFTED`` (clearly) and in 40 other rows (slightly).
    """
    from fairseq2_kslottery.toy import create_tiny_llama, save_fairseq2_checkpoint, save_hugging_face_checkpoint

    vocab_size = sp_vocab_size
    root = tiny_root
    model, config = create_tiny_llama(vocab_size=vocab_size, seed=0)
    save_fairseq2_checkpoint(model, config, root / "base_run")
    save_hugging_face_checkpoint(dict(model.state_dict()), config, root / "hf_base")
    base_embed = model.decoder_frontend.embed.weight.detach().clone()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        embed = model.decoder_frontend.embed.weight
        noisy = torch.arange(200, 240)
        embed[noisy] += 0.001 * torch.randn(noisy.numel(), embed.shape[1], generator=gen)
        embed[list(SHIFTED)] += 2.0 * embed.std()
    save_fairseq2_checkpoint(model, config, root / "tuned_run")
    save_hugging_face_checkpoint(dict(model.state_dict()), config, root / "hf_tuned")
    return TinyPaths(
        vocab_size=vocab_size,
        base_run=root / "base_run",
        tuned_run=root / "tuned_run",
        hf_base=root / "hf_base",
        hf_tuned=root / "hf_tuned",
        shifted=SHIFTED,
        base_embed=base_embed,
        tuned_embed=model.decoder_frontend.embed.weight.detach().clone(),
    )


@pytest.fixture(scope="session")
def smoke_base(fairseq2_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random kslottery_tiny LLaMA with the smoke tokenizer's vocabulary (400), as a fairseq2 checkpoint; returns
    the `checkpoints/step_1/model` folder (a `model.path` for the smoke recipes)."""
    from fairseq2_kslottery.toy import create_tiny_llama, save_fairseq2_checkpoint

    root = tmp_path_factory.mktemp("smoke_base")
    model, config = create_tiny_llama(vocab_size=400, seed=11)
    save_fairseq2_checkpoint(model, config, root)
    return root / "checkpoints" / "step_1" / "model"
