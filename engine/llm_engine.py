"""`LLMEngine`: vLLM's synchronous engine API over the scheduler and the model runner.

One `step()` schedules a batch, runs it, appends the sampled tokens, applies stop rules and
returns a `RequestOutput` for every request that changed. Not thread-safe: one thread
drives an engine (`AsyncLLMEngine` runs it on its own thread).

Disaggregation hooks: a prefill engine takes requests with `hold_kv=True` (their blocks stay
referenced after they finish, until `release_held`), and a decode engine reserves blocks
(`reserve_blocks`) for a prompt whose KV arrives from elsewhere, then admits it with
`add_prefilled_request`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from baton.engine.block_manager import BlockManager
from baton.engine.config import EngineArgs, EngineConfig
from baton.engine.guided import GuidedDecoder
from baton.engine.model_runner import ModelRunner, StepOutput
from baton.engine.output_processor import SequenceOutput
from baton.engine.outputs import RequestOutput
from baton.engine.scheduler import ScheduledBatch, Scheduler
from baton.engine.sequence import RequestMetrics, Sequence, SequenceStatus
from baton.sampling_params import SamplingParams
from baton.tokenizer import Tokenizer

PromptType = str | dict[str, Any]
log = logging.getLogger(__name__)


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[SequenceOutput]
    metrics: RequestMetrics
    hold_kv: bool = False
    prompt_logprobs: list[dict[int, float] | None] | None = None
    error: str | None = None

    @property
    def seqs(self) -> list[Sequence]:
        return [o.seq for o in self.outputs]

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


@dataclass
class _Inflight:
    """A launched decode step whose tokens the host has not read (asynchronous scheduling)."""

    batch: ScheduledBatch
    ids: torch.Tensor  # [N] sampled token ids on the device
    host: torch.Tensor  # their copy in host memory (pinned on CUDA), valid once `event` passed
    event: Any  # torch.cuda.Event, or None on the CPU (nothing to wait for)


# Asynchronous scheduling: a token the device has sampled and the host has not read yet
# holds its place in `Sequence.token_ids` while the next step is launched, within one
# step() call. Never a valid id, so a step that fed it to the model would fail loudly.
PLACEHOLDER = -1


def _drop_placeholder(seq: Sequence) -> None:
    if seq.token_ids and seq.token_ids[-1] == PLACEHOLDER:
        seq.token_ids.pop()


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions: int


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.tokenizer = Tokenizer(config.tokenizer_dir)
        self.eos_token_ids = self.tokenizer.eos_token_ids
        self.runner = ModelRunner(config, self.eos_token_ids)
        self.guided = GuidedDecoder(config.tokenizer_dir, config.vocab_size, self.eos_token_ids)
        self.runner.sampler.transforms.append(self.guided.apply)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        # One sequence must always fit in the whole pool, or it could preempt itself forever.
        self.max_model_len = min(config.max_model_len, self.runner.num_blocks * config.block_size)
        if self.max_model_len < config.max_model_len:
            log.warning(
                "max_model_len lowered from %d to %d: the KV pool holds only that many tokens",
                config.max_model_len, self.max_model_len,
            )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill
        )
        self.requests: dict[str, _Request] = {}
        self._changed: dict[str, _Request] = {}  # requests with news since the last step
        # False: step() returns only finished requests (offline use, no per-step copies).
        self.stream_outputs = True
        self.held: dict[str, list[int]] = {}  # request id -> blocks kept for a KV handoff
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._ids = itertools.count()
        self._inflight: _Inflight | None = None  # asynchronous scheduling: a launched step

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> LLMEngine:
        return cls(engine_args.create_engine_config())

    # -- requests ------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """A prompt is text or {"prompt_token_ids": [...]}; returns (text or None, ids)."""
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            vocab = self.config.vocab_size
            if not isinstance(ids, list) or not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise ValueError(f"prompt_token_ids must be a list of integers in [0, {vocab})")
            return prompt.get("prompt"), list(ids)
        raise ValueError('a prompt is a string or {"prompt_token_ids": [...]}')

    def check_prompt_length(self, num_tokens: int) -> None:
        max_len = self.max_model_len
        if num_tokens == 0:
            raise ValueError("the prompt is empty")
        if num_tokens >= max_len:
            raise ValueError(
                f"the prompt has {num_tokens} tokens; this model's maximum context length is "
                f"{max_len} tokens, which must also leave room for the output"
            )

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        hold_kv: bool = False,
    ) -> None:
        """Queue a request. Raises ValueError for a bad prompt or parameters (nothing queued)."""
        params = params or SamplingParams()
        if request_id in self.requests or request_id in self.held:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        self.check_prompt_length(len(ids))
        if hold_kv and params.n != 1:
            raise ValueError("a request whose KV is handed off must have n=1")
        arrival = time.time() if arrival_time is None else arrival_time
        outputs = []
        for i in range(params.n):
            child = params if params.n == 1 else params.clone(
                n=1, seed=None if params.seed is None else params.seed + i
            )
            seq = Sequence(request_id, i, ids, child, arrival, priority)
            outputs.append(self._sequence_output(seq))
        request = _Request(request_id, text, ids, outputs, RequestMetrics(arrival), hold_kv=hold_kv)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        self._prepare(request)
        self.requests[request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)
        self.prompt_tokens_total += len(ids)

    def _sequence_output(self, seq: Sequence) -> SequenceOutput:
        return SequenceOutput(seq, self.tokenizer, self.eos_token_ids, self.max_model_len)

    def _prepare(self, request: _Request) -> None:
        """Hook for per-request features that must fail at add time (see guided decoding)."""
        self.guided.prepare(request.seqs)

    def abort_request(self, request_id: str | Iterable[str]) -> list[RequestOutput]:
        """Stop requests at any stage and free every block they hold.

        Returns the final output (finish_reason "abort") of each request that was still
        known; unknown ids are ignored.
        """
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        finals = []
        for rid in ids:
            request = self.requests.pop(rid, None)
            self._changed.pop(rid, None)
            if request is not None:
                for seq in request.seqs:
                    if not seq.is_finished:
                        self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
                request.metrics.finished_time = time.time()
                finals.append(self._make_output(request))
            self.release_held(rid)
        return finals

    def has_unfinished_requests(self) -> bool:
        # A request that finished at admission (a prefilled request whose first token ends
        # it) is no longer scheduled but still has an output for step() to deliver.
        return self.scheduler.has_unfinished() or bool(self.requests) or self._inflight is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # -- the step ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self._inflight is not None:  # asynchronous scheduling: launch the next, then finish
            done, self._inflight = self._inflight, None
            self._inflight = self._launch_next(done)
            return self._finish_launched(done)
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return self._collect_outputs()
        if self.config.async_scheduling and self._overlappable(batch):
            self._inflight = self._launch(batch, None)
            return self._collect_outputs()
        step_outputs = self.runner.execute(batch)
        return self._process(batch, step_outputs, computed=False)

    def _process(self, batch: ScheduledBatch, step_outputs: list[StepOutput], computed: bool) -> list[RequestOutput]:
        """Account a step's results; `computed`: num_computed_tokens was advanced at launch."""
        now = time.time()
        for seq, num_new, out in zip(batch.seqs, batch.num_new_tokens, step_outputs):
            if seq.is_finished:  # its request failed earlier in this step (a sibling's error)
                continue
            request = self.requests[seq.request_id]
            self._changed[request.request_id] = request
            metrics = request.metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
                metrics.time_in_queue = now - metrics.arrival_time
            if not computed:
                seq.num_computed_tokens += num_new
            self.block_manager.cache_computed_blocks(seq)
            if out.prompt_logprobs is not None and request.prompt_logprobs is not None and seq.index == 0:
                request.prompt_logprobs.extend(out.prompt_logprobs)
            if out.error is not None:
                self._fail(request, out.error)
                continue
            if out.token_id is None:
                continue
            self._append(request, seq, out.token_id, out.logprob, out.top_logprobs, now)
        return self._collect_outputs()

    # -- asynchronous scheduling ------------------------------------------------------------
    #
    # With `async_scheduling`, a decode step whose sequences need nothing from the host at
    # sampling time is launched without waiting for its tokens; the next step() launches the
    # following step with those tokens still on the device (each sequence holds a
    # placeholder for its unknown token until the call reads it), then reads the first
    # step's tokens and processes them while the device computes. Between calls a launched
    # step's sequences count its token as computed (`num_computed_tokens` runs one ahead of
    # what the host has read). Sequences that finished in the first step
    # ride along in the second for nothing: their rows are dropped, and the blocks they free
    # are reused only by work queued after it. Anything else (a waiting request that could be
    # admitted, prefill, guided decoding, penalties, logprobs, logits processors, a held KV
    # handoff, a full pool) ends the chain: the launched step is finished and the next step()
    # schedules normally.

    def _overlappable(self, batch: ScheduledBatch) -> bool:
        if not batch.decode_only:
            return False
        for seq in batch.seqs:
            p = seq.params
            if (p.guided_decoding is not None or p.logits_processors or p.logprobs is not None
                    or p.prompt_logprobs is not None or p.has_penalties or self.requests[seq.request_id].hold_kv):
                return False
        return True

    def _launch(self, batch: ScheduledBatch, input_ids) -> _Inflight:
        ids = self.runner.launch_decode(batch, input_ids)
        for seq in batch.seqs:
            seq.num_computed_tokens += 1  # the device computes it in stream order
        host = ids
        event = None
        if ids.is_cuda:
            host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            host.copy_(ids, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return _Inflight(batch, ids, host, event)

    def _launch_next(self, done: _Inflight) -> _Inflight | None:
        """The step after `done`, launched before `done`'s tokens are read; None if it can't."""
        sched = self.scheduler
        keep = [i for i, seq in enumerate(done.batch.seqs) if not seq.is_finished]
        seqs = [done.batch.seqs[i] for i in keep]
        if not seqs or len(seqs) != len(sched.running) or (sched.waiting and len(sched.running) < sched.max_num_seqs):
            return None
        for seq in seqs:
            seq.token_ids.append(PLACEHOLDER)
        if not self.block_manager.can_allocate_all(seqs, 1):
            for seq in seqs:
                seq.token_ids.pop()
            return None
        for seq in seqs:
            self.block_manager.allocate(seq, 1)
        index = done.ids if len(keep) == len(done.batch.seqs) else done.ids[torch.tensor(keep, device=done.ids.device)]
        return self._launch(ScheduledBatch(seqs, [1] * len(seqs)), index)

    def _finish_launched(self, done: _Inflight) -> list[RequestOutput]:
        if done.event is not None:
            done.event.synchronize()
        token_ids = done.host.tolist()
        for seq in done.batch.seqs:
            _drop_placeholder(seq)  # the token it stood for is appended below
        return self._process(done.batch, [StepOutput(token_id=t) for t in token_ids], computed=True)

    def _append(self, request: _Request, seq: Sequence, token_id: int, logprob, top_logprobs, now: float) -> None:
        try:
            grammar_done = self.guided.advance(seq, token_id)
        except ValueError as exc:  # the token breaks the request's grammar
            self._fail(request, str(exc))
            return
        seq.append_token(token_id, logprob or 0.0)
        if seq.logprobs is not None:
            seq.logprobs.append(top_logprobs or {})
        self.generation_tokens_total += 1
        metrics = request.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        status = request.outputs[seq.index].on_token(token_id, grammar_done)
        if status is not None:
            self._finish(request, seq, status)

    def _fail(self, request: _Request, message: str) -> None:
        """The request failed (a logits processor raised, ...): end all its sequences."""
        request.error = message
        for seq in request.seqs:
            if not seq.is_finished:
                self._finish(request, seq, SequenceStatus.FINISHED_ERROR)

    def _finish(self, request: _Request, seq: Sequence, status: SequenceStatus) -> None:
        keep = request.hold_kv and status is not SequenceStatus.FINISHED_ERROR
        if keep:
            self.held[request.request_id] = list(seq.block_table)
            log.debug("%s finished (%s) holding %d blocks for a KV handoff", request.request_id, status.name,
                      len(seq.block_table))
        self.scheduler.finish(seq, status, free_blocks=not keep)
        self._changed[request.request_id] = request
        if request.finished:
            request.metrics.finished_time = time.time()

    def _collect_outputs(self) -> list[RequestOutput]:
        """Outputs of the requests that changed (only finished ones unless streaming)."""
        outputs = []
        changed, self._changed = self._changed, {}
        for rid, request in changed.items():
            finished = request.finished
            if finished or self.stream_outputs:
                outputs.append(self._make_output(request))
            if finished:
                self.requests.pop(rid, None)
        return outputs

    def _make_output(self, request: _Request) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[o.completion() for o in request.outputs],
            finished=request.finished,
            metrics=request.metrics,
            prompt_logprobs=request.prompt_logprobs,
            num_cached_tokens=request.seqs[0].num_cached_tokens,
            error=request.error,
        )

    # -- disaggregation hooks ------------------------------------------------------------

    def held_blocks(self, request_id: str) -> list[int] | None:
        """Blocks of a finished `hold_kv` request, in prompt order (None if not held)."""
        return self.held.get(request_id)

    def release_held(self, request_id: str) -> None:
        blocks = self.held.pop(request_id, None)
        if blocks is not None:
            self.block_manager.release(reversed(blocks))
            log.debug("%s released its %d held blocks", request_id, len(blocks))

    def reserve_blocks(self, num_tokens: int) -> list[int]:
        """Reserve the blocks a prompt of `num_tokens` needs; raises ValueError if they don't fit."""
        self.check_prompt_length(num_tokens)
        needed = self.block_manager.blocks_for(num_tokens)
        if not self.block_manager.can_reserve(needed):
            raise NoCapacityError(f"{needed} KV blocks needed, {self.block_manager.num_free_blocks} free")
        return self.block_manager.reserve(needed)

    def release_blocks(self, blocks: list[int]) -> None:
        """Give back reserved blocks that were never admitted (failed or expired handoff)."""
        self.block_manager.release(reversed(blocks))

    def add_prefilled_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        block_ids: list[int],
        first_token_id: int,
        first_logprob: float | None = None,
        first_top_logprobs: dict[int, float] | None = None,
        prompt: str | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> None:
        """Admit a request whose prompt KV is already in `block_ids` (from `reserve_blocks`).

        The engine takes over the blocks' references, also when this raises (it releases
        them then), so a caller never has to guess who owns them after a bad request. The
        request continues from its first token exactly as if this engine had computed the
        prompt.
        """
        try:
            if request_id in self.requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            if params.n != 1:
                raise ValueError("a prefilled request must have n=1")
            if len(block_ids) != self.block_manager.blocks_for(len(prompt_token_ids)):
                raise ValueError(
                    f"{len(block_ids)} blocks do not match a prompt of {len(prompt_token_ids)} tokens"
                )
            arrival = time.time() if arrival_time is None else arrival_time
            seq = Sequence(request_id, 0, list(prompt_token_ids), params, arrival, priority)
            request = _Request(request_id, prompt, list(prompt_token_ids), [self._sequence_output(seq)], RequestMetrics(arrival))
            self._prepare(request)
        except BaseException:
            self.release_blocks(list(block_ids))
            raise
        seq.block_table = list(block_ids)
        seq.num_computed_tokens = len(prompt_token_ids)
        self.block_manager.cache_computed_blocks(seq)
        self.requests[request_id] = request
        now = time.time()
        request.metrics.first_scheduled_time = now
        request.metrics.time_in_queue = now - arrival
        self._changed[request_id] = request
        self._append(request, seq, first_token_id, first_logprob, first_top_logprobs, now)
        if not seq.is_finished:
            self.scheduler.add(seq)

    # -- observability -------------------------------------------------------------------

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage,
            num_free_blocks=bm.num_free_blocks,
            num_blocks=bm.num_blocks,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            num_preemptions=self.scheduler.num_preemptions,
        )


class NoCapacityError(ValueError):
    """The KV pool has no room for a reservation right now (retry later or elsewhere)."""
