"""Warm-up before readiness: run every shape a worker's traffic can reach once, so that the
kernels for it are compiled (or loaded from the compile cache) before the worker reports
SERVING, not under its first requests.

What traffic reaches, and how the warm-up reaches it, through the public engine API only:

- prefill steps of any token count up to `max_num_batched_tokens` (chunked prefill):
  one request per size bucket, 1, 16, 32, 64, ... doubling, and the largest chunk itself,
  capped by the context and the KV pool; the requests alternate greedy and sampled
  parameters (top-k, top-p, penalties, log-probabilities), which take different sampling
  kernels;
- decode steps at every batch size from `max_num_seqs` down to 1: n requests of a one-token
  prompt started together, request i generating i + 2 tokens (ignoring end-of-sequence), so
  that as they finish one by one the running batch passes through every size (on CUDA the
  decode graphs of those sizes were captured at start-up; the warm-up replays each once).

On CPU there is nothing to compile and `auto` skips it. The warm-up's requests count in the
engine's token counters like any other.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

from baton.sampling_params import SamplingParams

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class WarmupReport:
    prefill_lengths: tuple[int, ...]
    decode_batch: int  # the largest decode batch run (every size below it ran too)
    seconds: float


def prefill_lengths(max_batched_tokens: int, limit: int) -> list[int]:
    """Prompt lengths that reach every prefill size bucket: 1, then powers of two from 16,
    then `max_batched_tokens`, all at most `limit`."""
    sizes = {1, max_batched_tokens}
    size = 16
    while size < max_batched_tokens:
        sizes.add(size)
        size *= 2
    return sorted(s for s in sizes if 1 <= s <= limit)


def _params(i: int, max_tokens: int) -> SamplingParams:
    if i % 2 == 0:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return SamplingParams(temperature=0.8, top_p=0.9, top_k=40, min_p=0.01, repetition_penalty=1.1,
                          presence_penalty=0.1, logprobs=2, seed=i, max_tokens=max_tokens, ignore_eos=True)


async def _drain(engine, prompt_ids: list[int], params: SamplingParams, rid: str) -> None:
    async for _ in engine.generate({"prompt_token_ids": prompt_ids}, params, rid):
        pass


def should_warm_up(mode: str, device_type: str) -> bool:
    if mode not in MODES:
        raise ValueError(f"warm-up mode must be one of {MODES}, got {mode!r}")
    return mode == "on" or (mode == "auto" and device_type == "cuda")


async def warm_up(engine) -> WarmupReport:
    """Run the warm-up on an `AsyncLLMEngine` that serves nothing yet; returns what ran."""
    start = time.monotonic()
    config = engine.config
    stats = await engine.run(lambda e: e.stats())
    block_size = config.block_size
    room = min(config.max_model_len, stats.num_blocks * block_size) - 2  # the prompt and 2 tokens
    rng = random.Random(0)
    # Token 0 is often a special token: random ids from the rest of the vocabulary.
    tokens = lambda n: [rng.randrange(1, config.vocab_size) for _ in range(n)]  # noqa: E731
    lengths = prefill_lengths(config.max_num_batched_tokens, room)
    for i, length in enumerate(lengths):
        await _drain(engine, tokens(length), _params(i, 2), f"warmup-prefill-{length}")
    per_request = -(-(1 + config.max_num_seqs + 2) // block_size)
    batch = max(1, min(config.max_num_seqs, stats.num_blocks // per_request))
    await asyncio.gather(*(_drain(engine, tokens(1), _params(i, i + 2), f"warmup-decode-{i}")
                           for i in range(batch)))
    report = WarmupReport(tuple(lengths), batch, time.monotonic() - start)
    log.info("warm-up: prefill of %s tokens, decode batches %d..1, %.1fs", list(report.prefill_lengths),
             report.decode_batch, report.seconds)
    return report
