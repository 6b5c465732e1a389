"""Reading the input embedding from fairseq2 checkpoints, asset cards and Hugging Face safetensors."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import TinyPaths
from fairseq2_kslottery.errors import SourceError
from fairseq2_kslottery.sources import load_input_embedding


def test_native_checkpoint_in_every_spelling(tiny: TinyPaths) -> None:
    ckpts = tiny.base_run / "checkpoints"
    for spelling in (ckpts / "step_1", ckpts / "step_1" / "model", ckpts, ckpts / "model.yaml", tiny.base_run):
        loaded = load_input_embedding(str(spelling))
        assert loaded.key == "decoder_frontend.embed.weight"
        assert torch.equal(loaded.weight, tiny.base_embed), spelling
        assert loaded.files == [ckpts / "step_1" / "model" / "pp_00" / "tp_00" / "sdp_00.pt"]


def test_native_checkpoint_directory_means_the_last_step(tiny: TinyPaths, tmp_path: Path) -> None:
    from fairseq2_kslottery.toy import create_tiny_llama, save_fairseq2_checkpoint

    model, config = create_tiny_llama(vocab_size=32, seed=1)
    save_fairseq2_checkpoint(model, config, tmp_path, step=2)
    with torch.no_grad():
        model.decoder_frontend.embed.weight.add_(1.0)
    save_fairseq2_checkpoint(model, config, tmp_path, step=10)
    loaded = load_input_embedding(str(tmp_path / "checkpoints"))
    assert torch.equal(loaded.weight, model.decoder_frontend.embed.weight)
    assert "step_10" in str(loaded.files[0])


def test_hugging_face_safetensors_folder_and_file(tiny: TinyPaths) -> None:
    loaded = load_input_embedding(str(tiny.hf_base))
    assert loaded.key == "model.embed_tokens.weight"
    assert torch.equal(loaded.weight, tiny.base_embed)
    single = load_input_embedding(str(tiny.hf_tuned / "model.safetensors"))
    assert torch.equal(single.weight, tiny.tuned_embed)


def test_sharded_hugging_face_folder_uses_the_index(tmp_path: Path) -> None:
    embed = torch.randn(10, 4)
    save_file({"model.norm.weight": torch.ones(4)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"model.embed_tokens.weight": embed}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {
        "weight_map": {
            "model.norm.weight": "model-00001-of-00002.safetensors",
            "model.embed_tokens.weight": "model-00002-of-00002.safetensors",
        }
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_input_embedding(str(tmp_path))
    assert torch.equal(loaded.weight, embed)
    assert loaded.files == [tmp_path / "model-00002-of-00002.safetensors"]


def test_pt_file_flat_and_nested(tmp_path: Path) -> None:
    embed = torch.randn(6, 3).to(torch.bfloat16)
    torch.save({"decoder_frontend.embed.weight": embed, "other": torch.zeros(2)}, tmp_path / "flat.pt")
    torch.save({"model": {"model.embed_tokens.weight": embed}}, tmp_path / "nested.pt")
    for name in ("flat.pt", "nested.pt"):
        loaded = load_input_embedding(str(tmp_path / name))
        assert loaded.weight.dtype == torch.bfloat16 and torch.equal(loaded.weight, embed)


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_pt_file_is_never_unpickled_beyond_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"decoder_frontend.embed.weight": _Exploit()}, f)
    torch.save({"decoder_frontend.embed.weight": torch.zeros(2, 2), "x": _Exploit()}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(SourceError, match=r"is not a readable PyTorch file"):
            load_input_embedding(str(tmp_path / name))
    assert not (tmp_path / "pwned").exists()


def test_asset_card_name_reads_the_card_checkpoint(tiny: TinyPaths) -> None:
    loaded = load_input_embedding("test_tiny_base")
    assert torch.equal(loaded.weight, tiny.base_embed)
    assert loaded.tokenizer_hint == "test_tiny_base"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("/no/such/file.safetensors", r"no such file or directory"),
        ("no_such_card_anywhere", r"neither an existing path nor a known fairseq2 asset card"),
        ("kslottery_tiny_llama", r"the asset card has no `checkpoint`"),
        ("test_remote", r"is remote; this tool never downloads weights"),
    ],
)
def test_bad_sources_say_what_is_wrong(tiny: TinyPaths, source: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        load_input_embedding(source)


def test_files_without_embedding_or_unreadable(tmp_path: Path) -> None:
    save_file({"lm_head.weight": torch.zeros(3, 2)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(SourceError, match=r"holds no input embedding under `decoder_frontend.embed.weight`"):
        load_input_embedding(str(tmp_path / "a.safetensors"))
    with pytest.raises(SourceError, match=r"none of its files holds an input embedding"):
        load_input_embedding(str(tmp_path))
    (tmp_path / "broken.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(SourceError, match=r"is not a readable safetensors file"):
        load_input_embedding(str(tmp_path / "broken.safetensors"))
    torch.save({"decoder_frontend.embed.weight": torch.zeros(4)}, tmp_path / "vec.pt")
    with pytest.raises(SourceError, match=r"has shape \(4,\), expected a 2-D \(V, d\) matrix"):
        load_input_embedding(str(tmp_path / "vec.pt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match=r"holds no .safetensors/.pt files and is not a fairseq2 checkpoint"):
        load_input_embedding(str(empty))
