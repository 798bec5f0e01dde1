"""A burst larger than the fleet: every stream completes or is refused with a 429 before it
starts; no 5xx, nothing hangs, and every worker's KV and the router's queue return to 0.

The deployments' KV pools hold 64 blocks, so a few dozen chats fit at once; the rest of
the burst must be refused at once. The 2,000-stream version is bench/serving_burst.py.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from serving_harness import wait_until

M = "tiny-llama-v1"
STREAMS = 120


async def _stream(client: httpx.AsyncClient, i: int) -> tuple[str, str]:
    body = {"model": M, "stream": True, "max_tokens": 8,
            "messages": [{"role": "user", "content": f"Tell me a story, number {i}."}]}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode()
            if response.status_code == 429 and response.headers.get("Retry-After"):
                return "refused", text
            return f"status {response.status_code}", text
        finished = False
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                return ("completed", "") if finished else ("no finish reason", "")
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    return "error event", line
                finished = finished or any(c.get("finish_reason") for c in event.get("choices", []))
        return "no [DONE]", ""


async def _burst(url: str, api_key: str | None) -> list[tuple[str, str]]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=120) as client:
        return await asyncio.gather(*(_stream(client, i) for i in range(STREAMS)))


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_a_burst_is_served_or_refused_and_leaves_nothing(request, mode):
    dep = request.getfixturevalue(mode)
    outcomes = asyncio.run(_burst(dep.url, dep.api_key))
    counts = {kind: sum(1 for k, _ in outcomes if k == kind) for kind, _ in outcomes}
    bad = [o for o in outcomes if o[0] not in ("completed", "refused")]
    assert not bad, (counts, bad[:3])
    assert counts.get("completed", 0) > 0 and counts.get("refused", 0) > 0, counts
    wait_until(lambda: dep.metric("baton:num_requests_waiting", "router") == 0.0
               and dep.metric("baton:num_requests_running", "router") == 0.0, timeout=30,
               what="router queue empty")
    for worker in dep.workers():
        wait_until(lambda w=worker: dep.metric("baton:kv_cache_usage_perc", w.name) == 0.0, timeout=30,
                   what=f"KV usage 0 on {worker.name}")
