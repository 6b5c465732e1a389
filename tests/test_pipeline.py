"""The experiment runner and the report: the micro experiment end to end, resumption, presets, config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fairseq2_kslottery.pipeline.config import ExperimentConfigError, load_experiment

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p for p in (REPO / "recipes").glob("*.yaml") if not p.name.startswith("smoke"))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fairseq2_kslottery", *args],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=1800,
    )


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("micro")
    proc = _cli("run", str(REPO / "recipes" / "micro.yaml"), f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == str(out / "report.md")
    return out


def test_micro_experiment_fills_the_report_from_the_stage_files(micro: Path) -> None:
    report = (micro / "report.md").read_text()
    scores = {
        "base (untuned)": "eval_base",
        "reference tuning (embed)": "eval_reference",
        "KS tickets top8": "eval_tickets_top8",
        "baseline random_frequency (top8)": "eval_baseline_random_frequency_top8",
        "baseline newline (top8)": "eval_baseline_newline_top8",
        "partial transfer top8": "eval_transfer_top8",
    }
    for system, folder in scores.items():
        s = json.loads((micro / "en-de" / folder / "scores.json").read_text())
        cells = f"| {s['bleu']:.2f} | {s['chrf']:.2f} | {s['first_line_bleu']:.2f} | {s['eos_rate']:.3f} |"
        row = next(line for line in report.splitlines() if line.startswith(f"| {system} |"))
        assert cells in row, (system, row)
    tickets = json.loads((micro / "en-de" / "select_top8" / "tickets.json").read_text())
    assert len(tickets["token_ids"]) == 8
    for tid in tickets["token_ids"]:
        assert f"| {tid} |" in report
    info = json.loads((micro / "en-de" / "tickets_top8" / "run_info.json").read_text())
    assert info["trainable_parameters"] == 8 * 576
    assert "KS certificate at alpha=0.05" in report and "Sample translations" in report
    for plot in ("ks_en-de_top8.png", "bleu_vs_k_en-de.png", "loss_en-de.png"):
        path = micro / "plots" / plot
        assert path.is_file() and path.stat().st_size > 5000, plot
        assert f"(plots/{plot})" in report
    log = (micro / "run.log").read_text()
    assert "en-de/reference 4/4 steps" in log and "done in" in log


def test_rerun_skips_finished_stages_and_rebuilds_the_report(micro: Path) -> None:
    before = {p: p.stat().st_mtime for p in micro.glob("en-de/*/stage.json")}
    proc = _cli("run", str(REPO / "recipes" / "micro.yaml"), f"output_dir={micro}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("done earlier, skipped") == len(before) == 11
    assert {p: p.stat().st_mtime for p in micro.glob("en-de/*/stage.json")} == before
    (micro / "report.md").unlink()
    assert _cli("report", str(micro)).returncode == 0 and (micro / "report.md").is_file()


def test_a_failing_stage_stops_the_run_and_names_itself(tmp_path: Path) -> None:
    proc = _cli(
        "run",
        str(REPO / "recipes" / "micro.yaml"),
        f"output_dir={tmp_path}",
        "evaluate_base=false",
        f"directions=[{{name: xx, source: {tmp_path / 'missing'}, src_lang: en, tgt_lang: de}}]",
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Stage `xx/reference` failed:") and "does not exist" in last
    assert "re-run to continue" in last and "stage.log" in last
    assert not (tmp_path / "xx" / "reference" / "stage.json").exists()


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_and_validates(preset: Path) -> None:
    config = load_experiment(preset)
    assert config.directions and config.selection.rules


def test_experiment_file_errors_name_the_key(tmp_path: Path) -> None:
    micro = REPO / "recipes" / "micro.yaml"
    with pytest.raises(ExperimentConfigError, match=r"Key 'stepz' not in 'TrainingConfig'"):
        load_experiment(micro, ["reference.stepz=3"])
    with pytest.raises(ExperimentConfigError, match=r"Value 'abc' of type 'str' could not be converted to Integer"):
        load_experiment(micro, ["reference.steps=abc"])
    with pytest.raises(ExperimentConfigError, match=r"Interpolation key 'nowhere' not found"):
        load_experiment(micro, ["output_dir=${nowhere}"])
    with pytest.raises(ExperimentConfigError, match=r"`reference_mode` must be one of embed, full, but is 'sparse'"):
        load_experiment(micro, ["reference_mode=sparse"])
    proc = _cli("run", str(micro), "reference.stepz=3")
    assert proc.returncode == 2 and proc.stderr.startswith("error: `") and proc.stderr.count("\n") == 1
    with pytest.raises(ExperimentConfigError, match=r"does not exist"):
        load_experiment(tmp_path / "nope.yaml")


def test_two_directions_with_overlap_and_union(tmp_path: Path, fairseq2_ready: None) -> None:
    """The runner on the smoke model: tickets per direction, their overlap, and the union trained on mixed data."""
    from fairseq2_kslottery.toy import create_tiny_llama, save_fairseq2_checkpoint

    model, config = create_tiny_llama(vocab_size=400, seed=3)
    save_fairseq2_checkpoint(model, config, tmp_path / "base")
    fr = tmp_path / "en-fr"
    fr.mkdir()
    for split, n in (("train", 24), ("test", 4)):
        rows = [{"src": f"The house {i} is small.", "tgt": f"La maison {i} est petite."} for i in range(n)]
        (fr / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(f"""
name: two
output_dir: {tmp_path / "run"}
model:
  name: null
  path: {tmp_path / "base" / "checkpoints" / "step_1" / "model"}
  family: llama
  arch: kslottery_tiny
  config_overrides: {{vocab_size: 400}}
  tokenizer: kslottery_smoke_tokenizer
  prepare: null
directions:
  - {{name: en-de, source: "builtin:smoke_en_de", src_lang: en, tgt_lang: de}}
  - {{name: en-fr, source: "{fr}", src_lang: en, tgt_lang: fr}}
data: {{max_seq_len: 64, max_examples: {{test: 4}}}}
reference: {{steps: 3, lr: 0.01, batch_size: 8}}
tickets: {{steps: 2, lr: 0.01, batch_size: 8}}
selection: {{rules: [{{top_k: 6}}]}}
baselines: []
transfer: false
evaluate_base: false
union: true
evaluation: {{max_gen_len: 8, batch_size: 4}}
""")
    proc = _cli("run", str(experiment))
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "run"
    de = json.loads((run / "en-de" / "select_top6" / "tickets.json").read_text())["token_ids"]
    fr_ids = json.loads((run / "en-fr" / "select_top6" / "tickets.json").read_text())["token_ids"]
    union = json.loads((run / "union" / "tickets_top6.json").read_text())["token_ids"]
    assert set(union) == set(de) | set(fr_ids) and union[: len(de)] == de
    used = json.loads((run / "union" / "tickets_top6" / "tickets_used.json").read_text())["token_ids"]
    assert used == union
    # The union run trained on both directions' data.
    log = (run / "union" / "tickets_top6" / "stage.log").read_text()
    assert "builtin:smoke_en_de (train, en->de)" in log and "(train, en->fr)" in log
    report = (run / "report.md").read_text()
    shared = len(set(de) & set(fr_ids))
    jaccard = shared / len(set(de) | set(fr_ids))
    assert f"| en-de | en-fr | {shared} | {jaccard:.3f} |" in report
    for d in ("en-de", "en-fr"):
        assert (run / "union" / f"eval_{d}" / "scores.json").is_file()
        assert f"| {d} |" in report.split("## Union tickets")[1]
