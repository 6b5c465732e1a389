"""The tuning recipe on recipes/smoke.yaml: every mode, frozen rows, resume, evaluation, export/apply/transfer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fairseq2_kslottery.tickets import TicketSet

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "smoke.yaml"
SMOKE_EVAL = REPO / "recipes" / "smoke_eval.yaml"
EMBED_KEY = "decoder_frontend.embed.weight"


def _tune_cmd(out: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fairseq2_kslottery.recipes.tune",
        str(out),
        "--no-rich",
        "--config-file",
        str(SMOKE),
        "--config",
        *overrides,
    ]


def _tune(out: Path, *overrides: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(_tune_cmd(out, *overrides), capture_output=True, text=True, env={**os.environ}, timeout=600)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


def _model_state(run: Path, step: int) -> dict[str, torch.Tensor]:
    path = run / "checkpoints" / f"step_{step}" / "model" / "pp_00" / "tp_00" / "sdp_00.pt"
    return torch.load(path, map_location="cpu", weights_only=True)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fairseq2_kslottery", *args],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=600,
    )


@pytest.fixture(scope="module")
def embed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Reference tuning (embedding only) of a random smoke model; its initial weights are the base."""
    out = tmp_path_factory.mktemp("embed_run")
    _tune(out, "optimizer.config.lr=0.01", "regime.score_metric=bleu", "regime.keep_best_n_checkpoints=1")
    return out


