"""Saving models and folding ticket runs back into normal checkpoints.

- :func:`save_fairseq2_checkpoint`: a model in fairseq2's native layout (``checkpoints/{model.yaml, step_N/model}``),
  loadable by its ``model.yaml`` card; written with fairseq2's checkpoint manager.
- :func:`save_hugging_face_checkpoint`: ``config.json`` + ``model.safetensors`` through fairseq2's converter, with
  the converter's llama guesses corrected from the actual weights (FFN width) and the tokenizer (BOS/EOS ids).
- :func:`export_ticket_run`: a finished ticket run -> ticket patch + fairseq2 checkpoint + Hugging Face folder.
- :func:`load_original_model`: the model a tuning run started from, rebuilt the way fairseq2 loaded it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor
from torch.nn import Module

from fairseq2_kslottery.embedding import find_input_embedding, is_tied
from fairseq2_kslottery.errors import KSLotteryError
from fairseq2_kslottery.patches import TicketPatch, apply_patch

__all__ = [
    "ExportError",
    "ExportResult",
    "save_fairseq2_checkpoint",
    "save_hugging_face_checkpoint",
    "load_original_model",
    "load_model_source",
    "read_ticket_run",
    "export_ticket_run",
    "ticket_run_patch",
    "transfer_patch",
]

_STEP = re.compile(r"^step_(\d+)$")


class ExportError(KSLotteryError):
    pass


def _resolver() -> Any:
    from fairseq2.runtime.dependency import get_dependency_resolver

    return get_dependency_resolver()


def save_fairseq2_checkpoint(model: Module, family: str, config: object, output_dir: Path, step: int = 1) -> Path:
    """Save ``model`` as a fairseq2 training run would: ``output_dir/checkpoints/{model.yaml, step_N/model/...}``.

    Returns the ``checkpoints`` folder; its ``model.yaml`` loads the model (``last_checkpoint``).
    """
    from fairseq2.checkpoint import ModelMetadataDumper, StandardCheckpointManager
    from fairseq2.device import CPU
    from fairseq2.file_system import FileSystem
    from fairseq2.gang import create_fake_gangs
    from fairseq2.io import TensorFileDumper, TensorFileLoader
    from fairseq2.utils.threading import ThreadPool

    resolver = _resolver()
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
    resolver.resolve(ModelMetadataDumper).dump(checkpoints, family, config)
    return checkpoints


def save_hugging_face_checkpoint(
    state_dict: dict[str, Tensor],
    family: str,
    config: object,
    save_dir: Path,
    *,
    bos_idx: int | None = None,
    eos_idx: int | None = None,
) -> Path:
    """Save a fairseq2 state dict as a Hugging Face folder (``config.json`` + ``model.safetensors``).

    fairseq2's llama converter derives the FFN width from ``8 * dim / 3`` and assumes LLaMA's BOS/EOS ids; both are
    corrected here (from the weights, and from ``bos_idx``/``eos_idx`` when given).
    """
    from fairseq2.models.hg import HuggingFaceConfig, get_hugging_face_converter, save_hugging_face_model

    _resolver()
    converter = get_hugging_face_converter(family)
    # The converter permutes q/k projections in place: give it a copy.
    hg_state = converter.to_hg_state_dict({k: v.detach().clone() for k, v in state_dict.items()}, config)
    hg_config = converter.to_hg_config(config)
    data = dict(hg_config.data)
    gate = next((v for k, v in hg_state.items() if k.endswith("mlp.gate_proj.weight")), None)
    if isinstance(gate, Tensor) and "intermediate_size" in data:
        data["intermediate_size"] = int(gate.shape[0])
    if bos_idx is not None:
        data["bos_token_id"] = int(bos_idx)
    if eos_idx is not None:
        data["eos_token_id"] = int(eos_idx)
    fixed = dataclasses.replace(hg_config, data=data)
    assert isinstance(fixed, HuggingFaceConfig)
    save_hugging_face_model(Path(save_dir), hg_state, fixed)
    return Path(save_dir)


# --- runs -------------------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ExportError(f"`{path}` cannot be read ({exc}).") from None
    if not isinstance(data, dict):
        raise ExportError(f"`{path}` is not a YAML mapping.")
    return data


def load_original_model(run_dir: Path, *, resolver: Any = None, gangs: Any = None) -> tuple[Module, str, object]:
    """The model a tuning run in ``run_dir`` started from: (model on CPU, family name, model config).

    Uses the run's ``checkpoints/model.yaml`` (family and full configuration) and ``config.yaml`` (the source:
    ``model.name`` card, ``model.path`` checkpoint, or the saved ``initial_model.pt`` of a random initialisation).
    """
    from fairseq2.assets import AssetCard
    from fairseq2.device import CPU
    from fairseq2.gang import create_fake_gangs
    from fairseq2.models import ModelFamily

    resolver = resolver if resolver is not None else _resolver()
    gangs = gangs if gangs is not None else create_fake_gangs(CPU)
    run_dir = Path(run_dir)
    metadata = _read_yaml(run_dir / "checkpoints" / "model.yaml")
    family_name = str(metadata["model_family"])
    family: ModelFamily = resolver.resolve(ModelFamily, key=family_name)
    model_config = family.get_model_config(AssetCard("kslottery_run", metadata))
    section = _read_yaml(run_dir / "config.yaml").get("model") or {}
    dtype = _dtype(section.get("dtype"))
    if section.get("path"):
        model = family.load_custom_model(
            Path(section["path"]), model_config, gangs, dtype, load_rank0_only=False, mmap=False, restrict=None
        )
    elif section.get("name"):
        from fairseq2.assets import AssetStore

        card = resolver.resolve(AssetStore).retrieve_card(str(section["name"]))
        model = family.load_model(card, gangs, dtype, model_config, load_rank0_only=False, mmap=False)
    else:
        initial = run_dir / "initial_model.pt"
        if not initial.is_file():
            raise ExportError(f"`{run_dir}` started from a random model but has no `initial_model.pt`.")
        model = family.load_custom_model(
            initial, model_config, gangs, dtype, load_rank0_only=False, mmap=False, restrict=None
        )
    return model, family_name, model_config


def load_model_source(source: str) -> tuple[Module, str, object]:
    """A whole model (CPU, fp32 unless the card says otherwise) from a fairseq2 asset-card name or a fairseq2
    ``checkpoints/`` folder (its ``model.yaml`` and last ``step_N``): (model, family name, config)."""
    from fairseq2.assets import AssetCard, AssetNotFoundError, AssetStore
    from fairseq2.device import CPU
    from fairseq2.gang import create_fake_gangs
    from fairseq2.models import ModelFamily

    resolver = _resolver()
    gangs = create_fake_gangs(CPU)
    path = Path(source)
    if path.is_dir():
        card_path = path / "model.yaml" if (path / "model.yaml").is_file() else path / "checkpoints" / "model.yaml"
        if not card_path.is_file():
            raise ExportError(f"`{source}` is not a fairseq2 checkpoints folder (no model.yaml).")
        metadata = _read_yaml(card_path)
        family_name = str(metadata["model_family"])
        family: ModelFamily = resolver.resolve(ModelFamily, key=family_name)
        config = family.get_model_config(AssetCard("kslottery_source", metadata))
        step_dir = card_path.parent / f"step_{_last_step(card_path.parent)}" / "model"
        model = family.load_custom_model(
            step_dir, config, gangs, torch.float32, load_rank0_only=False, mmap=False, restrict=None
        )
        return model, family_name, config
    try:
        card = resolver.resolve(AssetStore).retrieve_card(source)
    except AssetNotFoundError:
        raise ExportError(f"`{source}` is neither a fairseq2 checkpoints folder nor a known model card.") from None
    family_name = card.field("model_family").as_(str)
    family = resolver.resolve(ModelFamily, key=family_name)
    config = family.get_model_config(card)
    return family.load_model(card, gangs, torch.float32, config, load_rank0_only=False, mmap=False), family_name, config


def _dtype(value: object) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    name = str(value or "float32").removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ExportError(f"Unknown model dtype `{value}`.")
    return dtype


def _last_step(checkpoints: Path) -> int:
    steps = [int(m.group(1)) for p in checkpoints.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    if not steps:
        raise ExportError(f"`{checkpoints}` holds no finished checkpoint (step_N folder).")
    return max(steps)


def read_ticket_run(run_dir: Path, step: int | None = None) -> tuple[Tensor, Tensor, int, str]:
    """(token ids, float32 delta, step, output side) of a ticket run's checkpoint (the last one by default)."""
    run_dir = Path(run_dir)
    checkpoints = run_dir / "checkpoints"
    if not checkpoints.is_dir():
        raise ExportError(f"`{run_dir}` is not a tuning run (no checkpoints/ folder).")
    step = step if step is not None else _last_step(checkpoints)
    shards = sorted((checkpoints / f"step_{step}" / "model" / "pp_00" / "tp_00").glob("sdp_*.pt"))
    if not shards:
        raise ExportError(f"`{checkpoints / f'step_{step}'}` holds no model file.")
    states = [torch.load(f, map_location="cpu", weights_only=True) for f in shards]
    if "decoder_frontend.embed.delta" not in states[0]:
        raise ExportError(f"`{run_dir}` is not a ticket run (its checkpoint has no ticket delta).")
    # FSDP shards the delta along its rows like any parameter; the ids are a (replicated) buffer.
    delta = torch.cat([state["decoder_frontend.embed.delta"] for state in states], dim=0)
    token_ids = states[0]["decoder_frontend.embed.token_ids"]
    if delta.shape[0] != token_ids.numel():
        raise ExportError(f"`{run_dir}` step {step}: the delta has {delta.shape[0]} rows for {token_ids.numel()} ids.")
    config = _read_yaml(run_dir / "config.yaml")
    side = str((config.get("tuning") or {}).get("tied", "input_only"))
    return token_ids, delta.float(), step, side


