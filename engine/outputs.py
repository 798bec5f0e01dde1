"""What the engine returns: vLLM's `RequestOutput` and `CompletionOutput`."""

from __future__ import annotations

from dataclasses import dataclass, field

from baton.engine.sequence import RequestMetrics

# One generated position's log-probabilities: token id -> logprob (top-N plus the sampled one).
Logprobs = dict[int, float]


@dataclass
class CompletionOutput:
    """One of a request's n outputs, cumulative so far."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[Logprobs] | None
    finish_reason: str | None = None  # "stop", "length", "abort", "error" or None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request after a step: every output, cumulative."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[Logprobs | None] | None = None
    num_cached_tokens: int = 0
    error: str | None = field(default=None)


@dataclass
class EmbeddingOutput:
    embedding: list[float] | None  # None when the request was aborted or failed


@dataclass
class EmbeddingRequestOutput:
    """The result of a pooling request (`PoolingParams`): one vector for the prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool
    metrics: RequestMetrics | None = None
    error: str | None = None
