"""Logits processors: applied in order before sampling; one that raises fails its request only."""

from __future__ import annotations

import torch

from baton.engine import GuidedDecodingParams, SamplingParams


def test_processors_run_in_order_and_see_the_generated_tokens(clean_engine, run_all):
    seen: list[list[int]] = []
    target = clean_engine.tokenizer.encode("!", add_special_tokens=False)[0]

    def record(token_ids, logits):
        seen.append(list(token_ids))
        return logits

    def only_bang(token_ids, logits):
        forced = torch.full_like(logits, float("-inf"))
        forced[target] = 0.0
        return forced  # a new tensor is fine too

    params = SamplingParams(temperature=1.0, seed=3, max_tokens=5, logits_processors=[record, only_bang])
    out = run_all(clean_engine, {"p": ("Hi", params)})["p"].outputs[0]
    assert out.token_ids == [target] * 5
    assert seen == [[target] * k for k in range(5)]


def test_a_failing_processor_fails_only_its_request_with_its_message(clean_engine, run_all):
    raised = []

    def explode(token_ids, logits):
        if len(token_ids) == 3 and not raised:  # once: for one of the request's two outputs
            raised.append(True)
            raise RuntimeError("boom at 3")
        return logits

    requests = {
        "bad": ("Hi", SamplingParams(n=2, seed=1, max_tokens=10, logits_processors=[explode])),
        "free": ("Hi", SamplingParams(seed=1, max_tokens=10, ignore_eos=True)),
        "json": ("Hi", SamplingParams(max_tokens=60, guided_decoding=GuidedDecodingParams(regex="[a-z]{4}"))),
    }
    finals = run_all(clean_engine, requests)
    bad = finals["bad"]
    assert bad.finished and "explode" in bad.error and "boom at 3" in bad.error
    assert [o.finish_reason for o in bad.outputs] == ["error", "error"]  # both of its n outputs
    assert sorted(len(o.token_ids) for o in bad.outputs)[0] == 3  # the failed token is dropped
    assert max(len(o.token_ids) for o in bad.outputs) <= 4  # the sibling stopped in that step
    assert finals["free"].error is None and len(finals["free"].outputs[0].token_ids) == 10
    assert finals["json"].error is None and len(finals["json"].outputs[0].text) == 4
    # clean_engine checks no KV block leaked


def test_a_processor_returning_the_wrong_shape_fails_its_request(clean_engine, run_all):
    params = SamplingParams(max_tokens=4, logits_processors=[lambda ids, logits: logits[:3]])
    out = run_all(clean_engine, {"shape": ("Hi", params)})["shape"]
    assert out.outputs[0].finish_reason == "error"
    assert "logits processor" in out.error
