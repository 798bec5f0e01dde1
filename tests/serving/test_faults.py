"""Failures on a real disaggregated deployment (two prefill workers, one decode worker):
saturation, client disconnects, a prefill worker killed, the decode worker killed mid-stream
(and started again by `baton up`).

The tests run in file order; the last one kills the decode worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import httpx
import openai
import pytest
from serving_harness import baton_up, kv_usage, wait_until

from baton.protos import worker_pb2, worker_pb2_grpc
from baton.router.routing import prefix_key, rendezvous_score
from baton.tokenizer import Tokenizer

M = "tiny-llama-v1"
LONG = {"ignore_eos": True}


@pytest.fixture(scope="module")
def dep(_tiny_model_cache):
    d = baton_up("--prefill", "2", "--decode", "1", "--max-queue", "1")
    yield d
    d.stop()


def all_kv_free(dep) -> bool:
    return all(kv_usage(dep, w.name) == 0.0 for w in dep.workers() if w.alive())


def test_saturated_decode_answers_429_with_retry_after(dep):
    """Another client of the decode worker holds almost all of its KV: the next request waits
    in the router's queue (at most 1 here), the one after is refused; once the KV is given
    back, the waiting one is served."""
    channel = grpc.insecure_channel(dep.processes["decode-0"].grpc)
    stub = worker_pb2_grpc.WorkerStub(channel)
    stub.Reserve(worker_pb2.ReserveRequest(request_id="hog", num_prompt_tokens=1000, ttl_seconds=30))
    body = {"model": M, "prompt": "Saturate " * 20, "max_tokens": 5}

    async def scenario():
        async with httpx.AsyncClient(base_url=dep.url, timeout=60) as client:
            waiting = asyncio.ensure_future(client.post("/v1/completions", json=body))
            await asyncio.sleep(0.5)
            refused = await client.post("/v1/completions", json=body)
            assert not waiting.done()
            stub.Abort(worker_pb2.AbortRequest(request_id="hog"))  # the KV comes back
            return await waiting, refused

    served, refused = asyncio.run(scenario())
    channel.close()
    assert refused.status_code == 429, refused.text
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert served.status_code == 200, served.text
    wait_until(lambda: all_kv_free(dep), what="KV freed")


def test_client_leaving_while_queued_is_forgotten(dep):
    """A request waiting in the router for decode KV, whose client gives up, leaves no trace."""
    channel = grpc.insecure_channel(dep.processes["decode-0"].grpc)
    stub = worker_pb2_grpc.WorkerStub(channel)
    stub.Reserve(worker_pb2.ReserveRequest(request_id="hog2", num_prompt_tokens=1000, ttl_seconds=30))
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{dep.url}/v1/completions", timeout=0.7,
                   json={"model": M, "prompt": "Queue me " * 20, "max_tokens": 5})
    wait_until(lambda: dep.metric("baton:num_requests_waiting", "router") == 0.0, what="router queue empty")
    stub.Abort(worker_pb2.AbortRequest(request_id="hog2"))
    channel.close()
    wait_until(lambda: all_kv_free(dep), what="KV freed")
    assert not any("unexpected error" in line for line in dep.output)


def test_client_disconnect_frees_kv_on_every_worker(dep):
    client = dep.client()
    stream = client.completions.create(model=M, prompt="Disconnect me " * 10, max_tokens=800, stream=True,
                                       temperature=0, extra_body=LONG)
    for i, _ in enumerate(stream):
        if i == 5:
            break
    assert kv_usage(dep, "decode-0") > 0.0  # the request really holds KV now
    stream.close()
    wait_until(lambda: all_kv_free(dep), what="KV usage 0 on every worker after a streaming disconnect")
    # A non-streaming request whose client gives up.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{dep.url}/v1/completions", timeout=0.5,
                   json={"model": M, "prompt": "Wait for me " * 10, "max_tokens": 800, **LONG})
    wait_until(lambda: all_kv_free(dep), what="KV usage 0 after a non-streaming disconnect")
    assert dep.proc.poll() is None


def _prompts_preferring(dep, worker: str, count: int) -> list[str]:
    """Prompts whose prefix hashes to `worker` (the router's affinity rule)."""
    tokenizer = Tokenizer(dep_model_dir())
    target = dep.processes[worker].grpc
    others = [p.grpc for n, p in dep.processes.items() if n.startswith("prefill") and n != worker]
    found, i = [], 0
    while len(found) < count:
        text = f"Request number {i} about something else entirely, with enough words to fill blocks."
        key = prefix_key(tokenizer.encode(text), 16)
        if key is not None and all(rendezvous_score(key, target) > rendezvous_score(key, o) for o in others):
            found.append(text)
        i += 1
    return found


def dep_model_dir():
    from baton.engine.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


def test_killed_prefill_worker_is_retried_elsewhere(dep):
    """Requests whose prefix prefers a killed prefill worker are served by the other one. A
    request that reaches the router before its next poll (every 0.5 s) sees the dead worker
    and is retried; once a poll has seen it, the worker is out and nothing needs a retry.
    Which happens first depends on the machine's load: either way the router must say so."""
    prompts = _prompts_preferring(dep, "prefill-0", 3)
    client = dep.client()
    os.kill(dep.processes["prefill-0"].pid, signal.SIGKILL)
    wait_until(lambda: not dep.processes["prefill-0"].alive(), what="prefill-0 gone")
    outputs = [client.completions.create(model=M, prompt=p, max_tokens=8, temperature=0, extra_body=LONG)
               for p in prompts]
    assert all(o.usage.completion_tokens == 8 for o in outputs)
    address = dep.processes["prefill-0"].grpc
    retried = any("retrying" in line and "prefill" in line for line in dep.output)
    polled_out = any(f"prefill worker {address} failed" in line for line in dep.output)
    assert retried or polled_out, "the router neither retried a prefill nor took prefill-0 out"
    wait_until(lambda: all_kv_free(dep), what="KV freed")


def test_killed_decode_worker_fails_the_stream_promptly(dep):
    client = dep.client(timeout=30)
    stream = client.completions.create(model=M, prompt="Kill the decoder", max_tokens=900, stream=True,
                                       temperature=0, extra_body=LONG)
    received = 0
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            received += 1
            if received == 5:
                os.kill(dep.processes["decode-0"].pid, signal.SIGKILL)
                killed_at = time.monotonic()
    assert time.monotonic() - killed_at < 5.0
    assert "decode" in str(info.value)
    # Nothing is left on the prefill worker, and new requests fail fast with 503 once the
    # router has noticed.
    wait_until(lambda: kv_usage(dep, "prefill-1") == 0.0, what="prefill KV freed")
    status = wait_until(lambda: httpx.post(f"{dep.url}/v1/completions", timeout=10,
                                           json={"model": M, "prompt": "hi"}).status_code == 503,
                        what="503 without a decode worker")
    assert status
    # `baton up` supervises: the decode worker starts again on its port and serves again.
    wait_until(lambda: any("decode-0" in line and "restarted" in line for line in dep.output), timeout=60,
               what="decode-0 started again")
    wait_until(lambda: httpx.post(f"{dep.url}/v1/completions", timeout=30,
                                  json={"model": M, "prompt": "hi", "max_tokens": 2}).status_code == 200,
               timeout=120, interval=0.5, what="served again after the restart")
    assert any("decode-0 exited with status -9" in line for line in dep.output)
