"""`AsyncLLMEngine`: an `LLMEngine` driven by its own thread, used from asyncio.

The engine thread owns the engine: it applies queued commands (add, abort, reserve, ...)
between steps and runs `step()` while there is work, so the event loop never waits on the
model. When the only work left waits for LoRA adapters being read (on threads of their
own), it sleeps on the command queue until a read ends (`LoRAManager.on_read` queues a
command that takes it in) or another command comes. Outputs go back to each request's asyncio queue. A failed step fails the requests it
held (their blocks are freed) and the engine keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from baton.engine.config import EngineArgs
from baton.engine.errors import DuplicateRequestError, EngineDeadError
from baton.engine.llm_engine import LLMEngine, PromptType
from baton.engine.outputs import EmbeddingRequestOutput, RequestOutput
from baton.sampling_params import PoolingParams, SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")
__all__ = ["AsyncLLMEngine", "EngineDeadError"]


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.Queue[tuple[Callable[[LLMEngine], Any], concurrent.futures.Future]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = threading.Event()
        self.died: EngineDeadError | None = None  # why the engine thread stopped by itself
        if engine.runner.lora is not None:
            engine.runner.lora.on_read = self._wake
        self._thread = threading.Thread(target=self._run, name="baton-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> AsyncLLMEngine:
        return cls(LLMEngine.from_engine_args(engine_args))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def config(self):
        return self.engine.config

    @property
    def kv_cache(self):
        """The engine's KV pool tensor (`LLMEngine.kv_cache`: its contract says which
        blocks another thread may copy into or out of)."""
        return self.engine.kv_cache

    # -- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while not self._stopped.is_set():
            block = not engine.has_unfinished_requests() or engine.waiting_for_adapters()
            try:
                fn, fut = self._commands.get(timeout=0.1) if block else self._commands.get_nowait()
            except queue.Empty:
                fn = None
            if fn is not None:
                self._apply(fn, fut)
                while True:  # drain everything queued so far before stepping
                    try:
                        fn, fut = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    self._apply(fn, fut)
            if engine.has_unfinished_requests() and not engine.waiting_for_adapters():
                try:
                    outputs = engine.step()
                except EngineDeadError as exc:  # no step can run again (a tensor-parallel rank failed)
                    log.error("the engine died: %s", exc)
                    self.died = exc
                    break
                except Exception as exc:  # keep serving: fail only what was in flight
                    log.exception("engine step failed")
                    self._fail_all(exc)
                    continue
                for out in outputs:
                    self._deliver(out.request_id, out)
        self._stopped.set()
        dead = self.died or EngineDeadError("the engine was shut down")
        self._fail_all(dead)
        while True:  # commands queued meanwhile would otherwise wait forever
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                break
            if fut.set_running_or_notify_cancel():
                fut.set_exception(dead)

    def _wake(self) -> None:
        """Any thread (a LoRA read ended): end the engine thread's wait for commands with
        one that takes finished reads in, so an idle engine installs them too."""
        self._commands.put((lambda engine: engine.collect_adapter_reads(), concurrent.futures.Future()))

    def _apply(self, fn, fut: concurrent.futures.Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(self.engine))
        except BaseException as exc:
            fut.set_exception(exc)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _fail_all(self, exc: BaseException) -> None:
        ids = list(self.engine.requests)
        self.engine.abort_request(ids)
        for rid in list(self._streams):
            self._deliver(rid, exc)

    # -- the asyncio side ----------------------------------------------------------------

    async def run(self, fn: Callable[[LLMEngine], T], *, always: bool = False) -> T:
        """Run `fn(engine)` on the engine thread between steps; return its result.

        A caller cancelled before the engine thread reaches the command skips it: right for
        a query, or for an acquisition nobody would own. With `always` the command runs
        anyway (the caller still sees its cancellation at once): releases and aborts, which
        must not be lost because the task that asked for them was cancelled meanwhile.
        """
        if self._stopped.is_set():
            raise self.died or EngineDeadError("the engine was shut down")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, fut))
        waiter = asyncio.wrap_future(fut)
        return await (asyncio.shield(waiter) if always else waiter)

    async def _stream(self, request_id: str, add: Callable[[LLMEngine], None]) -> AsyncIterator[RequestOutput]:
        if request_id in self._streams:
            raise DuplicateRequestError(request_id)
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        finished = False
        try:
            # Once queued, the add runs even if this consumer is cancelled meanwhile (the
            # `finally` below then aborts it): skipping it would leak the blocks handed to
            # add_prefilled_request, which no one else owns any more.
            adding = asyncio.ensure_future(self.run(add))
            try:
                await asyncio.shield(adding)
            except asyncio.CancelledError:
                adding.add_done_callback(lambda t: t.cancelled() or t.exception())
                raise
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    break
        finally:
            del self._streams[request_id]
            if not finished and not self._stopped.is_set():
                # The consumer went away (client disconnect) or the add failed: free it all.
                self._commands.put((lambda e: e.abort_request(request_id), concurrent.futures.Future()))

    def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str,
        priority: int = 0,
        hold_kv: bool = False,
        resume_token_ids: list[int] | None = None,
        lora_request=None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream cumulative `RequestOutput`s until the request finishes (with the LoRA
        adapter `lora_request` names, if any).

        Raises (before the first output) DuplicateRequestError for a request id in use,
        ValueError for a bad prompt or parameters (see `LLMEngine.add_request`, also for
        `hold_kv` and `resume_token_ids`), EngineDeadError once the engine stopped. Closing
        the iterator early aborts the request and frees its blocks.
        """
        return self._stream(
            request_id,
            lambda e: e.add_request(request_id, prompt, sampling_params, priority=priority, hold_kv=hold_kv,
                                    resume_token_ids=resume_token_ids, lora_request=lora_request),
        )

    async def encode(self, prompt: PromptType, pooling_params: PoolingParams, request_id: str,
                     priority: int = 0) -> EmbeddingRequestOutput:
        """The embedding of one prompt (the engine runs with task "embed"). Raises as
        `generate` does; cancelling the call aborts the request and frees its blocks."""
        final = None
        async with contextlib.aclosing(self._stream(
                request_id, lambda e: e.add_request(request_id, prompt, pooling_params, priority=priority))) as outs:
            async for out in outs:
                final = out
        return final

    def generate_prefilled(self, request_id: str, **kwargs: Any) -> AsyncIterator[RequestOutput]:
        """Like `generate`, for a request whose prompt KV is already in reserved blocks."""
        return self._stream(request_id, lambda e: e.add_prefilled_request(request_id, **kwargs))

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with a final output whose finish_reason is "abort"."""

        def abort(engine: LLMEngine) -> None:
            for out in engine.abort_request(request_id):
                self._deliver(out.request_id, out)

        await self.run(abort, always=True)

    async def shutdown(self) -> None:
        self._stopped.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self.engine.runner.close()  # the other tensor-parallel ranks, if any

    async def wait_stopped(self) -> EngineDeadError | None:
        """Wait until the engine thread ends: the error that killed the engine (`died`), or
        None after `shutdown`."""
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        return self.died
