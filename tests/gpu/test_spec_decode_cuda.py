"""Speculative decoding on CUDA: verify steps through the Triton attention kernels (a prefill
over the cached prefix) and eager draft-model steps give the plain engine's greedy tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from baton.engine import EngineArgs, LLMEngine, SamplingParams
from baton.engine.tiny_model import write_tiny_model

sys.path.insert(0, str(Path(__file__).parents[1] / "spec_decode"))
from spec_helpers import NGRAM, assert_no_leaked_blocks, perturbed_copy, repetitive_prompts, run  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


def engine(model: Path, **overrides) -> LLMEngine:
    return LLMEngine.from_engine_args(EngineArgs(
        model=str(model), device="cuda", dtype="float32", max_num_seqs=16, max_model_len=512,
        num_gpu_blocks_override=512, **overrides))


def test_ngram_and_draft_model_speculation_equal_greedy_on_cuda(tmp_path):
    model = write_tiny_model(tmp_path / "target")
    draft = perturbed_copy(model, tmp_path / "draft")
    prompts = repetitive_prompts(12, seed=11)
    assert_both_methods_exact(model, draft, prompts)


def assert_both_methods_exact(model: Path, draft: Path, prompts, **overrides) -> None:
    """N-gram and draft-model speculation give the plain engine's greedy tokens, accept some
    drafts and reject others, and leave no blocks behind."""
    expected = [o.outputs[0].token_ids for o in run(engine(model), prompts, GREEDY)]
    for config in (NGRAM, {"model": str(draft), "num_speculative_tokens": 4}):
        spec = engine(model, speculative_config=config, **overrides)
        try:
            assert [o.outputs[0].token_ids for o in run(spec, prompts, GREEDY)] == expected
            stats = spec.stats()
            assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
            assert_no_leaked_blocks(spec)
        finally:
            spec.runner.close()


def test_speculation_with_async_scheduling_equals_greedy_on_cuda(tmp_path):
    """Large batches chain launched-ahead decode steps (graph replays fed on the device),
    small ones verify drafts synchronously: the plain engine's greedy tokens either way."""
    model = write_tiny_model(tmp_path / "target")
    prompts = repetitive_prompts(6, seed=20)
    params = [SamplingParams(temperature=0, max_tokens=8 + 8 * i, ignore_eos=True) for i in range(6)]
    expected = [o.outputs[0].token_ids for o in run(engine(model, async_scheduling=False), prompts, params)]
    spec = engine(model, async_scheduling=True,
                  speculative_config=dict(NGRAM, shorten_by_batch_size=2, disable_by_batch_size=4))
    assert [o.outputs[0].token_ids for o in run(spec, prompts, params)] == expected
    assert spec.async_steps.num_launched_ahead > 0 and spec.stats().spec_num_accepted_tokens > 0
    assert_no_leaked_blocks(spec)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_speculation_at_tp2_equals_tp1_without_it_on_cuda(tmp_path):
    """NCCL: rank 0 drafts (n-gram; the draft model whole on cuda:0), both ranks verify."""
    model = write_tiny_model(tmp_path / "target")
    assert_both_methods_exact(model, perturbed_copy(model, tmp_path / "draft"), repetitive_prompts(6, seed=13),
                              tensor_parallel_size=2)
