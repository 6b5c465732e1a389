"""Reliability and scale-out: torchrun (DDP, FSDP) on CPU, distributed selection, killed runs, determinism, and the
bad-input classes not covered next to their features."""

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
TICKET_IDS = "[5,17,33,60,123,250,301,377]"


def _run(cmd: list[str], expect: int = 0, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, timeout=timeout)
    assert proc.returncode == expect, (proc.returncode, proc.stderr[-4000:])
    return proc


def _torchrun(nproc: int, module: str, *args: str) -> list[str]:
    # --standalone: a local rendezvous on a free port (tests may run next to other jobs).
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        module,
        *args,
    ]


def _tune_args(out: Path, base: Path, *extra: str) -> list[str]:
    return [
        str(out),
        "--no-rich",
        "--config-file",
        str(SMOKE),
        "--config",
        f"model.path={base}",
        "tuning.mode=tickets",
        "tuning.baseline=explicit",
        f"tuning.token_ids={TICKET_IDS}",
        "regime.num_steps=12",
        "lr_scheduler.config.cycle_len=12",
        "regime.checkpoint_every_n_steps=6",
        "regime.validate_every_n_steps=null",
        "regime.publish_metrics_every_n_steps=3",
        "validation.generate=false",
        "validation.nll=false",
        *extra,
    ]


def _delta(run: Path, step: int = 12) -> torch.Tensor:
    from fairseq2_kslottery.export import read_ticket_run

    return read_ticket_run(run, step)[1]


@pytest.fixture(scope="module")
def one_process_run(smoke_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one")
    _run(
        [sys.executable, "-m", "fairseq2_kslottery.recipes.tune", *_tune_args(out, smoke_base, "batching.batch_size=8")]
    )
    return out


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(
    parallelism: str, smoke_base: Path, one_process_run: Path, tmp_path: Path
) -> None:
    # 2 ranks x 4 examples = the same global batch of 8; gradients are summed over ranks and normalised by the total
    # number of target tokens, so only the order of float additions differs. Tolerance: 1e-6 absolute.
    out = tmp_path / parallelism
    _run(
        _torchrun(
            2,
            "fairseq2_kslottery.recipes.tune",
            *_tune_args(out, smoke_base, "batching.batch_size=4", f"trainer.data_parallelism={parallelism}"),
        )
    )
    torch.testing.assert_close(_delta(out), _delta(one_process_run), rtol=0, atol=1e-6)
    assert sorted((out / "logs").glob("rank_*.log")) == [out / "logs" / "rank_0.log", out / "logs" / "rank_1.log"]
    # Shared outputs are written once, by rank 0 (no per-rank copies); every rank wrote the same ticket set.
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one_process_run.iterdir())
    assert TicketSet.load(out / "tickets_used.json").token_ids == json.loads(TICKET_IDS)
    shards = sorted((out / "checkpoints" / "step_12" / "model" / "pp_00" / "tp_00").glob("sdp_*.pt"))
    assert len(shards) == (2 if parallelism == "fsdp" else 1)  # FSDP shards the delta's rows like any parameter


