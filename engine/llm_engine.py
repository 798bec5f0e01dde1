"""`LLMEngine`: vLLM's synchronous engine API over the scheduler and the model runner.

One `step()` schedules a batch, runs it, appends the sampled tokens, applies stop rules and
returns a `RequestOutput` for every request that changed. Not thread-safe: one thread
drives an engine (`AsyncLLMEngine` runs it on its own thread).

Elsewhere: asynchronous scheduling (`async_scheduling.py`), the KV handoff hooks of
disaggregated serving (`handoff.py`, mixed in), the errors it raises (`errors.py`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from baton.engine.async_scheduling import AsyncSteps
from baton.engine.block_manager import BlockManager
from baton.engine.config import EngineArgs, EngineConfig
from baton.engine.errors import DuplicateRequestError, InvalidRequestError, NoCapacityError
from baton.engine.guided import GuidedDecoder
from baton.engine.handoff import HandoffHooks
from baton.engine.model_runner import ModelRunner, StepOutput
from baton.engine.output_processor import SequenceOutput
from baton.engine.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    RequestOutput,
)
from baton.engine.pooling import Pooler
from baton.engine.scheduler import ScheduledBatch, Scheduler
from baton.engine.sequence import RequestMetrics, Sequence, SequenceStatus
from baton.engine.spec_decode.decoder import SpecDecoder
from baton.sampling_params import PoolingParams, SamplingParams
from baton.tokenizer import Tokenizer

PromptType = str | dict[str, Any]
log = logging.getLogger(__name__)
# What a pooling sequence carries where others carry their sampling parameters: nothing is
# sampled or detokenised for it.
_POOLING_SAMPLING = SamplingParams(max_tokens=1, detokenize=False)


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
    lora_request: Any = None  # its LoRARequest (one reference on the adapter while it lives)
    params: SamplingParams | None = None  # the request's own (n and best_of), when added whole
    pooler: Pooler | None = None  # a pooling request (embeddings)
    embedding: list[float] | None = None

    @property
    def ranked(self) -> bool:
        """best_of > n: only the best n outputs are shown, once all have finished."""
        return self.params is not None and self.params.num_candidates > self.params.n

    @property
    def final_only(self) -> bool:
        """Only the finished request has an output (best_of > n, or pooling)."""
        return self.ranked or self.pooler is not None

    @property
    def seqs(self) -> list[Sequence]:
        return [o.seq for o in self.outputs]

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)



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
    # Speculative decoding (None without it): verify rounds, drafted and accepted tokens.
    spec_num_drafts: int | None = None
    spec_num_draft_tokens: int | None = None
    spec_num_accepted_tokens: int | None = None
    lora: Any = None  # LoRAStats (engine/lora/manager.py) with LoRA on, else None


__all__ = ["EngineStats", "LLMEngine", "NoCapacityError", "PromptType"]


class LLMEngine(HandoffHooks):
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
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill,
            max_loras=config.lora.max_loras if config.lora else None,
            adapter_ready=self.runner.lora.ready if self.runner.lora is not None else None,
            draft_model=self.runner.draft is not None,
        )
        self.requests: dict[str, _Request] = {}
        self._changed: dict[str, _Request] = {}  # requests with news since the last step
        # False: step() returns only finished requests (offline use, no per-step copies).
        self.stream_outputs = True
        self.held: dict[str, list[int]] = {}  # request id -> blocks kept for a KV handoff
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._ids = itertools.count()
        self.async_steps = AsyncSteps(self.runner, self.scheduler, self.block_manager, self._drafts)
        self.spec = (SpecDecoder(config.speculative, self.block_manager, self.max_model_len)
                     if config.speculative else None)

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
                raise InvalidRequestError(f"prompt_token_ids must be a list of integers in [0, {vocab})")
            return prompt.get("prompt"), list(ids)
        raise InvalidRequestError('a prompt is a string or {"prompt_token_ids": [...]}')

    def check_prompt_length(self, num_tokens: int) -> None:
        max_len = self.max_model_len
        if num_tokens == 0:
            raise InvalidRequestError("the prompt is empty")
        if num_tokens >= max_len:
            raise InvalidRequestError(
                f"the prompt has {num_tokens} tokens; this model's maximum context length is "
                f"{max_len} tokens, which must also leave room for the output"
            )

    def with_bad_words(self, params: SamplingParams) -> SamplingParams:
        """`params` with `bad_words_token_ids` set from this engine's tokenizer (vLLM's rule,
        `Tokenizer.bad_words_token_ids`), when it has `bad_words`."""
        if not params.bad_words or params.bad_words_token_ids is not None:
            return params
        return params.clone(bad_words_token_ids=self.tokenizer.bad_words_token_ids(params.bad_words))

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | PoolingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        hold_kv: bool = False,
        resume_token_ids: list[int] | None = None,
        lora_request=None,
    ) -> None:
        """Queue a request. Nothing is queued when it raises: DuplicateRequestError for a
        request id in use, ValueError (InvalidRequestError, or a parameter or grammar check)
        for a bad prompt or parameters.

        `hold_kv`: prefill for a KV handoff (n must be 1). The request ends after its first
        token, with finish_reason "handoff" unless the output really ends on that token
        (then "stop" or "length", as any request), and its text is what a running request
        shows (held back where a stop string may begin: exactly what the decode engine will
        show for that token). Its blocks stay referenced until `release_held`.

        `resume_token_ids`: output tokens this request already produced in another engine
        (the router's failover; n must be 1). They become the sequence's first outputs, as
        after a preemption: their KV is recomputed, the next token is sampled at output
        position `len(resume_token_ids)` (a seeded request draws what the original would
        have; penalties, `min_tokens`, `max_tokens` and stop strings count them), and the
        output's tokens and text include them. With `hold_kv`, the held blocks cover the
        prompt and these tokens (a failover through a prefill worker).

        `PoolingParams` make it an embedding request (the engine must run with task
        "embed"): its one output is an `EmbeddingRequestOutput`, once the prompt is computed.

        `lora_request`: a `LoRARequest` to run the request with that adapter (the engine
        needs `enable_lora`). An adapter not in host memory is read on a thread of its own
        (engine/lora/manager.py) while the request waits in the queue; one that cannot be
        used ends the requests naming it with finish_reason "error" and the reason in
        `RequestOutput.error` (a `lora_int_id` known under another path raises `LoRAError`
        here, an InvalidRequestError).
        """
        if isinstance(params, PoolingParams):
            if hold_kv or resume_token_ids:
                raise InvalidRequestError("a pooling request runs here whole (no hold_kv, no resume)")
            if lora_request is not None:
                raise InvalidRequestError("LoRA adapters apply to generation requests only, not to embeddings")
            self._add_pooling_request(request_id, prompt, params, arrival_time, priority)
            return
        params = self.with_bad_words(params or SamplingParams())
        resume = list(resume_token_ids or ())
        if request_id in self.requests or request_id in self.held:
            raise DuplicateRequestError(request_id)
        text, ids = self.tokenize_prompt(prompt)
        self.check_prompt_length(len(ids) + len(resume))
        if hold_kv and params.num_candidates != 1:
            raise InvalidRequestError("a request whose KV is handed off must have n=1 and no best_of")
        if resume and (params.num_candidates != 1 or params.guided_decoding is not None):
            raise InvalidRequestError("a resumed request must have n=1, no best_of and no guided decoding")
        if resume and params.max_tokens is not None and len(resume) >= params.max_tokens:
            raise InvalidRequestError(
                f"{len(resume)} resumed tokens leave nothing of max_tokens={params.max_tokens}")
        arrival = time.time() if arrival_time is None else arrival_time
        seqs = []
        count = params.num_candidates
        for i in range(count):
            child = params if count == 1 else params.clone(
                n=1, best_of=None, seed=None if params.seed is None else params.seed + i,
                # Candidates are ranked by cumulative logprob, which needs each token's.
                logprobs=params.logprobs if params.logprobs is not None or count == params.n else 0,
            )
            seqs.append(Sequence(request_id, i, ids, child, arrival, priority, token_ids=ids + resume,
                                 lora_request=lora_request))
        request = self._new_request(request_id, text, ids, seqs, arrival, hold_kv=hold_kv, lora_request=lora_request)
        request.params = params
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        self.requests[request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)
        self.prompt_tokens_total += len(ids)

    def _add_pooling_request(self, request_id: str, prompt: PromptType, params: PoolingParams,
                             arrival_time: float | None, priority: int) -> None:
        """Queue an embedding: a prefill of the prompt whose hidden states are pooled
        (engine/pooling.py); it ends, freeing its blocks, once the prompt is computed."""
        pooling = self.config.pooling
        if pooling is None:
            raise InvalidRequestError("this model is not served for embeddings: run the engine with "
                                      "task='embed' (the workers' --task embed)")
        if request_id in self.requests or request_id in self.held:
            raise DuplicateRequestError(request_id)
        text, ids = self.tokenize_prompt(prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        if len(ids) > self.max_model_len:
            raise InvalidRequestError(f"the prompt has {len(ids)} tokens; this model's maximum context "
                                      f"length is {self.max_model_len} tokens")
        if params.normalize is not None:
            pooling = dataclasses.replace(pooling, normalize=params.normalize)
        arrival = time.time() if arrival_time is None else arrival_time
        seq = Sequence(request_id, 0, ids, _POOLING_SAMPLING, arrival, priority, pooled=True)
        request = self._new_request(request_id, text, ids, [seq], arrival)
        request.pooler = Pooler(pooling, len(ids))
        self.requests[request_id] = request
        self.scheduler.add(seq)
        self.prompt_tokens_total += len(ids)

    def _new_request(self, request_id: str, prompt: str | None, ids: list[int], seqs: list[Sequence],
                     arrival: float, hold_kv: bool = False, lora_request=None) -> _Request:
        """A request over `seqs` with its per-request features prepared (guided decoding
        compiles its grammar here, its LoRA adapter is acquired); raises ValueError,
        keeping nothing, if one refuses it."""
        outputs = [SequenceOutput(seq, self.tokenizer, self.eos_token_ids, self.max_model_len) for seq in seqs]
        request = _Request(request_id, prompt, ids, outputs, RequestMetrics(arrival), hold_kv=hold_kv)
        self.guided.prepare(request.seqs)
        if lora_request is not None:
            lora = self.runner.lora
            if lora is None:
                raise InvalidRequestError("this request names a LoRA adapter; start the engine with enable_lora=True")
            lora.acquire(lora_request)
            request.lora_request = lora_request
        return request

    def _drop_request(self, request_id: str) -> _Request | None:
        """Take a request out of the table (finished or aborted): its adapter reference goes."""
        request = self.requests.pop(request_id, None)
        if request is not None and request.lora_request is not None:
            self.runner.lora.release(request.lora_request.lora_int_id)
        return request

    def abort_request(self, request_id: str | Iterable[str]) -> list[RequestOutput]:
        """Stop requests at any stage and free every block they hold.

        Returns the final output (finish_reason "abort") of each request that was still
        known; unknown ids are ignored.
        """
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        finals = []
        for rid in ids:
            request = self._drop_request(rid)
            self._changed.pop(rid, None)
            if request is not None:
                for seq in request.seqs:
                    if not seq.is_finished:
                        self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
                request.metrics.finished_time = time.time()
                finals.append(self._make_output(request))
            self.release_held(rid)
        return finals

    def waiting_for_adapters(self) -> bool:
        """Nothing can run until an adapter read ends: every unfinished sequence waits for
        an adapter still being read (a driver may sleep; `LoRAManager.on_read` says when)."""
        lora = self.runner.lora
        if lora is None or not lora.reads_pending() or self._changed or self.async_steps.inflight is not None:
            return False
        s = self.scheduler
        return not s.running and all(seq.lora_int_id and not lora.ready(seq.lora_int_id) for seq in s.waiting)

    def collect_adapter_reads(self) -> None:
        """Take in finished adapter reads (done before every step, and by the async engine
        when a read ends); fail the requests naming an adapter that could not be used
        (their blocks, held ones included, are freed)."""
        lora = self.runner.lora
        if lora is None or not lora.reading:
            return
        failed = lora.collect_reads()
        if failed:
            for request in list(self.requests.values()):
                if request.lora_request is not None and request.lora_request.lora_int_id in failed:
                    self._fail(request, str(failed[request.lora_request.lora_int_id]))

    def has_unfinished_requests(self) -> bool:
        # A request that finished at admission (a prefilled request whose first token ends
        # it) is no longer scheduled but still has an output for step() to deliver.
        return self.scheduler.has_unfinished() or bool(self.requests) or self.async_steps.inflight is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # -- the step ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; with nothing to run but adapters being read, wait (briefly) for a
        read to end instead, so a driver looping on step() does not spin."""
        if self.waiting_for_adapters():
            self.runner.lora.wait_for_read(timeout=0.05)
        self.collect_adapter_reads()
        if self.async_steps.inflight is not None:  # launch the next step, then finish this one
            # The launched step's batch was chosen without the scheduler; the wait for its
            # tokens (and the launch of the next) is its model time.
            started = time.perf_counter()
            batch, step_outputs = self.async_steps.advance()
            return self._process(batch, step_outputs, computed=True, forward_s=time.perf_counter() - started)
        started = time.perf_counter()
        if self.spec is not None:
            self.spec.propose(self.scheduler.running)
        batch = self.scheduler.schedule()
        scheduled = time.perf_counter()
        if not batch.seqs:
            return self._collect_outputs()
        if self.config.async_scheduling and self.async_steps.overlappable(batch, self._holds_kv):
            self.async_steps.launch(batch)
            self._account_times(batch, scheduled - started, time.perf_counter() - scheduled)
            return self._collect_outputs()
        step_outputs = self.runner.execute(batch)
        return self._process(batch, step_outputs, computed=False, schedule_s=scheduled - started,
                             forward_s=time.perf_counter() - scheduled)

    def _account_times(self, batch: ScheduledBatch, schedule_s: float, forward_s: float) -> None:
        """Add a step's scheduling and model time to each request it ran (once per request)."""
        seen = set()
        for seq in batch.seqs:
            request = self.requests.get(seq.request_id)
            if request is not None and seq.request_id not in seen:
                seen.add(seq.request_id)
                request.metrics.scheduler_time += schedule_s
                request.metrics.model_forward_time += forward_s

    def _process(self, batch: ScheduledBatch, step_outputs: list[StepOutput], computed: bool,
                 schedule_s: float = 0.0, forward_s: float = 0.0) -> list[RequestOutput]:
        """Account a step's results; `computed`: num_computed_tokens was advanced at launch."""
        now = time.time()
        self._account_times(batch, schedule_s, forward_s)
        for seq, num_new, out in zip(batch.seqs, batch.num_new_tokens, step_outputs):
            if seq.is_finished:  # its request failed earlier in this step (a sibling's error)
                continue
            request = self.requests[seq.request_id]
            self._changed[request.request_id] = request
            metrics = request.metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
                metrics.time_in_queue = now - metrics.arrival_time
            if out.prompt_logprobs is not None and request.prompt_logprobs is not None and seq.index == 0:
                # The chunk's entries are for positions start+1...; a prefill recomputed after
                # a preemption gives positions that are known already.
                known = len(request.prompt_logprobs) - (seq.num_computed_tokens + 1)
                request.prompt_logprobs.extend(out.prompt_logprobs[max(0, known):])
            if request.pooler is not None:
                self._pool(request, seq, num_new, out)
                continue
            if not computed:
                seq.num_computed_tokens += num_new
            self.block_manager.cache_computed_blocks(seq)
            if out.error is not None:
                self._fail(request, out.error)
                continue
            if out.token_id is None:
                continue
            self._append(request, seq, out.token_id, out.logprob, out.top_logprobs, now)
            for token_id, logprob, top_logprobs in out.next_tokens:  # accepted drafts and one more
                if seq.is_finished:
                    break
                self._append(request, seq, token_id, logprob, top_logprobs, now)
            if out.num_drafts:
                self.spec.accepted(seq, out.num_drafts, len(out.next_tokens))
        return self._collect_outputs()

    def _pool(self, request: _Request, seq: Sequence, num_new: int, out: StepOutput) -> None:
        """Fold a pooling sequence's step into its embedding; finish it (freeing its
        blocks) once its whole prompt was computed."""
        if out.hidden is not None:
            request.pooler.add(out.hidden, seq.num_computed_tokens)
        seq.num_computed_tokens += num_new
        if seq.num_computed_tokens >= seq.num_tokens:
            request.embedding = request.pooler.result()
            request.metrics.first_token_time = request.metrics.last_token_time = time.time()
            self._finish(request, seq, SequenceStatus.FINISHED_STOPPED)

    def _drafts(self, batch_size: int) -> bool:
        """Whether a step with `batch_size` decoding sequences drafts (speculation on, and its
        load-adaptive rule drafting at that size)."""
        return self.spec is not None and self.spec.config.num_drafts(batch_size) > 0

    def _holds_kv(self, request_id: str) -> bool:
        return self.requests[request_id].hold_kv

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
        if metrics.last_token_time != now:  # the first of this step's tokens for the request
            metrics.num_token_steps += 1
        metrics.last_token_time = now
        status = request.outputs[seq.index].on_token(token_id, grammar_done)
        if status is None and request.hold_kv:
            status = SequenceStatus.FINISHED_HANDOFF  # the decode engine takes it from here
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
            self.runner.export_kv(seq.block_table)  # from the tensor-parallel ranks' pools (TP > 1)
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
            if finished or (self.stream_outputs and not request.final_only):
                outputs.append(self._make_output(request))
            if finished:
                self._drop_request(rid)
        return outputs

    def _make_output(self, request: _Request) -> RequestOutput | EmbeddingRequestOutput:
        if request.pooler is not None:
            return EmbeddingRequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                                          EmbeddingOutput(request.embedding), request.finished,
                                          request.metrics, request.error)
        outputs = [o.completion() for o in request.outputs]
        if request.ranked:
            outputs = best_outputs(outputs, request.params)
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=outputs,
            finished=request.finished,
            metrics=request.metrics,
            prompt_logprobs=request.prompt_logprobs,
            num_cached_tokens=request.seqs[0].num_cached_tokens,
            error=request.error,
        )

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
            **({} if self.spec is None else {
                "spec_num_drafts": self.spec.stats.num_drafts,
                "spec_num_draft_tokens": self.spec.stats.num_draft_tokens,
                "spec_num_accepted_tokens": self.spec.stats.num_accepted_tokens,
            }),
            lora=self.runner.lora.stats() if self.runner.lora is not None else None,
        )


def best_outputs(outputs: list[CompletionOutput], params: SamplingParams) -> list[CompletionOutput]:
    """The `params.n` outputs with the highest cumulative logprob, best first, indexed 0..n-1;
    logprobs are dropped when the request did not ask for them (they were kept to rank)."""
    ranked = sorted(outputs, key=lambda o: o.cumulative_logprob or 0.0, reverse=True)[: params.n]
    shown = []
    for i, out in enumerate(ranked):
        if params.logprobs is None:
            out = dataclasses.replace(out, cumulative_logprob=None, logprobs=None)
        shown.append(dataclasses.replace(out, index=i))
    return shown
