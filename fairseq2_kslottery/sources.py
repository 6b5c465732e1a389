"""Reading the input token-embedding matrix from wherever a model lives — and nothing else of the model.

A *source* is one of:

- a fairseq2 asset-card name (the card's local ``checkpoint`` is read; remote checkpoints are never downloaded);
- a fairseq2 training checkpoint: a ``checkpoints/step_N`` folder, its ``model/`` folder, the ``checkpoints/``
  folder or its ``model.yaml`` card (both mean the last step), or any YAML asset card file with a ``checkpoint``;
- a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file, or a folder of them (Hugging Face sharded checkpoints
  included), holding the embedding under the fairseq2 key ``decoder_frontend.embed.weight``, the Hugging Face key
  ``model.embed_tokens.weight`` or the reference LLaMA key ``tok_embeddings.weight`` (detected automatically).

safetensors files are opened lazily and only the embedding tensor is read; pickled files are loaded with
``weights_only=True`` (tensors only, no code) and memory-mapped where the format allows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from torch import Tensor

from fairseq2_kslottery.errors import SourceError

__all__ = ["EMBED_KEYS", "LoadedEmbedding", "load_input_embedding", "resolve_card_paths"]

EMBED_KEYS: Final = ("decoder_frontend.embed.weight", "model.embed_tokens.weight", "tok_embeddings.weight")
"""Keys under which checkpoints store the input embedding: fairseq2, Hugging Face, reference LLaMA."""

_PICKLE_SUFFIXES: Final = (".pt", ".pth", ".bin")
_STEP_DIR: Final = re.compile(r"^step_(\d+)$")


@dataclass
class LoadedEmbedding:
    """The input embedding of a source, with where it came from."""

    weight: Tensor
    """(V, d) tensor, on CPU, in the dtype stored in the checkpoint."""

    source: str
    """The source as given by the user."""

    files: list[Path]
    """The files the tensor was read from."""

    key: str
    """The state-dict key that held it."""

    tokenizer_hint: str | None = None
    """A tokenizer card name or path known from the source (e.g. the asset card's tokenizer), if any."""


def load_input_embedding(source: str | Path) -> LoadedEmbedding:
    """Read only the input embedding of ``source`` (see the module docstring for what a source can be).

    :raises SourceError: the source does not exist, cannot be read, holds no embedding tensor under a known key,
        holds a non-2-D or non-floating-point one, or is an asset card whose checkpoint is not a local path.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        return _from_path(path, text)
    if _looks_like_path(text):
        raise SourceError(text, "no such file or directory.")
    return _from_card(text)


def _looks_like_path(text: str) -> bool:
    return (
        "/" in text
        or "\\" in text
        or text.startswith(".")
        or Path(text).suffix.lower()
        in (
            ".safetensors",
            ".yaml",
            ".yml",
            *_PICKLE_SUFFIXES,
        )
    )


def _from_path(path: Path, source: str, *, hint: str | None = None) -> LoadedEmbedding:
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".yaml", ".yml"):
            return _from_card_file(path, source)
        if suffix == ".safetensors" or suffix in _PICKLE_SUFFIXES:
            tensor, key = _read_file(path, source)
            return _finish(tensor, source, [path], key, hint)
        raise SourceError(source, f"`{path.name}` is not a .safetensors, .pt, .pth, .bin or asset-card .yaml file.")
    if path.is_dir():
        return _from_dir(path, source, hint)
    raise SourceError(source, "it is neither a file nor a directory.")


def _from_dir(path: Path, source: str, hint: str | None) -> LoadedEmbedding:
    # fairseq2 training output: checkpoints/ (model.yaml + step_N/), step_N/ (model/pp_00/...), or model/ itself.
    if (path / "model" / "pp_00").is_dir():
        return _from_native(path / "model", source, hint)
    if (path / "pp_00").is_dir():
        return _from_native(path, source, hint)
    steps = _step_dirs(path)
    if steps:
        return _from_dir(steps[-1], source, hint)
    if (path / "checkpoints").is_dir() and _step_dirs(path / "checkpoints"):
        return _from_dir(path / "checkpoints", source, hint)

    safetensors = sorted(path.glob("*.safetensors"))
    pickles = sorted(p for p in path.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES and p.is_file())
    candidates = safetensors or pickles
    if not candidates:
        raise SourceError(
            source, "the folder holds no .safetensors/.pt files and is not a fairseq2 checkpoint (no step_N folder)."
        )
    index = path / "model.safetensors.index.json"
    if safetensors and index.is_file():
        # Hugging Face sharded checkpoint: the index says which shard holds which key.
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, json.JSONDecodeError) as exc:
            raise SourceError(source, f"`{index.name}` cannot be read ({exc}).") from None
        for key in EMBED_KEYS:
            if key in weight_map:
                candidates = [path / weight_map[key]]
                break
    for file in candidates:
        found = _read_file(file, source, missing_ok=True)
        if found is not None:
            return _finish(found[0], source, [file], found[1], hint or _hf_tokenizer_hint(path))
    raise SourceError(source, f"none of its files holds an input embedding under {_keys_text()}.")


def _hf_tokenizer_hint(path: Path) -> str | None:
    for name in ("tokenizer.json", "tokenizer.model"):
        if (path / name).is_file():
            return str(path / name)
    return None


def _step_dirs(path: Path) -> list[Path]:
    found = []
    for child in path.iterdir() if path.is_dir() else []:
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return [p for _, p in sorted(found)]


def _from_native(model_dir: Path, source: str, hint: str | None) -> LoadedEmbedding:
    """fairseq2's native layout: model/pp_XX/tp_YY/sdp_ZZ.pt (torch.save pickles of flat state dicts)."""
    tp_dirs = sorted((model_dir / "pp_00").glob("tp_*"))
    tp_parts: list[Tensor] = []
    files: list[Path] = []
    key = EMBED_KEYS[0]
    for tp_dir in tp_dirs:
        sdp_parts = []
        for file in sorted(tp_dir.glob("sdp_*.pt")):
            found = _read_file(file, source, missing_ok=True)
            if found is not None:
                sdp_parts.append(found[0])
                key = found[1]
                files.append(file)
        if sdp_parts:
            # FSDP shards a parameter along dim 0.
            tp_parts.append(sdp_parts[0] if len(sdp_parts) == 1 else torch.cat(sdp_parts, dim=0))
    if not tp_parts:
        raise SourceError(source, f"no file under `{model_dir}/pp_00` holds an input embedding under {_keys_text()}.")
    if len(tp_parts) == 1:
        return _finish(tp_parts[0], source, files, key, hint)
    # Tensor parallelism splits the embedding by columns (ShardedEmbedding, fairseq2's default) or by vocabulary
    # rows (VocabShardedEmbedding, `shard_embed_dim: false`); the checkpoint's model.yaml says which.
    dim = 1 if _shard_embed_dim(model_dir) else 0
    return _finish(torch.cat(tp_parts, dim=dim), source, files, key, hint)


def _shard_embed_dim(model_dir: Path) -> bool:
    for card in (model_dir.parent.parent / "model.yaml", model_dir.parent / "model.yaml"):
        if card.is_file():
            data = _read_yaml(card, str(card))
            config = data.get("model_config") or {}
            if isinstance(config, Mapping) and "shard_embed_dim" in config:
                return bool(config["shard_embed_dim"])
    return True


def _read_file(path: Path, source: str, *, missing_ok: bool = False) -> tuple[Tensor, str] | None:
    """The embedding tensor of one checkpoint file and its key (``None`` if absent and ``missing_ok``)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = set(f.keys())
                for key in EMBED_KEYS:
                    if key in keys:
                        return f.get_tensor(key), key
        except (SafetensorError, OSError, ValueError) as exc:
            raise SourceError(source, f"`{path}` is not a readable safetensors file ({_first_line(exc)}).") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            # Old (non-zip) serialisation cannot be memory-mapped.
            if "mmap" not in str(exc):
                raise SourceError(source, f"`{path}` is not a readable PyTorch file ({_first_line(exc)}).") from None
            state = _load_pickle(path, source)
        except Exception as exc:  # pickle errors, truncated zips, refused non-tensor objects
            raise SourceError(source, f"`{path}` is not a readable PyTorch file ({_first_line(exc)}).") from None
        found = _find_in_state(state)
        if found is not None:
            return found
    if missing_ok:
        return None
    raise SourceError(source, f"`{path.name}` holds no input embedding under {_keys_text()}.")


def _load_pickle(path: Path, source: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SourceError(source, f"`{path}` is not a readable PyTorch file ({_first_line(exc)}).") from None


def _find_in_state(state: Any) -> tuple[Tensor, str] | None:
    if not isinstance(state, Mapping):
        return None
    for key in EMBED_KEYS:
        value = state.get(key)
        if isinstance(value, Tensor):
            return value, key
    # Older fairseq2 checkpoints and some trainers nest the weights under "model".
    nested = state.get("model")
    if isinstance(nested, Mapping):
        return _find_in_state(nested)
    return None


def _finish(tensor: Tensor, source: str, files: list[Path], key: str, hint: str | None) -> LoadedEmbedding:
    if tensor.dim() != 2:
        raise SourceError(source, f"`{key}` has shape {tuple(tensor.shape)}, expected a 2-D (V, d) matrix.")
    if not tensor.is_floating_point():
        raise SourceError(source, f"`{key}` has dtype {tensor.dtype}, expected floating point.")
    return LoadedEmbedding(weight=tensor.detach(), source=source, files=files, key=key, tokenizer_hint=hint)


def _keys_text() -> str:
    return ", ".join(f"`{k}`" for k in EMBED_KEYS)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- asset cards ------------------------------------------------------------------------------------------------


def _read_yaml(path: Path, source: str) -> dict[str, Any]:
    import yaml

    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SourceError(source, f"`{path}` is not a readable YAML file ({_first_line(exc)}).") from None
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise SourceError(source, f"`{path}` must hold exactly one asset card (a YAML mapping).")
    return docs[0]


def _from_card_file(path: Path, source: str) -> LoadedEmbedding:
    card = _read_yaml(path, source)
    tokenizer = card.get("tokenizer")
    hint = str((path.parent / tokenizer).resolve()) if isinstance(tokenizer, str) and "://" not in tokenizer else None
    checkpoint = card.get("checkpoint")
    if checkpoint is None:
        # checkpoints/model.yaml written by a fairseq2 training run: the weights are in the step_N folders beside it.
        if _step_dirs(path.parent):
            return _from_dir(path.parent, source, hint)
        raise SourceError(source, f"the card `{path.name}` has no `checkpoint` and no step_N folder lies beside it.")
    if not isinstance(checkpoint, str):
        raise SourceError(source, f"the card's `checkpoint` must be a path, but is {checkpoint!r}.")
    target = _local_path(checkpoint, path.parent, source)
    if not target.exists():
        raise SourceError(source, f"the card's checkpoint `{target}` does not exist.")
    return _from_path(target, source, hint=hint)


def _local_path(uri: str, base: Path, source: str) -> Path:
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if "://" in uri:
        raise SourceError(
            source,
            f"its checkpoint `{uri}` is remote; this tool never downloads weights. Download the checkpoint yourself "
            "and pass its local path.",
        )
    p = Path(uri).expanduser()
    return p if p.is_absolute() else base / p


def resolve_card_paths(name: str) -> tuple[Path | None, Path | None]:
    """The local checkpoint and tokenizer paths of the fairseq2 asset card ``name`` (either may be ``None``).

    Initialises fairseq2 (with this extension) on first use.
    """
    from fairseq2.assets import AssetCardError, AssetNotFoundError, get_asset_store

    _ensure_fairseq2()
    store = get_asset_store()
    try:
        card = store.retrieve_card(name)
    except AssetNotFoundError:
        raise SourceError(name, "it is neither an existing path nor a known fairseq2 asset card.") from None
    paths: list[Path | None] = []
    for field_name in ("checkpoint", "tokenizer"):
        if not card.has_field(field_name):
            ref = card.maybe_get_field(f"{field_name}_ref")
            if ref is not None and field_name == "tokenizer":
                paths.append(resolve_card_paths(ref.as_(str))[1])
                continue
            paths.append(None)
            continue
        try:
            uri = card.field(field_name).as_uri()
        except AssetCardError as exc:
            raise SourceError(name, f"its `{field_name}` field is invalid ({_first_line(exc)}).") from None
        uri_text = str(uri)
        if uri_text.startswith("file://"):
            paths.append(Path(uri_text.removeprefix("file://")))
        elif field_name == "checkpoint":
            _local_path(uri_text, Path("."), name)  # raises: remote
        else:
            paths.append(None)
    return paths[0], paths[1]


def _from_card(name: str) -> LoadedEmbedding:
    checkpoint, tokenizer = resolve_card_paths(name)
    if checkpoint is None:
        raise SourceError(name, "the asset card has no `checkpoint` (a randomly initialised model has no weights).")
    if not checkpoint.exists():
        raise SourceError(name, f"the card's checkpoint `{checkpoint}` does not exist.")
    return _from_path(checkpoint, name, hint=name if tokenizer is not None else None)


def _ensure_fairseq2() -> None:
    """Make fairseq2's global resolver available: inside a recipe it is the recipe's; otherwise
    ``get_dependency_resolver()`` runs ``init_fairseq2()`` (and with it this extension) once."""
    from fairseq2.runtime.dependency import get_dependency_resolver

    get_dependency_resolver()
