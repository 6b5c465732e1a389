"""The demo stand-in finds the rows it shifted."""

from __future__ import annotations

from pathlib import Path

import pytest

from fairseq2_kslottery.demo import SHIFTED_ROWS, run_standin_demo
from fairseq2_kslottery.tickets import TicketSet


def test_standin_demo_selects_the_shifted_rows(
    fairseq2_ready: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    messages: list[str] = []
    run_standin_demo(tmp_path, log=messages.append)
    assert "STAND-IN" in messages[0]
    for name in ("tickets_top8.json", "tickets_bh05.json"):
        assert sorted(TicketSet.load(tmp_path / name).token_ids) == sorted(SHIFTED_ROWS)
    assert "CERTIFIED" in capsys.readouterr().out
