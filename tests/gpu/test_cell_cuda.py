"""A cell on one GPU through the real path: `baton serve-cell --device cuda` with a prefill
and a decode engine sharing the GPU, a router in front. A 2,048-token prompt's KV goes from
one engine process to the other by CUDA IPC (the engines' transport metrics say `ipc`), and
the greedy text equals the decode engine's own prefill of the same prompt."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from serving_harness import serve_cell, serve_router  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ENGINES = ("--device", "cuda", "--num-gpu-blocks-override", "512", "--gpu-memory-utilization", "0.3",
           "--warmup", "off")
PAIRINGS = "baton:router_kv_handoffs_total"


@pytest.fixture
def tiny_model(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BATON_CACHE_DIR", str(tmp_path))  # the cell's engines inherit it
    from baton.engine.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


def test_a_cell_on_one_gpu_hands_a_2048_token_prompt_over_by_cuda_ipc(tiny_model):
    cell = serve_cell("gpu-cell", engine_flags=ENGINES, timeout=600)
    routers = []
    try:
        pair = serve_router(tiny_model, "--prefill", cell.addresses("prefill")[0],
                            "--decode", cell.addresses("decode")[0])
        # The same decode engine prefilling every prompt itself: the reference text.
        local = serve_router(tiny_model, "--prefill", cell.addresses("prefill")[0],
                             "--decode", cell.addresses("decode")[0], "--local-prefill-tokens", "100000")
        routers += [pair, local]
        prompt = [3 + (i * 7) % 500 for i in range(2048)]
        request = {"model": "tiny-llama-v1", "prompt": prompt, "max_tokens": 16, "temperature": 0,
                   "extra_body": {"ignore_eos": True}}
        handed = pair.client(timeout=300).completions.create(**request)
        whole = local.client(timeout=300).completions.create(**request)
        assert handed.usage.completion_tokens == 16
        assert handed.choices[0].text == whole.choices[0].text
        assert pair.counter(PAIRINGS, 'pairing="same_cell"') == 1
        for engine in ("prefill-0", "decode-0"):
            assert cell.metric(engine, "baton:kv_transfer_seconds_count", 'transport="ipc"') == 1
        moved = cell.metric("decode-0", "baton:kv_transfer_handoff_bytes_sum", 'transport="ipc"')
        seconds = cell.metric("decode-0", "baton:kv_transfer_seconds_sum", 'transport="ipc"')
        assert moved > 0
        print(f"cell handoff on {torch.cuda.get_device_name()}: {moved / 2**20:.1f} MiB in {seconds * 1e3:.2f} ms "
              "(decode side)")
    finally:
        for router in routers:
            router.stop()
        assert cell.stop() == 0
