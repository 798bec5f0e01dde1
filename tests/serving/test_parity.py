"""Greedy output is the same token for token in disaggregated mode, colocated mode and
offline `LLM`: the KV handoff and the router's stream joining change nothing."""

from __future__ import annotations

import pytest

from baton.engine import LLM, SamplingParams

PROMPTS = [
    "The quick brown fox",
    "Hello, world! How are you today?",
    "def add(a, b): return a + b  # Python\nSELECT name FROM users WHERE id = 42;" * 3,  # > 3 blocks
    "Unicode: café, naïve, Straße, 東京",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def offline(tiny_model_dir) -> list[tuple[str, list[str]]]:
    llm = LLM(model=str(tiny_model_dir), num_gpu_blocks_override=64, device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    tok = llm.get_tokenizer()
    results = []
    for out in llm.generate(PROMPTS, params, use_tqdm=False):
        completion = out.outputs[0]
        results.append((completion.text, [tok.decode([t], skip_special_tokens=False) for t in completion.token_ids]))
    return results


def _served(deployment) -> list[tuple[str, list[str]]]:
    client = deployment.client()
    results = []
    for prompt in PROMPTS:  # one at a time: batch composition cannot matter
        out = client.completions.create(model="tiny-llama-v1", prompt=prompt, max_tokens=MAX_TOKENS,
                                        temperature=0.0, logprobs=0, extra_body={"ignore_eos": True})
        results.append((out.choices[0].text, out.choices[0].logprobs.tokens))
    return results


def test_greedy_output_is_identical_everywhere(disaggregated, disaggregated_ucx, colocated, offline):
    served = {"disaggregated (grpc)": _served(disaggregated), "disaggregated (ucx)": _served(disaggregated_ucx),
              "colocated": _served(colocated)}
    for i, (prompt, want) in enumerate(zip(PROMPTS, offline)):
        assert len(want[1]) == MAX_TOKENS
        for mode, results in served.items():
            assert results[i] == want, f"{mode} differs from offline for {prompt!r}"


def test_greedy_streams_join_without_seams(disaggregated, offline):
    """The first token comes from the prefill worker, the rest from the decode worker."""
    client = disaggregated.client()
    for prompt, (want_text, _) in zip(PROMPTS, offline):
        stream = client.completions.create(model="tiny-llama-v1", prompt=prompt, max_tokens=MAX_TOKENS,
                                           temperature=0.0, stream=True, extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in stream) == want_text


def test_seeded_sampling_is_identical_in_every_mode(disaggregated, disaggregated_ucx, colocated, tiny_model_dir):
    """Seeded noise depends on (seed, position) only, so the prefill worker's first token and
    the decode worker's rest sample exactly what one engine would; n=2 uses seed and seed+1."""
    llm = LLM(model=str(tiny_model_dir), num_gpu_blocks_override=64, device="cpu")
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=11, n=2, max_tokens=MAX_TOKENS, ignore_eos=True)
    want = [o.text for o in llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs]
    for dep in (disaggregated, disaggregated_ucx, colocated):
        out = dep.client().completions.create(model="tiny-llama-v1", prompt=PROMPTS[1], max_tokens=MAX_TOKENS,
                                              temperature=0.8, top_p=0.95, seed=11, n=2,
                                              extra_body={"ignore_eos": True})
        assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == want
