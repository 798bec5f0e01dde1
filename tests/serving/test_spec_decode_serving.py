"""Speculative decoding behind the router: the decode worker speculates on a prompt whose KV
came from the prefill worker, and serves what a plain deployment serves."""

from __future__ import annotations

import json

import httpx
import pytest
from serving_harness import baton_up

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
PROMPT = "The quick brown fox jumps over the lazy dog. " * 6


@pytest.fixture(scope="module")
def speculating():
    dep = baton_up("--mode", "disaggregated", "--speculative-config", json.dumps(NGRAM))
    yield dep
    dep.stop()


def test_speculating_decode_workers_serve_the_plain_greedy_text_and_count_drafts(speculating, disaggregated):
    def greedy(dep) -> str:
        out = dep.client().completions.create(model="tiny-llama-v1", prompt=PROMPT, max_tokens=24, temperature=0)
        return out.choices[0].text

    assert greedy(speculating) == greedy(disaggregated)
    decode = next(w for w in speculating.workers() if w.name.startswith("decode"))
    assert speculating.metric("baton:spec_decode_num_draft_tokens_total", decode.name) > 0
    assert 'baton:spec_decode_acceptance_rate{model_name="tiny-llama-v1",role="decode"}' in httpx.get(
        decode.metrics_url).text
    prefill = next(w for w in speculating.workers() if w.name.startswith("prefill"))
    assert "spec_decode" not in httpx.get(prefill.metrics_url).text  # prefill workers do not speculate
