"""The selection stage as a fairseq2 recipe (python -m fairseq2_kslottery.recipes.select)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import TinyPaths
from fairseq2_kslottery.cli import main
from fairseq2_kslottery.tickets import TicketSet


def _recipe(out_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fairseq2_kslottery.recipes.select", str(out_dir), "--no-rich", *args],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=600,
    )


def test_recipe_writes_the_same_tickets_as_the_command(tiny: TinyPaths, tmp_path: Path) -> None:
    config = tmp_path / "select.yaml"
    config.write_text(
        f"base: {tiny.base_run}/checkpoints\n"
        f"tuned: {tiny.hf_tuned}\n"
        "rule:\n  alpha: 0.05\n  correction: bh\n"
        "common:\n  no_sweep_dir: true\n"
    )
    proc = _recipe(tmp_path / "run", "--config-file", str(config), "--config", "rule.max_k=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "ks_stats.safetensors").is_file()
    from_recipe = TicketSet.load(tmp_path / "run" / "tickets.json")

    assert (
        main(
            [
                "select",
                "--base",
                f"{tiny.base_run}/checkpoints",
                "--tuned",
                str(tiny.hf_tuned),
                "--alpha",
                "0.05",
                "--correction",
                "bh",
                "--max-k",
                "4",
                "--out",
                str(tmp_path / "cli.json"),
                "--quiet",
            ]
        )
        == 0
    )
    from_cli = TicketSet.load(tmp_path / "cli.json")
    assert from_recipe.token_ids == from_cli.token_ids and len(from_cli.token_ids) == 4
    assert from_recipe.certificate == from_cli.certificate


def test_recipe_reports_config_and_input_errors_with_exit_code_2(tiny: TinyPaths, tmp_path: Path) -> None:
    bad_rule = _recipe(
        tmp_path / "a",
        "--config",
        f"base={tiny.base_run}",
        f"tuned={tiny.tuned_run}",
        "rule.top_k=3",
        "rule.alpha=0.1",
        "common.no_sweep_dir=true",
    )
    assert bad_rule.returncode == 2
    assert "Exactly one of `rule.top_k` and `rule.alpha` must be set." in bad_rule.stderr
    missing = _recipe(
        tmp_path / "b",
        "--config",
        f"base={tmp_path / 'nope'}",
        f"tuned={tiny.tuned_run}",
        "rule.top_k=3",
        "common.no_sweep_dir=true",
    )
    assert missing.returncode == 2
    assert f"Cannot read the embedding from `{tmp_path / 'nope'}`: no such file or directory." in missing.stderr
    assert not (tmp_path / "b" / "tickets.json").exists()
