"""vLLM's metric names beside Baton's, on a real `baton serve` (the router and one colocated
engine in one process, their metrics on its one port) on loopback, scraped as Prometheus
does: the same values under both names, a prefix-cache hit rate, and a preemption counter
that a too-small KV pool makes move."""

from __future__ import annotations

import re

import httpx
import pytest
from serving_harness import baton_up, wait_until

from baton.metrics import VLLM_NAMES

MODEL = "tiny-llama-v1"
PROMPT = "The quick brown fox jumps over the lazy dog"
NO_EOS = {"ignore_eos": True}  # outputs run to max_tokens, so token counts are known
_SAMPLE = re.compile(r"^(\S+?)(\{.*\})? (\S+)$")


@pytest.fixture(scope="module")
def served(_tiny_model_cache, tiny_model_dir):
    # 16 blocks of 4 tokens (64 tokens): four 40-token outputs at once cannot all keep their
    # KV, so the engine must preempt some of them.
    dep = baton_up(str(tiny_model_dir), "--served-model-name", MODEL, "--block-size", "4",
                   "--num-gpu-blocks-override", "16", command="serve")
    yield dep
    dep.stop()


def samples(url: str) -> dict[tuple[str, str], float]:
    """Every sample at a /metrics URL: (name, labels) -> value."""
    out = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def worker_url(served) -> str:
    """The engine's metrics: on the API's port, beside the router's (role "colocated")."""
    return f"{served.url}/metrics"


def value(all_samples: dict, name: str, role: str, extra: str = "", default: float | None = None) -> float:
    """The sample `name` of `role` (labels sorted as prometheus_client writes them); KeyError
    if absent, unless a `default` is given."""
    labels = "{" + (extra + "," if extra else "") + f'model_name="{MODEL}",role="{role}"' + "}"
    if default is not None:
        return all_samples.get((name, labels), default)
    return all_samples[(name, labels)]


def assert_vllm_names_match(all_samples: dict) -> int:
    """Every Baton sample with a vLLM counterpart appears under it with the same labels and
    value (one scrape); returns how many pairs were compared."""
    compared = 0
    for (name, labels), v in all_samples.items():
        for family, aliases in VLLM_NAMES.items():
            if name.startswith(family) and name[len(family):] in ("", "_total", "_count", "_sum", "_bucket"):
                for alias in aliases:
                    assert all_samples[(alias + name[len(family):], labels)] == v, (name, alias, labels)
                    compared += 1
    return compared


def test_vllm_names_carry_the_baton_values_after_some_requests(served):
    client = served.client()
    before = samples(worker_url(served))
    for _ in range(3):  # the same prompt: the second and third find its blocks cached
        out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                        extra_body=NO_EOS)
        assert out.usage.completion_tokens == 5

    def settled():
        now = samples(worker_url(served))
        done = value(now, "vllm:request_success_total", "colocated", 'finished_reason="length"')
        return now if done - value(before, "baton:request_success_total", "colocated", 'finished_reason="length"', 0.0) == 3 \
            and value(now, "vllm:num_requests_running", "colocated") == 0 else None

    worker = wait_until(settled, timeout=30, what="the worker's metrics to count the 3 requests")
    assert assert_vllm_names_match(worker) >= 20
    gen = value(worker, "vllm:generation_tokens_total", "colocated")
    assert gen - value(before, "baton:generation_tokens_total", "colocated") == 15
    assert value(worker, "vllm:time_to_first_token_seconds_count", "colocated") >= 3
    assert value(worker, "vllm:gpu_cache_usage_perc", "colocated") == value(worker, "baton:kv_cache_usage_perc", "colocated")
    hits = value(worker, "vllm:prefix_cache_hits_total", "colocated")
    queries = value(worker, "vllm:prefix_cache_queries_total", "colocated")
    assert hits > 0 and queries >= hits
    assert value(worker, "baton:prefix_cache_hit_rate", "colocated") == pytest.approx(hits / queries)
    assert value(worker, "vllm:gpu_prefix_cache_hit_rate", "colocated") == pytest.approx(hits / queries)

    router = samples(f"{served.url}/metrics")
    assert assert_vllm_names_match(router) >= 10
    assert value(router, "vllm:request_success_total", "router", 'finished_reason="length"') >= 3
    assert value(router, "vllm:e2e_request_latency_seconds_count", "router") >= 3


def test_a_kv_pool_too_small_for_the_batch_counts_preemptions(served):
    before = value(samples(worker_url(served)), "baton:num_preemptions_total", "colocated")
    out = served.client().completions.create(model=MODEL, prompt=PROMPT, n=4, max_tokens=40, temperature=1.0,
                                             seed=3, extra_body=NO_EOS)
    assert [c.finish_reason for c in out.choices] == ["length"] * 4  # preempted outputs still finish
    assert out.usage.completion_tokens == 160

    def preempted():
        now = samples(worker_url(served))
        return now if value(now, "vllm:num_preemptions_total", "colocated") > before else None

    worker = wait_until(preempted, timeout=30, what="vllm:num_preemptions_total to grow")
    assert value(worker, "baton:num_preemptions_total", "colocated") == value(worker, "vllm:num_preemptions_total", "colocated")
