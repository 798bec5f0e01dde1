"""bench/guided.py keeps running (figures live in bench/results, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The GPU run's path (random Llama-shaped checkpoint, synthetic wide vocabulary), shrunk.
SMALL_LLAMA = ["--llama-8b", "--hidden", "64", "--intermediate", "128", "--layers", "1", "--heads", "4",
               "--kv-heads", "2", "--vocab", "4096"]


@pytest.mark.parametrize("model", [[], SMALL_LLAMA], ids=["tiny", "llama-shaped"])
def test_the_benchmark_runs_and_reports_both_modes(tmp_path, model):
    out = tmp_path / "guided.json"
    cmd = [sys.executable, "bench/guided.py", *model, "--batch", "1", "3", "--max-tokens", "6", "--repeats", "1",
           "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=120)
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["results"]] == [1, 3]
    for row in report["results"]:
        assert row["free_tpot_ms"] > 0 and row["json_tpot_ms"] > 0
        assert row["steps_measured"]["json"] == row["steps_measured"]["free"] == 5
    assert report["machine"]["xgrammar"] and report["schema_compile_ms"] > 0
    assert report["model"]["tokenizer_vocab"] == report["model"]["vocab"]