@pytest.fixture(scope="module")
def tickets_file(embed_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("select") / "tickets.json"
    proc = _cli(
        "select",
        "--base",
        str(embed_run / "initial_model.pt"),
        "--tuned",
        str(embed_run / "checkpoints"),
        "--top-k",
        "12",
        "--tokenizer",
        "kslottery_smoke_tokenizer",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def ticket_run(embed_run: Path, tickets_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ticket_run")
    _tune(
        out,
        f"model.path={embed_run / 'initial_model.pt'}",
        "tuning.mode=tickets",
        f"tuning.tickets={tickets_file}",
        "optimizer.config.lr=0.01",
        "optimizer.config.weight_decay=0.1",
    )
    return out


def test_embed_mode_trains_only_the_input_embedding(embed_run: Path) -> None:
    initial = torch.load(embed_run / "initial_model.pt", weights_only=True)
    final = _model_state(embed_run, 20)
    assert not torch.equal(final[EMBED_KEY], initial[EMBED_KEY])
    for key, value in initial.items():
        if key != EMBED_KEY:
            assert torch.equal(final[key], value), key
    info = json.loads((embed_run / "run_info.json").read_text())
    assert info["mode"] == "embed" and info["trainable_parameters"] == 400 * 64
    assert info["optimizer_parameters"] == 400 * 64
    # Validation translated the valid split and recorded the diagnostics.
    rows = [json.loads(line) for line in (embed_run / "metrics" / "valid" / "translation.jsonl").open()]
    assert {"BLEU", "chrF", "First-line BLEU", "EOS Rate", "Length Ratio"} <= set(rows[-1])
    hyps = [json.loads(line) for line in (embed_run / "hypotheses" / "valid_step_20.jsonl").open()]
    assert len(hyps) == 8 and {"src", "ref", "hyp", "eos", "raw"} <= set(hyps[0])
    # `regime.score_metric: bleu` scores checkpoints with the generated BLEU.
    score = float((embed_run / "checkpoints" / "scores" / "step_20.txt").read_text())
    assert score == pytest.approx(rows[-1]["BLEU"])


def test_full_mode_trains_every_parameter(embed_run: Path, tmp_path: Path) -> None:
    _tune(
        tmp_path,
        f"model.path={embed_run / 'initial_model.pt'}",
        "tuning.mode=full",
        "regime.num_steps=4",
        "lr_scheduler.config.cycle_len=4",
        "validation.generate=false",
    )
    initial = torch.load(embed_run / "initial_model.pt", weights_only=True)
    final = _model_state(tmp_path, 4)
    changed = [k for k in initial if not torch.equal(initial[k], final[k])]
    assert len(changed) == len(initial)
    assert json.loads((tmp_path / "run_info.json").read_text())["trainable_parameters"] == sum(
        v.numel() for v in initial.values()
    )


def test_ticket_run_changes_only_ticket_rows_bitwise(
    embed_run: Path, tickets_file: Path, ticket_run: Path, tmp_path: Path
) -> None:
    tickets = TicketSet.load(tickets_file)
    state = _model_state(ticket_run, 20)
    # The checkpoint is the delta and the ids: k x d, not a model.
    assert sorted(state) == ["decoder_frontend.embed.delta", "decoder_frontend.embed.token_ids"]
    assert state["decoder_frontend.embed.token_ids"].tolist() == tickets.token_ids
    info = json.loads((ticket_run / "run_info.json").read_text())
    assert info["trainable_parameters"] == info["optimizer_parameters"] == 12 * 64
    assert info["optimizer_state_bytes"] == 2 * 4 * 12 * 64

    export = _cli("export", str(ticket_run), "--out", str(tmp_path / "export"), "--no-hf")
    assert export.returncode == 0, export.stderr
    merged = _model_state(tmp_path / "export" / "fairseq2", 20)
    initial = torch.load(embed_run / "initial_model.pt", weights_only=True)
    ids = tickets.token_ids
    others = [i for i in range(400) if i not in ids]
    assert torch.equal(merged[EMBED_KEY][others], initial[EMBED_KEY][others])
    assert (merged[EMBED_KEY][ids] != initial[EMBED_KEY][ids]).any(dim=1).all()
    for key, value in initial.items():
        if key != EMBED_KEY:
            assert torch.equal(merged[key], value), key


def test_baselines_pick_rows_of_the_same_size(embed_run: Path, tickets_file: Path, tmp_path: Path) -> None:
    import sentencepiece as spm

    base = f"model.path={embed_run / 'initial_model.pt'}"
    common = (
        "tuning.mode=tickets",
        "regime.num_steps=2",
        "lr_scheduler.config.cycle_len=2",
        "validation.generate=false",
    )
    _tune(tmp_path / "nl", base, *common, "tuning.baseline=newline")
    sp = spm.SentencePieceProcessor(model_file=str(REPO / "assets" / "kslottery_smoke_sp.model"))
    # The smoke tokenizer has a literal newline piece (its byte-fallback twin <0x0A> is never produced).
    assert TicketSet.load(tmp_path / "nl" / "tickets_used.json").token_ids == [sp.piece_to_id("\n")]

    _tune(tmp_path / "rf", base, *common, "tuning.baseline=random_frequency", f"tuning.tickets={tickets_file}")
    matched = TicketSet.load(tmp_path / "rf" / "tickets_used.json")
    reference = TicketSet.load(tickets_file)
    assert matched.k == reference.k and not set(matched.token_ids) & set(reference.token_ids)
    assert matched.rule["kind"] == "random_frequency"

    _tune(tmp_path / "mf", base, *common, "tuning.baseline=most_frequent", "tuning.k=5")
    frequent = TicketSet.load(tmp_path / "mf" / "tickets_used.json")
    assert frequent.k == 5 and sp.eos_id() in frequent.token_ids  # every target ends with EOS


def test_tied_model_input_only_keeps_the_output_projection(tmp_path: Path, fairseq2_ready: None) -> None:
    from fairseq2_kslottery.toy import create_tiny_llama, save_fairseq2_checkpoint

    model, config = create_tiny_llama(vocab_size=400, seed=5, tied_embeddings=True)
    save_fairseq2_checkpoint(model, config, tmp_path / "base")
    base_path = f"model.path={tmp_path / 'base' / 'checkpoints' / 'step_1' / 'model'}"
    tied = "model.config_overrides={vocab_size: 400, tied_embeddings: true}"
    common = ("regime.num_steps=3", "lr_scheduler.config.cycle_len=3", "validation.generate=false")
    _tune(tmp_path / "embed", base_path, tied, *common)
    state = _model_state(tmp_path / "embed", 3)
    original = model.decoder_frontend.embed.weight.detach()
    assert torch.equal(state["final_proj.weight"], original)
    assert not torch.equal(state[EMBED_KEY], original)

    _tune(
        tmp_path / "tickets",
        base_path,
        tied,
        *common,
        "tuning.mode=tickets",
        "tuning.baseline=explicit",
        "tuning.token_ids=[5,6,7]",
        "tuning.tied=tied",
    )
    info = json.loads((tmp_path / "tickets" / "run_info.json").read_text())
    assert info["model_tied_embeddings"] and info["tied"] == "tied" and info["trainable_parameters"] == 3 * 64


def test_killed_ticket_run_resumes_to_the_same_delta(embed_run: Path, tickets_file: Path, tmp_path: Path) -> None:
    args = (
        f"model.path={embed_run / 'initial_model.pt'}",
        "tuning.mode=tickets",
        f"tuning.tickets={tickets_file}",
        "regime.num_steps=60",
        "lr_scheduler.config.cycle_len=60",
        "regime.checkpoint_every_n_steps=5",
        "regime.validate_every_n_steps=null",
        "validation.generate=false",
        "validation.nll=false",
    )
    _tune(tmp_path / "straight", *args)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_tune_cmd(killed, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step_10").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "step_60").exists()
    resumed = _tune(killed, *args)
    assert "Training restored. Resuming from step" in resumed.stderr
    a, b = _model_state(tmp_path / "straight", 60), _model_state(killed, 60)
    assert torch.equal(a["decoder_frontend.embed.delta"], b["decoder_frontend.embed.delta"])


def test_evaluate_recipe_with_a_patch_scores_like_sacrebleu(embed_run: Path, ticket_run: Path, tmp_path: Path) -> None:
    import sacrebleu

    export = _cli("export", str(ticket_run), "--out", str(tmp_path / "export"), "--no-fairseq2", "--no-hf")
    assert export.returncode == 0, export.stderr
    patch = tmp_path / "export" / "ticket_patch.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fairseq2_kslottery.recipes.evaluate",
            str(tmp_path / "eval"),
            "--no-rich",
            "--config-file",
            str(SMOKE_EVAL),
            "--config",
            f"model.path={embed_run / 'initial_model.pt'}",
            f"patch={patch}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Applied the ticket patch" in proc.stderr
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "eval" / "hypotheses" / "test_step_0.jsonl").open()]
    assert len(records) == scores["num_sentences"] == 8
    hyps, refs = [r["hyp"] for r in records], [r["ref"] for r in records]
    assert scores["bleu"] == sacrebleu.corpus_bleu(hyps, [refs]).score
    assert scores["chrf"] == sacrebleu.corpus_chrf(hyps, [refs]).score
    assert scores["eos_rate"] == sum(r["eos"] for r in records) / 8
    unit = [json.loads(line) for line in (tmp_path / "eval" / "metrics" / "eval" / "translation.jsonl").open()]
    assert unit[-1]["BLEU"] == pytest.approx(scores["bleu"], abs=1e-9)


def test_hugging_face_export_matches_the_patched_fairseq2_model(
    ticket_run: Path, tmp_path: Path, fairseq2_ready: None
) -> None:
    import transformers
    from fairseq2.nn import BatchLayout

    from fairseq2_kslottery.export import load_model_source

    assert _cli("export", str(ticket_run), "--out", str(tmp_path)).returncode == 0
    fs2, _, _ = load_model_source(str(tmp_path / "fairseq2" / "checkpoints"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.tensor([[1, 17, 42, 99, 250, 3, 8]])
    with torch.no_grad():
        ours = fs2.eval()(ids, BatchLayout.of(ids))
        theirs = hf(ids).logits
    # float32 on CPU; the two implementations order their sums differently.
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_apply_and_transfer(embed_run: Path, tickets_file: Path, ticket_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    assert _cli("export", str(ticket_run), "--out", str(tmp_path / "export")).returncode == 0
    base_ckpt = tmp_path / "base"
    from fairseq2_kslottery.toy import ensure_fairseq2  # noqa: F401

    # `apply` on the original model (saved as a checkpoints folder) gives the exported model.
    initial = torch.load(embed_run / "initial_model.pt", weights_only=True)
    (base_ckpt / "checkpoints" / "step_1" / "model" / "pp_00" / "tp_00").mkdir(parents=True)
    torch.save(initial, base_ckpt / "checkpoints" / "step_1" / "model" / "pp_00" / "tp_00" / "sdp_00.pt")
    (base_ckpt / "checkpoints" / "model.yaml").write_text((ticket_run / "checkpoints" / "model.yaml").read_text())
    applied = _cli(
        "apply",
        "--base",
        str(base_ckpt / "checkpoints"),
        "--patch",
        str(tmp_path / "export" / "ticket_patch.safetensors"),
        "--out",
        str(tmp_path / "applied"),
    )
    assert applied.returncode == 0, applied.stderr
    a = _model_state(tmp_path / "applied" / "fairseq2", 1)
    b = _model_state(tmp_path / "export" / "fairseq2", 20)
    assert all(torch.equal(a[k], b[k]) for k in b)

    # `transfer` copies the tuned rows exactly.
    out = tmp_path / "transfer.safetensors"
    proc = _cli(
        "transfer",
        "--base",
        str(embed_run / "initial_model.pt"),
        "--tuned",
        str(embed_run / "checkpoints"),
        "--tickets",
        str(tickets_file),
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    patch = load_file(str(out))
    tuned = _model_state(embed_run, 20)[EMBED_KEY]
    ids = TicketSet.load(tickets_file).token_ids
    assert patch["token_ids"].tolist() == ids
    assert torch.equal(patch["rows"], tuned[ids])


def test_config_errors_exit_2(tmp_path: Path) -> None:
    proc = _tune(tmp_path / "a", "tuning.mode=tickets", expect=2)
    assert "`tuning.mode: tickets` needs `tuning.tickets` (a ticket file) or `tuning.baseline`." in proc.stderr
    proc = _tune(tmp_path / "b", "tuning.mode=sparse", expect=2)
    assert "`tuning.mode` must be one of full, embed, tickets, but is 'sparse'." in proc.stderr
    proc = _tune(tmp_path / "c", "regime.score_metric=bleu", "validation.generate=false", expect=2)
    assert "`regime.score_metric: bleu` comes from generation" in proc.stderr
