"""The multi-GPU runbook's pieces that run without GPUs: the random checkpoint is written
once and reused, and the benchmarks refuse a placement the machine cannot give."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from engine_workload import LLAMA31_8B, write_random_checkpoint  # noqa: E402

from baton.engine.tiny_model import ensure_tiny_model  # noqa: E402

SMALL = {**LLAMA31_8B, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 512}


def test_random_checkpoint_is_written_once_per_recipe(tmp_path):
    out = write_random_checkpoint(tmp_path / "ckpt", SMALL, ensure_tiny_model(), device="cpu")
    shard = out / "model-001.safetensors"
    shard.write_bytes(b"left alone")  # a rewrite would replace it
    write_random_checkpoint(out, SMALL, ensure_tiny_model(), device="cpu")
    assert shard.read_bytes() == b"left alone"  # reused: same config, device and seed
    assert json.loads((out / "config.json").read_text()) == SMALL
    write_random_checkpoint(out, SMALL, ensure_tiny_model(), device="cpu", seed=1)
    assert shard.read_bytes() != b"left alone"  # another seed: written again
    assert json.loads((out / "random_checkpoint.json").read_text())["seed"] == 1


def test_kv_cell_refuses_two_gpus_on_the_cpu():
    done = subprocess.run([sys.executable, "bench/kv_cell.py", "--device", "cpu", "--gpus", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--gpus 2 needs --device cuda" in done.stderr


def test_baton_up_gives_each_worker_of_a_two_gpu_host_its_own_gpu(monkeypatch, tmp_path):
    """The serving run's two layouts (issue 25) on two GPUs: prefill on cuda:0 and decode on
    cuda:1, the two colocated workers on cuda:0 and cuda:1. No GPU here: the count is set."""
    from baton import up

    monkeypatch.setattr(up, "_gpu_count", lambda device: 2)

    def devices(*argv: str) -> dict[str, str]:
        workers = up.plan(up.build_parser().parse_args(["--device", "cuda", *argv]), tmp_path)
        return {w.name: w.argv[w.argv.index("--device") + 1] for w in workers}

    assert devices("--prefill", "1", "--decode", "1") == {"prefill-0": "cuda:0", "decode-0": "cuda:1"}
    assert devices("--mode", "colocated", "--colocated", "2") == {"colocated-0": "cuda:0", "colocated-1": "cuda:1"}


def test_the_runbook_expands_its_groups_in_order_and_refuses_an_unknown_step():
    dry = subprocess.run(["bash", "bench/multi_gpu.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "DRY": "1", "STEPS": "28 27", "WHEELS": "/w"})
    assert dry.returncode == 0, dry.stderr
    steps = [line[1:].split(",")[0] for line in dry.stdout.splitlines() if line.startswith("[")]
    assert steps == ["wheels", "install", "checkpoint", "28-handoff", "28-tp1", "28-tp2", "27"]
    commands = [line.strip() for line in dry.stdout.splitlines() if line.startswith("  ")]
    assert "--target /tmp/site /w/*.whl" in commands[0]
    assert "--gpus 2 --prefill-tp 2" in commands[3] and "--gpus 2 --tokens 16,512,2048,8192" in commands[6]
    assert "--tensor-parallel-size 2 --baseline /tmp/multi_gpu/engine-tp1.json" in commands[5]
    bad = subprocess.run(["bash", "bench/multi_gpu.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "DRY": "1", "STEPS": "27 26"})
    assert bad.returncode == 2 and "unknown step '26'" in bad.stderr