def test_selection_split_across_ranks_is_identical(tmp_path: Path, one_process_run: Path, smoke_base: Path) -> None:
    # A tuned embedding to select from: the merged rows of the ticket run.
    from fairseq2_kslottery.export import export_ticket_run

    export_ticket_run(one_process_run, tmp_path / "export", hugging_face=False)
    tuned = tmp_path / "export" / "fairseq2" / "checkpoints"
    config = [
        "--no-rich",
        "--config",
        f"base={smoke_base}",
        f"tuned={tuned}",
        "rule.top_k=6",
        "common.no_sweep_dir=true",
    ]
    _run([sys.executable, "-m", "fairseq2_kslottery.recipes.select", str(tmp_path / "one"), *config])
    _run(_torchrun(2, "fairseq2_kslottery.recipes.select", str(tmp_path / "two"), *config))
    for name in ("tickets.json", "ks_stats.safetensors"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert TicketSet.load(tmp_path / "one" / "tickets.json").k == 6


def test_training_with_a_fixed_seed_is_reproducible(smoke_base: Path, one_process_run: Path, tmp_path: Path) -> None:
    _run(
        [
            sys.executable,
            "-m",
            "fairseq2_kslottery.recipes.tune",
            *_tune_args(tmp_path, smoke_base, "batching.batch_size=8"),
        ]
    )
    assert torch.equal(_delta(tmp_path), _delta(one_process_run))


def test_selection_is_bitwise_identical_across_runs_and_thread_counts(
    tmp_path: Path, smoke_base: Path, one_process_run: Path
) -> None:
    from fairseq2_kslottery.export import export_ticket_run
    from fairseq2_kslottery.selection import SelectionRequest, run_selection

    export_ticket_run(one_process_run, tmp_path / "export", hugging_face=False)
    tuned = str(tmp_path / "export" / "fairseq2" / "checkpoints")
    previous = torch.get_num_threads()
    files = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            out = tmp_path / f"t{len(files)}.json"
            run_selection(SelectionRequest(base=str(smoke_base), tuned=tuned, out=out, alpha=0.5, correction="bh"))
            files.append(out.read_bytes())
    finally:
        torch.set_num_threads(previous)
    assert files[0] == files[1] == files[2]


def _experiment(tmp_path: Path, base: Path) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(f"""
name: killed
output_dir: {tmp_path / "run"}
model: {{name: null, path: {base}, family: llama, arch: kslottery_tiny, config_overrides: {{vocab_size: 400}},
        tokenizer: kslottery_smoke_tokenizer, prepare: null}}
directions: [{{name: en-de, source: "builtin:smoke_en_de", src_lang: en, tgt_lang: de}}]
data: {{max_seq_len: 64, max_examples: {{test: 4}}}}
reference: {{steps: 200, lr: 0.01, batch_size: 8, checkpoint_every_n_steps: 10}}
tickets: {{steps: 2, lr: 0.01, batch_size: 8}}
selection: {{rules: [{{top_k: 4}}]}}
baselines: []
transfer: false
evaluation: {{max_gen_len: 8, batch_size: 4}}
""")
    return path


def test_killed_experiment_resumes_without_redoing_finished_stages(tmp_path: Path, smoke_base: Path) -> None:
    experiment = _experiment(tmp_path, smoke_base)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fairseq2_kslottery", "run", str(experiment)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (run / "en-de" / "reference" / "checkpoints" / "step_20").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its stage subprocess, mid-training
    proc.wait()
    finished = run / "en-de" / "eval_base" / "stage.json"
    assert finished.is_file() and not (run / "en-de" / "reference" / "stage.json").exists()
    mtime = finished.stat().st_mtime
    done = _run(cmd)
    assert "en-de/eval_base done earlier, skipped" in done.stderr
    assert finished.stat().st_mtime == mtime
    assert "Training restored. Resuming from step" in (run / "en-de" / "reference" / "stage.log").read_text()
    assert (run / "report.md").is_file() and json.loads((run / "en-de" / "reference" / "stage.json").read_text())[
        "status"
    ] == "done"


def test_ticket_file_for_another_tokenizer_is_refused(tmp_path: Path, smoke_base: Path, sp_model: Path) -> None:
    tickets = TicketSet(
        token_ids=[5, 6],
        rule={"kind": "explicit"},
        vocab_size=400,
        embed_dim=64,
        tokenizer_fingerprint="blake2b-128:" + "0" * 32,
    )
    tickets.save(tmp_path / "t.json")
    proc = _run(
        [
            sys.executable,
            "-m",
            "fairseq2_kslottery.recipes.tune",
            str(tmp_path / "run"),
            "--no-rich",
            "--config-file",
            str(SMOKE),
            "--config",
            f"model.path={smoke_base}",
            "tuning.mode=tickets",
            f"tuning.tickets={tmp_path / 't.json'}",
        ],
        expect=2,
    )
    assert "was made with another tokenizer (fingerprint blake2b-128:000" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_empty_parallel_data_is_a_one_line_error(tmp_path: Path, smoke_base: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("")
    proc = _run(
        [
            sys.executable,
            "-m",
            "fairseq2_kslottery.recipes.tune",
            str(tmp_path / "run"),
            "--no-rich",
            "--config-file",
            str(SMOKE),
            "--config",
            f"model.path={smoke_base}",
            f"dataset.config_overrides.sources=[{{path: {data}, src_lang: en, tgt_lang: de}}]",
        ],
        expect=2,
    )
    assert f"`{data / 'train.jsonl'}` holds no usable sentence pair." in proc.stderr


def test_unwritable_output_is_refused_before_any_work(tmp_path: Path, smoke_base: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = _run(
        [
            sys.executable,
            "-m",
            "fairseq2_kslottery",
            "select",
            "--base",
            str(smoke_base),
            "--tuned",
            str(smoke_base),
            "--top-k",
            "3",
            "--out",
            str(blocker / "tickets.json"),
        ],
        expect=2,
    )
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: The output folder `{blocker}` cannot be created")


def test_report_write_failure_keeps_the_previous_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fairseq2_kslottery.report import build_report

    (tmp_path / "experiment.yaml").write_text("name: x\ndirections: []\n")
    first = build_report(tmp_path).read_text()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    (tmp_path / "experiment.yaml").write_text("name: y\ndirections: []\n")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        build_report(tmp_path)
    assert (tmp_path / "report.md").read_text() == first
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
