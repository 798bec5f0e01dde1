"""Request state: one `Sequence` per sampled output stream (no tensors, no I/O).

A request with `n > 1` is fanned out into n sequences that share the prompt (and, through
the prefix cache, its KV blocks). The scheduler and the block manager only see sequences.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

from baton.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"
    # Prefilled for a KV handoff: its first token is sampled and the request goes on in
    # another engine (`LLMEngine.add_request(..., hold_kv=True)`); not an end of the output.
    FINISHED_HANDOFF = "handoff"

    @property
    def finished(self) -> bool:
        return self not in (SequenceStatus.WAITING, SequenceStatus.RUNNING)


@dataclass
class RequestMetrics:
    """Timestamps of a request's life (seconds, `time.time()` clock) and where its time went.

    `scheduler_time` and `model_forward_time` add up, over the steps that included the
    request, the wall time of the scheduling decision and of running the model (forward and
    sampling, the token ids read back on the host), in seconds; a step counts once for a
    request however many of its n outputs it ran. `num_token_steps` counts the steps that
    gave the request new tokens.
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    time_in_queue: float | None = None
    scheduler_time: float = 0.0
    model_forward_time: float = 0.0
    num_token_steps: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from arrival to the first output token (None before it)."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        """Mean seconds between the steps that produced tokens after the first one (None
        until a second such step)."""
        if self.num_token_steps < 2 or self.first_token_time is None or self.last_token_time is None:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_token_steps - 1)


_seq_counter = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One output stream of a request, and the scheduler's view of it.

    `token_ids` holds the prompt followed by the generated tokens. `num_computed_tokens`
    counts the tokens whose KV is in the cache; the engine samples a new token whenever a
    step computes up to the end of `token_ids`. `block_table` lists the KV blocks that hold
    the sequence, in order.
    """

    request_id: str
    index: int  # which of the request's n outputs
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    priority: int = 0
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    status: SequenceStatus = SequenceStatus.WAITING
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    block_table: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    num_preemptions: int = 0
    # A pooling request (embeddings): its prompt is computed and nothing is sampled; the
    # runner hands its hidden states to the engine (engine/pooling.py).
    pooled: bool = False
    # Owned by the block manager: chained hashes of the full blocks of `token_ids` (kept
    # across preemption, the tokens do not change), and how many of the blocks in
    # `block_table` are registered in the prefix cache.
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    # The request's LoRA adapter (`baton.engine.lora.LoRARequest`), None for the base model.
    lora_request: Any = None
    # Owned by the guided decoder: the request's xgrammar GrammarMatcher (None: unguided).
    grammar_matcher: Any = None
    # Owned by input preparation: (block_table list, its int32 array), see `table_array`.
    table_array_cache: tuple[list[int], Any] | None = field(default=None, repr=False)
    # Owned by speculative decoding (engine/spec_decode): tokens drafted to follow
    # `token_ids`, verified by the next step that schedules them (the scheduler trims them to
    # what fits), how many tokens have KV in the draft model's cache, and how many of the
    # others the draft model computes this step without drafting (set by the scheduler: a
    # catch-up chunk, see spec_decode/schedule.py).
    spec_token_ids: list[int] = field(default_factory=list)
    num_draft_computed: int = 0
    draft_catch_up: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def lora_int_id(self) -> int:
        """The adapter's id, 0 for the base model."""
        return self.lora_request.lora_int_id if self.lora_request is not None else 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def in_prefill(self) -> bool:
        """True until the whole prompt (and any recomputed output) has KV in the cache."""
        return self.num_computed_tokens < len(self.token_ids) - 1

    def append_token(self, token_id: int, logprob: float) -> None:
        self.token_ids.append(token_id)
        self.cumulative_logprob += logprob

    def reset_for_recompute(self) -> None:
        """Preempted: drop the KV; prompt and generated tokens are recomputed later.

        The grammar matcher and block hashes are kept: they already reflect the generated
        tokens, which recompute does not sample again.
        """
        self.num_computed_tokens = 0
        self.block_table = []
        self.spec_token_ids = []
        self.num_draft_computed = 0
        self.draft_catch_up = 0
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1

    @property
    def sort_key(self) -> tuple[int, float, int]:
        """Scheduling order: lower priority value first, then arrival (FCFS)."""
        return (self.priority, self.arrival_time, self.seq_id)
