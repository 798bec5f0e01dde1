"""Serving `/v1/completions` and `/v1/chat/completions`: request -> streams -> response.

The order of checks decides the status a client sees: unknown model 404; no healthy
worker 503; bad parameters or a prompt too long 400; saturated 429. Every check runs
before the first byte of a response, and a stream's first output is awaited before the
200 is committed, so an error at admission (reservation refused, prompt too long for the
KV cache) is still a proper HTTP status. Errors after that arrive as an SSE `error` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from baton.metrics import RequestMetrics
from baton.router.dispatch import Delta, Dispatcher
from baton.router.errors import APIError, bad_request, model_not_found, no_worker
from baton.router.fanout import ClientGone, FanOut, Job
from baton.router.params import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    Prompt,
    chat_echo,
    chat_messages,
    chat_options,
    chat_role,
    chat_text,
    chat_text_bytes,
    check_length,
    check_request_template,
    completion_inputs,
    content_length,
    guided_error,
    num_candidates,
    prompt_error,
    sampling_params,
    truncated,
    truncation,
)
from baton.router.protocol import ChatCompletionRequest, CompletionRequest
from baton.router.responses import ResponseBuilder, best_of, sse
from baton.router.tools import plan_tools
from baton.router.workers import WorkerPool
from baton.tokenizer import ChatTemplateError, ChildEncoder, Tokenizer, TooManyTokens
from baton.worker.messages import OutputState

log = logging.getLogger(__name__)

MAX_STREAMS = 256  # outputs (prompts x n) one request may ask for
PREPARE_THREADS = 2  # prompts templated or tokenised at once, off the event loop
LARGE_TEXT_CHARS = 1 << 16  # longer prompts are tokenised in a child process


class _Timing:
    """Per-choice timestamps for the router's latency metrics (the client's view)."""

    def __init__(self, metrics: RequestMetrics, prompt_tokens: dict[int, int]):
        self.metrics = metrics
        self.arrival = time.time()
        self.first: dict[int, float] = {}
        self.prompt_tokens = prompt_tokens

    def on_delta(self, index: int, delta: Delta) -> None:
        if delta.token_ids and index not in self.first:
            self.first[index] = time.time()
        if delta.finished:
            state = delta.state
            self.metrics.observe(self.arrival, self.first.get(index), time.time(), len(state.token_ids),
                                 state.finish_reason, self.prompt_tokens.get(index, 0))


class OpenAIServing:
    def __init__(self, tokenizer: Tokenizer, pool: WorkerPool, dispatcher: Dispatcher,
                 served_model_names: tuple[str, ...], metrics: RequestMetrics,
                 tool_call_parser: str | None = None, enable_auto_tool_choice: bool = False,
                 trust_request_chat_template: bool = False):
        self.trust_request_chat_template = trust_request_chat_template
        self.tokenizer = tokenizer
        self.tool_call_parser = tool_call_parser
        self.enable_auto_tool_choice = enable_auto_tool_choice
        self.pool = pool
        self.dispatcher = dispatcher
        self.served = served_model_names
        self.metrics = metrics
        self._prepare = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="prepare")
        self._child = ChildEncoder(tokenizer)

    def close(self) -> None:
        self._prepare.shutdown(wait=False, cancel_futures=True)
        self._child.close()

    async def _off_loop(self, fn, *args):
        """Run blocking prompt preparation on the preparation threads: a megabyte-sized prompt
        must not stall the event loop, /health included."""
        return await asyncio.get_running_loop().run_in_executor(self._prepare, fn, *args)

    async def encode(self, text: str, param: str, max_model_len: int | None,
                     add_special_tokens: bool = True) -> list[int]:
        """Tokenise one prompt off the event loop: on a thread, or in the tokenizer's child
        process when it is long (there the result's Python objects cannot hold the GIL, and
        small requests never queue behind it). Raises the 400 for a bad prompt, or one longer
        than `max_model_len` (None: no limit)."""
        try:
            if len(text) > LARGE_TEXT_CHARS:
                return await self._child.encode(text, add_special_tokens, max_model_len)
            return await self._off_loop(self.tokenizer.encode, text, add_special_tokens, max_model_len)
        except ValueError as exc:
            raise prompt_error(exc, param, max_model_len or 0) from None

    async def _encode_large_chat(self, body: ChatCompletionRequest, max_model_len: int | None) -> list[int]:
        """A long conversation's prompt ids, rendered and tokenised in the tokenizer's child:
        here its template would copy every content holding the GIL. One that cannot fit
        `max_model_len` (None: no limit) is refused by its length first, before anything
        renders it whole."""
        size = await self._off_loop(chat_text_bytes, body, self.tokenizer) if max_model_len is not None else None
        if size is not None:
            try:
                self.tokenizer.check_size(size, max_model_len)
            except TooManyTokens as exc:
                raise prompt_error(exc, "messages", max_model_len) from None
        messages, kwargs = await self._off_loop(chat_messages, body)
        try:
            return await self._child.encode_chat(messages, chat_options(body), kwargs, max_model_len,
                                                 body.add_special_tokens)
        except ChatTemplateError as exc:
            raise bad_request(f"cannot apply the chat template: {exc}", "messages") from None
        except ValueError as exc:
            raise prompt_error(exc, "messages", max_model_len or 0) from None

    def limits(self) -> tuple[int, int]:
        """(max_model_len, vocab_size) the workers report; 503 while no worker is known."""
        limits = self.pool.model_limits(self.dispatcher.roles)
        if limits is None:
            raise no_worker(self.dispatcher.roles[-1])
        return limits

    def _lora_name(self, model: str) -> str:
        """The LoRA adapter the request's `model` names ("": the base model); 404 for a
        name that is neither (adapters: those every role has a worker serving)."""
        if model in self.served:
            return ""
        adapters = self.pool.adapters(self.dispatcher.roles)
        if model in adapters:
            return model
        raise model_not_found(model, list(self.served) + sorted(adapters))

    async def serve(self, body: CompletionRequest | ChatCompletionRequest, request: Request) -> Response:
        chat = isinstance(body, ChatCompletionRequest)
        lora_name = self._lora_name(body.model)
        max_model_len, vocab_size = self.limits()
        tools = plan_tools(body, self.tool_call_parser, self.enable_auto_tool_choice) if chat else None
        keep = truncation(body, max_model_len)
        # A prompt to truncate may be longer than the context: it is tokenised whole.
        limit = max_model_len if keep is None else None
        if chat:
            await self._off_loop(check_request_template, body, self.trust_request_chat_template)
            if content_length(body) > LARGE_TEXT_CHARS:
                prompts = [Prompt(await self._encode_large_chat(body, limit))]
            else:
                text = await self._off_loop(chat_text, body, self.tokenizer)
                prompts = [Prompt(await self.encode(text, "messages", limit, body.add_special_tokens), text)]
            max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            param = "messages"
        else:
            inputs = completion_inputs(body, vocab_size)
            prompts = [Prompt(await self.encode(x, "prompt" if len(inputs) == 1 else f"prompt.{i}", limit,
                                                body.add_special_tokens), x)
                       if isinstance(x, str) else Prompt(x) for i, x in enumerate(inputs)]
            max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
            logprobs = body.logprobs
            param = "prompt"
        prompts = [truncated(p, keep) for p in prompts]
        candidates = num_candidates(body)  # outputs run per prompt: best_of or n
        if len(prompts) * candidates > MAX_STREAMS:
            name = "best_of" if candidates > body.n else "n"
            raise bad_request(f"{len(prompts)} prompt(s) x {name}={candidates} outputs exceed {MAX_STREAMS} "
                              "per request", name)
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{body.request_id or uuid.uuid4().hex}"
        # A client's id may come twice at once (here or at another router): the engines' ids,
        # which aborts name, stay unique and still carry it.
        stream_id = response_id if body.request_id is None else f"{response_id}.{uuid.uuid4().hex[:12]}"
        jobs: list[Job] = []
        prompt_tokens: dict[int, int] = {}
        params = None
        for p_index, prompt in enumerate(prompts):
            limit = check_length(len(prompt.token_ids), max_tokens, max_model_len, param)
            params = sampling_params(body, limit, logprobs, vocab_size, tools.guided if tools else None)
            for i in range(candidates):
                index = p_index * candidates + i
                seeded = params if params.seed is None or i == 0 else params.clone(seed=(params.seed + i) % 2**63)
                jobs.append(Job(index, f"{stream_id}-{index}", prompt.token_ids, seeded, lora_name))
                prompt_tokens[index] = len(prompt.token_ids) if i == 0 else 0
        ticket = self.dispatcher.admit([len(p.token_ids) for p in prompts], len(jobs))
        log.debug("%s: %d prompt(s), %d stream(s)%s", stream_id, len(prompts), len(jobs),
                  f", user {body.user!r}" if body.user else "")
        builder = ResponseBuilder(
            chat=chat, response_id=response_id, model=body.model, tokenizer=self.tokenizer,
            prompt_token_counts=[len(p.token_ids) for p in prompts], n=body.n,
            logprobs=logprobs is not None, top_logprobs=logprobs or 0, tools=tools,
            include_usage=bool(body.stream and body.stream_options and body.stream_options.include_usage),
            prompts=prompts, echo=body.echo and not chat, prompt_logprobs=body.prompt_logprobs,
            role=chat_role(body) if chat else "assistant", chat_echo=chat_echo(body) if chat else "",
            return_token_ids=body.return_token_ids, tokens_as_ids=bool(body.return_tokens_as_token_ids),
            computed_prompt_logprobs=(params.prompt_logprobs or 0) if params is not None else 0)
        timing = _Timing(self.metrics, prompt_tokens)
        fan = FanOut(self.dispatcher, jobs, ticket)
        fan.start()
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(request, fan))
        try:
            await fan.first()
        except ClientGone:
            await fan.close()
            return Response(status_code=499)  # nobody is listening any more
        except APIError as exc:
            watcher.cancel()
            await fan.close()
            raise guided_error(exc, body) from None
        except BaseException:
            watcher.cancel()
            await fan.close()
            raise
        if body.stream:
            return StreamingResponse(self._stream(fan, builder, timing, watcher),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            states = await self._collect(fan, timing)
        except ClientGone:
            return Response(status_code=499)
        finally:
            watcher.cancel()
            await fan.close()
        if candidates > body.n:
            return JSONResponse(builder.response(best_of(states, len(prompts), candidates, body.n),
                                                 generated=list(states.values())))
        return JSONResponse(builder.response(states))

    async def _collect(self, fan: FanOut, timing: _Timing) -> dict[int, OutputState]:
        states: dict[int, OutputState] = {}
        async for index, delta in fan.events():
            states[index] = delta.state
            timing.on_delta(index, delta)
        return states

    async def _stream(self, fan: FanOut, builder: ResponseBuilder, timing: _Timing,
                      watcher: asyncio.Task) -> AsyncIterator[bytes]:
        states: dict[int, OutputState] = {}
        try:
            async for index, delta in fan.events():
                states[index] = delta.state
                timing.on_delta(index, delta)
                for chunk in builder.stream_chunks(index, delta):
                    yield sse(chunk)
            if builder.include_usage:
                yield sse(builder.usage_chunk(states))
            yield sse("[DONE]")
        except ClientGone:
            return
        except APIError as exc:
            # The 200 is already sent: report the failure in the stream, as vLLM does.
            yield sse(exc.body())
            yield sse("[DONE]")
        finally:
            watcher.cancel()
            await fan.close()


async def _watch_disconnect(request: Request, fan: FanOut) -> None:
    """Cancel the streams as soon as the client goes away (also while nothing is sent)."""
    with contextlib.suppress(asyncio.CancelledError):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                fan.client_gone()
                return