def ticket_run_patch(run_dir: Path, base_source: str) -> TicketPatch:
    """The ticket patch of a ticket run, from its delta and the base embedding only (no full model is loaded)."""
    from fairseq2_kslottery.sources import load_input_embedding

    token_ids, delta, step, side = read_ticket_run(run_dir)
    return _delta_patch(load_input_embedding(base_source).weight, token_ids, delta, side, f"{run_dir} step {step}")


def _delta_patch(base: Tensor, token_ids: Tensor, delta: Tensor, side: str, source: str) -> TicketPatch:
    return TicketPatch.from_rows(base, token_ids, base[token_ids].float() + delta, output_side=side, source=source)


def transfer_patch(base_source: str, tuned_source: str, tickets_file: Path, *, output_side: str) -> TicketPatch:
    """Partial transfer: a patch that copies the ticket rows of the tuned embedding into the base embedding."""
    from fairseq2_kslottery.errors import SelectionError
    from fairseq2_kslottery.sources import load_input_embedding
    from fairseq2_kslottery.tickets import TicketSet

    base = load_input_embedding(base_source).weight
    tuned = load_input_embedding(tuned_source).weight
    if base.shape != tuned.shape:
        raise SelectionError(
            f"The base and tuned embeddings have different shapes: {tuple(base.shape)} and {tuple(tuned.shape)}."
        )
    tickets = TicketSet.load(tickets_file, vocab_size=int(base.shape[0]))
    ids = torch.tensor(tickets.token_ids, dtype=torch.int64)
    return TicketPatch.from_rows(base, ids, tuned[ids], output_side=output_side, source=f"transfer {tickets_file}")


