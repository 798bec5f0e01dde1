"""Transparent decode failover and local prefill on a real disaggregated deployment (one
prefill worker, three decode workers: each failover test kills one), through the official `openai` client.

The tests run in file order; the failover test kills a decode worker.
"""

from __future__ import annotations

import os
import signal

import pytest
from serving_harness import baton_up, kv_usage, series_sum, wait_until

M = "tiny-llama-v1"
LONG = {"ignore_eos": True}
TOKENS = 300  # long enough that the stream still runs when the worker is killed
PROMPT = "The decode worker serving this stream is about to be killed"


@pytest.fixture(scope="module")
def dep(_tiny_model_cache):
    d = baton_up("--prefill", "1", "--decode", "3", "--local-prefill-tokens", "8")
    yield d
    d.stop()


def answers(dep, name: str) -> bool:
    """The worker serves its metrics (a killed one may linger as a zombie until reaped)."""
    try:
        dep.metric("baton:num_requests_running", name)
    except OSError:
        return False
    return True


def decisions(dep, decision: str) -> float:
    return series_sum(f"{dep.url}/metrics", "baton:router_prefill_decisions_total", f'decision="{decision}"')


def handoffs(dep) -> float:
    """KV handoffs the router completed (these workers are in no cell: all cross_cell)."""
    return series_sum(f"{dep.url}/metrics", "baton:router_kv_handoffs_total", 'pairing="cross_cell"')


def stream_text(client, prompt: str, max_tokens: int, kill=None, **extra) -> tuple[str, str | None]:
    """(the streamed text, the finish reason); `kill(n)` is called after every chunk."""
    stream = client.completions.create(model=M, prompt=prompt, max_tokens=max_tokens, stream=True,
                                       extra_body={**LONG, **extra.pop("extra_body", {})}, **extra)
    text, finish = "", None
    for n, chunk in enumerate(stream, 1):
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
        if kill is not None:
            kill(n)
    return text, finish


def test_short_prompts_prefill_on_the_decode_worker(dep):
    client = dep.client()
    before_short, before_remote = decisions(dep, "short_prompt"), decisions(dep, "remote")
    short = client.completions.create(model=M, prompt="Hi", max_tokens=4, temperature=0, extra_body=LONG)
    assert short.usage.completion_tokens == 4
    assert decisions(dep, "short_prompt") == before_short + 1
    client.completions.create(model=M, prompt=PROMPT, max_tokens=4, temperature=0, extra_body=LONG)
    assert decisions(dep, "remote") == before_remote + 1


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "seed": 11}],
                         ids=["greedy", "seeded"])
def test_killed_decode_worker_stream_continues_with_the_same_text(dep, sampling):
    """kill -9 the decode worker serving a stream after a few chunks: the stream ends normally,
    with exactly the text of an undisturbed run, and no KV is left on any surviving worker.
    The resumed run goes through the prefill worker (the prompt and the streamed tokens
    prefilled there, handed to another decode worker): one more handoff, one more prefill."""
    client = dep.client(timeout=120)
    expected, finish = stream_text(client, PROMPT, TOKENS, **sampling)
    assert finish == "length"
    decoders = [n for n in dep.processes if n.startswith("decode") and answers(dep, n)]
    failovers = dep.metric("baton:router_failovers_total", "router")
    handed_off, prefilled = handoffs(dep), prefill_handoffs(dep)
    killed: list[str] = []

    def kill(n: int) -> None:
        if n == 6 and not killed:
            # The worker running a request serves this stream (the others are idle).
            victim = max(decoders, key=lambda d: dep.metric("baton:num_requests_running", d))
            os.kill(dep.processes[victim].pid, signal.SIGKILL)
            killed.append(victim)

    text, finish = stream_text(client, PROMPT, TOKENS, kill=kill, **sampling)
    assert killed and finish == "length"
    assert text == expected
    assert dep.metric("baton:router_failovers_total", "router") == failovers + 1
    assert handoffs(dep) == handed_off + 2 and prefill_handoffs(dep) == prefilled + 2
    lost = dep.processes[killed[0]].grpc
    assert any("resuming elsewhere" in line and lost in line for line in dep.output)
    survivors = [w.name for w in dep.workers() if answers(dep, w.name)]
    wait_until(lambda: all(kv_usage(dep, n) == 0.0 for n in survivors), what="no KV held on the survivors")


def prefill_handoffs(dep) -> float:
    """Handoffs the prefill worker pushed (all transports)."""
    return series_sum(dep.processes["prefill-0"].metrics_url, "baton:kv_transfer_seconds_count")
