"""LoRA adapters through the router, in both serving modes, with real processes on loopback.

Adapters are PEFT directories made for the tiny model (tests/engine/lora_helpers.py's writer);
the expected text is the engine's own (`LLM` with the same adapter on the CPU), which
tests/engine/test_lora.py checks against transformers + PEFT.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from serving_harness import baton_up, series_sum, serve_cell, serve_router, wait_until

from baton.protos import worker_pb2, worker_pb2_grpc
from baton.sampling_params import SamplingParams
from baton.worker.messages import params_to_proto

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from lora_helpers import ALL, write_adapter  # noqa: E402

API_KEY = "lora-test-key-0123"
PROMPT = [0, 17, 250, 33, 90, 12]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"sql": write_adapter(tiny_model_dir, root / "sql", 8, ["q_proj", "v_proj", "down_proj"], seed=11),
            "chat": write_adapter(tiny_model_dir, root / "chat", 16, ALL, seed=12)}


@pytest.fixture(scope="module")
def expected(tiny_model_dir, adapters) -> dict[str | None, str]:
    """Greedy text of PROMPT per adapter (None: the base model), from the engine itself."""
    from baton.engine import LLM, LoRARequest, SamplingParams

    llm = LLM(model=str(tiny_model_dir), device="cpu", dtype="float32", enable_lora=True, max_loras=2,
              num_gpu_blocks_override=64)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    names = [None, "sql", "chat"]
    loras = [LoRARequest(n, i + 1, str(adapters[n])) if n else None for i, n in enumerate(names)]
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * 3, params, lora_request=loras)
    texts = {name: out.outputs[0].text for name, out in zip(names, outs)}
    assert len(set(texts.values())) == 3  # each adapter changes the output
    return texts


def _complete(client: openai.OpenAI, model: str) -> str:
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text


def _post(dep, path: str, body: dict, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{dep.url}{path}", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize("mode", ["colocated", "disaggregated", "in-process"])
def test_adapters_through_the_openai_client(mode, adapters, expected, tiny_model_dir):
    if mode == "in-process":  # `baton serve`: the router and the engine in one process
        dep = baton_up(str(tiny_model_dir), "--enable-lora", "--lora-modules", f"sql={adapters['sql']}",
                       "--max-loras", "2", command="serve", api_key=API_KEY)
    else:
        dep = baton_up("--mode", mode, "--lora-modules", f"sql={adapters['sql']}", "--max-loras", "2",
                       api_key=API_KEY)
    try:
        client = dep.client()
        models = {m.id: m for m in client.models.list().data}
        assert set(models) == {dep.model, "sql"}
        assert models["sql"].model_extra["parent"] == dep.model
        assert _complete(client, "sql") == expected["sql"]
        assert _complete(client, dep.model) == expected[None]
        with pytest.raises(openai.NotFoundError, match="chat"):
            _complete(client, "chat")

        # Loading needs the key; a bad path is a 400 naming it, and nothing is left loaded.
        body = {"lora_name": "chat", "lora_path": str(adapters["chat"])}
        assert _post(dep, "/v1/load_lora_adapter", body, None).status_code == 401
        bad = _post(dep, "/v1/load_lora_adapter", {"lora_name": "chat", "lora_path": "/nowhere"}, API_KEY)
        assert bad.status_code == 400 and "/nowhere" in bad.json()["error"]["message"]
        assert "chat" not in {m.id for m in client.models.list().data}
        loaded = _post(dep, "/v1/load_lora_adapter", body, API_KEY)
        assert loaded.status_code == 200, loaded.text
        assert _complete(client, "chat") == expected["chat"]
        assert _post(dep, "/v1/load_lora_adapter", body, API_KEY).status_code == 400  # already loaded

        # Both adapters and the base model at once (one batch on each worker).
        with openai.OpenAI(base_url=f"{dep.url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                names = ["sql", "chat", dep.model] * 2
                texts = list(pool.map(lambda n: _complete(c, n), names))
        assert texts == [expected["sql"], expected["chat"], expected[None]] * 2

        assert _post(dep, "/v1/unload_lora_adapter", {"lora_name": "chat"}, API_KEY).status_code == 200
        with pytest.raises(openai.NotFoundError):
            _complete(client, "chat")
        missing = _post(dep, "/v1/unload_lora_adapter", {"lora_name": "chat"}, API_KEY)
        assert missing.status_code == 404
        if mode == "in-process":  # the engine's metrics are on the API's port
            assert series_sum(f"{dep.url}/metrics", "baton:lora_requests_total", 'role="colocated"') > 0
        for name in ("prefill-0", "decode-0") if mode == "disaggregated" else ("colocated-0",) * (mode == "colocated"):
            assert dep.metric("baton:lora_requests_total", name) > 0
    finally:
        dep.stop()


def test_a_decode_worker_checks_the_adapter_at_reservation(adapters):
    """A reservation naming an adapter the worker does not serve is refused, its ticket
    names the adapter (a prefill for another model must not fill it), and an adapter the
    host LRU dropped is read again at once, while the prefill would run elsewhere."""
    dep = baton_up("--mode", "disaggregated", "--lora-modules", f"sql={adapters['sql']}")
    try:
        decode = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(dep.processes["decode-0"].grpc))
        prefill = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(dep.processes["prefill-0"].grpc))
        with pytest.raises(grpc.RpcError) as err:
            decode.Reserve(worker_pb2.ReserveRequest(request_id="r1", num_prompt_tokens=6, lora_name="chat"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'chat' is not loaded on this worker (loaded: sql)" in err.value.details()
        reply = decode.Reserve(worker_pb2.ReserveRequest(request_id="r2", num_prompt_tokens=6, lora_name="sql"))
        # The ticket says "sql": a prefill for the base model must not fill it.
        with pytest.raises(grpc.RpcError) as err:
            prefill.Prefill(worker_pb2.PrefillRequest(request_id="r2", prompt_token_ids=PROMPT, ticket=reply.ticket,
                                                      params=params_to_proto(SamplingParams(max_tokens=4))))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "reservation is for LoRA adapter 'sql'" in err.value.details()
        assert decode.Abort(worker_pb2.AbortRequest(request_id="r2")).found
        stats = decode.Stats(worker_pb2.StatsRequest())
        assert stats.num_free_blocks == stats.num_blocks  # the reservation is gone
        assert list(stats.lora_adapters) == ["sql"]

        def in_host_memory() -> list[str]:
            return list(decode.Stats(worker_pb2.StatsRequest()).lora_resident)

        # One host copy (--max-cpu-loras defaults to --max-loras, 1): loading "chat" drops "sql".
        loaded = _post(dep, "/v1/load_lora_adapter", {"lora_name": "chat", "lora_path": str(adapters["chat"])}, None)
        assert loaded.status_code == 200, loaded.text
        assert in_host_memory() == ["chat"]
        disk_loads = dep.metric("baton:lora_disk_loads_total", "decode-0")
        decode.Reserve(worker_pb2.ReserveRequest(request_id="r3", num_prompt_tokens=6, lora_name="sql"))
        wait_until(lambda: in_host_memory() == ["sql"], timeout=30, what="'sql' read at the reservation")
        assert dep.metric("baton:lora_disk_loads_total", "decode-0") == disk_loads + 1
        assert decode.Abort(worker_pb2.AbortRequest(request_id="r3")).found
    finally:
        dep.stop()


def test_a_cells_prefill_and_decode_engines_both_apply_the_adapter(tiny_model_dir, adapters, expected):
    """`baton serve-cell` passes the LoRA flags to every engine: the prefill engine computes
    the prompt and first token with the adapter, the ticket names it, and the decode engine
    of the same cell continues with it after an `ipc` handoff. The text equals the engine's
    own with the adapter (wrong on either side, the tokens would differ)."""
    cell = serve_cell("lora-cell", "--enable-lora", "--lora-modules", f"sql={adapters['sql']}", "--max-loras", "2")
    try:
        router = serve_router(tiny_model_dir, "--prefill", ",".join(cell.addresses("prefill")),
                              "--decode", ",".join(cell.addresses("decode")))
        try:
            client = router.client()
            assert {m.id for m in client.models.list().data} == {"tiny-llama-v1", "sql"}
            assert _complete(client, "sql") == expected["sql"]
            assert _complete(client, "tiny-llama-v1") == expected[None]
            assert router.counter("baton:router_kv_handoffs_total", 'pairing="same_cell"') == 2
        finally:
            router.stop()
        for engine in ("prefill-0", "decode-0"):
            assert cell.metric(engine, "baton:lora_requests_total", 'lora_name="sql"') == 1, engine
            assert cell.metric(engine, "baton:kv_transfer_seconds_count", 'transport="ipc"') == 2, engine
    finally:
        cell.stop()