@dataclass
class ExportResult:
    patch: Path
    fairseq2: Path | None
    hugging_face: Path | None
    step: int
    k: int


def export_ticket_run(
    run_dir: Path, out_dir: Path, *, step: int | None = None, fairseq2: bool = True, hugging_face: bool = True
) -> ExportResult:
    """Fold a ticket run's delta into its original model and write patch / fairseq2 / Hugging Face outputs."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    token_ids, delta, step, side = read_ticket_run(run_dir, step)
    model, family, config = load_original_model(run_dir)
    embed = find_input_embedding(model)
    base: Tensor = embed.weight.detach()  # type: ignore[assignment]
    patch = _delta_patch(base, token_ids, delta, side, f"{run_dir} step {step}")
    out_dir.mkdir(parents=True, exist_ok=True)
    patch_path = out_dir / "ticket_patch.safetensors"
    patch.save(patch_path)

    untie = is_tied(model) and side == "input_only"
    apply_patch(model, patch)
    if untie and hasattr(config, "tied_embeddings"):
        # The output projection keeps the base matrix: the exported model is untied.
        config = dataclasses.replace(config, tied_embeddings=False)  # type: ignore[type-var]
    fs2_dir = hf_dir = None
    if fairseq2:
        fs2_dir = save_fairseq2_checkpoint(model, family, config, out_dir / "fairseq2", step=step)
    if hugging_face:
        bos, eos = _tokenizer_ids(run_dir)
        hf_dir = save_hugging_face_checkpoint(
            dict(model.state_dict()), family, config, out_dir / "hf", bos_idx=bos, eos_idx=eos
        )
    return ExportResult(patch_path, fs2_dir, hf_dir, step, patch.k)


def _tokenizer_ids(run_dir: Path) -> tuple[int | None, int | None]:
    """BOS/EOS ids of the run's tokenizer, when it can be loaded."""
    try:
        from fairseq2.data.tokenizers import load_tokenizer

        section = _read_yaml(run_dir / "config.yaml").get("tokenizer") or {}
        if not section.get("name"):
            return None, None
        info = load_tokenizer(str(section["name"])).vocab_info
        return info.bos_idx, info.eos_idx
    except Exception:  # the ids are a courtesy for Hugging Face users; the weights are what matters
        return None, None
