"""The fairseq2 extension entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points

PROBE = """
import logging
logging.basicConfig(level=logging.INFO)
from fairseq2 import init_fairseq2
init_fairseq2(no_progress=True)
from fairseq2.assets import get_asset_store
from fairseq2.models.llama import get_llama_model_hub
card = get_asset_store().retrieve_card("kslottery_tiny_llama")
print("source", card.metadata["__source__"])
print("arch", get_llama_model_hub().get_arch_config("kslottery_tiny").model_dim)
"""


def test_entry_point_is_declared() -> None:
    eps = [ep for ep in entry_points(group="fairseq2.extension") if ep.name == "kslottery"]
    assert [ep.value for ep in eps] == ["fairseq2_kslottery.extension:setup_fairseq2_extension"]


def test_init_fairseq2_runs_the_extension_with_tracing() -> None:
    env = {**os.environ, "FAIRSEQ2_EXTENSION_TRACE": "1"}
    env.pop("FAIRSEQ2_USER_ASSET_DIR", None)
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # fairseq2 logs this only when the extension function ran without raising (tracing makes failures raise).
    assert "fairseq2_kslottery.extension:setup_fairseq2_extension extension registered successfully." in proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert lines["source"].startswith("path:") and lines["source"].rstrip("/").endswith("assets")
    assert lines["arch"] == "64"
