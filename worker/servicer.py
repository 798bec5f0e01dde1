"""The gRPC servicer calls every worker role shares: Info, Stats, Abort, and streaming an
engine request out as `GenerateChunk`s (used by Generate and Decode).

Engine errors become gRPC status codes by type (`engine_status`), which the router acts on:
INVALID_ARGUMENT (a 400), ALREADY_EXISTS, RESOURCE_EXHAUSTED (try elsewhere or later),
UNAVAILABLE (the engine failed or stopped: take this worker out).

Duck-typed on `baton.engine.AsyncLLMEngine` so that this module imports no torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc

from baton import __version__
from baton.engine.errors import DuplicateRequestError, NoCapacityError
from baton.metrics import EngineCollector, RequestMetrics
from baton.protos import worker_pb2, worker_pb2_grpc
from baton.sampling_params import PoolingParams, SamplingParams
from baton.worker.adapters import AdapterInUse, AdapterNotFound, AdapterTable
from baton.worker.messages import ChunkWriter, params_from_proto
from baton.worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)

ROLES = {"prefill": worker_pb2.PREFILL, "decode": worker_pb2.DECODE, "colocated": worker_pb2.COLOCATED}
# First match wins; any other exception (EngineDeadError, a failed step) is UNAVAILABLE.
_ENGINE_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (NoCapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DuplicateRequestError, grpc.StatusCode.ALREADY_EXISTS),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),  # InvalidRequestError, parameter checks
)
# How long Stats waits for the engine thread before answering with the last snapshot: a long
# step or a grammar compile must not make a healthy worker look dead to the router.
STATS_WAIT_S = 0.25


class EngineServicer(worker_pb2_grpc.WorkerServicer):
    """Base of the role servicers: owns the engine handle, the runtime and the metrics."""

    def __init__(self, engine, runtime: WorkerRuntime):
        self.engine = engine
        self.runtime = runtime
        config = engine.config
        self.role = runtime.options.role
        self.model_name = config.served_model_name
        self.metrics = RequestMetrics(self.model_name, self.role)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats_task: asyncio.Future | None = None
        self._last_stats = None
        self.adapters = AdapterTable(engine, config.lora is not None)  # LoRA adapters by name

    # -- shared calls --------------------------------------------------------------------

    async def engine_stats(self):
        """EngineStats from the engine thread, or the last snapshot if it is busy for long."""
        if self._stats_task is None or self._stats_task.done():
            self._stats_task = asyncio.ensure_future(self.engine.run(lambda e: e.stats()))
            self._stats_task.add_done_callback(self._keep_stats)
        if self._last_stats is None:
            return await asyncio.shield(self._stats_task)
        try:
            return await asyncio.wait_for(asyncio.shield(self._stats_task), STATS_WAIT_S)
        except TimeoutError:
            return self._last_stats

    def _keep_stats(self, task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is None:
            self._last_stats = task.result()

    async def Info(self, request, context) -> worker_pb2.WorkerInfo:
        config = self.engine.config
        stats = await self.engine_stats()
        return worker_pb2.WorkerInfo(
            role=ROLES[self.role],
            model_name=self.model_name,
            max_model_len=config.max_model_len,
            block_size=config.block_size,
            vocab_size=config.vocab_size,
            kv_transfer="" if self.role == "colocated" else self.runtime.options.kv_transfer,
            num_blocks=stats.num_blocks,
            version=__version__,
            max_num_seqs=config.max_num_seqs,
            task=config.task,
            cell=self.runtime.options.cell,
        )

    async def Stats(self, request, context) -> worker_pb2.LoadStats:
        s = await self.engine_stats()
        return worker_pb2.LoadStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_cache_usage=s.kv_cache_usage,
            num_free_blocks=s.num_free_blocks,
            num_blocks=s.num_blocks,
            draining=self.runtime.draining,
            num_in_flight=self.runtime.in_flight,
            lora_adapters=self.adapters.names,
            lora_resident=sorted(set(s.lora.cached) & set(self.adapters.names)) if s.lora else [],
        )

    async def Abort(self, request, context) -> worker_pb2.AbortReply:
        rid = request.request_id
        found = await self.engine.run(lambda e: rid in e.requests or e.held_blocks(rid) is not None)
        await self.engine.abort(rid)  # a stream of the request ends with finish_reason "abort"
        return worker_pb2.AbortReply(found=found)

    async def Embed(self, request, context) -> worker_pb2.EmbedReply:
        """One prompt's embedding (engine/pooling.py); cancelling the call frees its blocks."""
        if self.engine.config.task != "embed":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this worker is not run for embeddings (start it with --task embed)")
        await self.runtime.refuse_if_draining(context)
        with self.runtime.work():
            normalize = request.normalize if request.HasField("normalize") else None
            ids = list(request.prompt_token_ids)
            try:
                out = await self.engine.encode({"prompt_token_ids": ids}, PoolingParams(normalize=normalize),
                                               request.request_id)
            except Exception as exc:
                await abort_for_engine_error(context, exc)
            if out is None or out.outputs.embedding is None:
                await context.abort(grpc.StatusCode.INTERNAL, f"embedding failed: {out.error if out else 'no output'}")
            return worker_pb2.EmbedReply(embedding=out.outputs.embedding, num_prompt_tokens=len(ids))

    async def LoadAdapter(self, request, context) -> worker_pb2.AdapterReply:
        try:
            await self.adapters.load(request.lora_name, request.lora_path)
        except ValueError as exc:
            code = (grpc.StatusCode.FAILED_PRECONDITION if not self.adapters.enabled
                    else grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort(code, str(exc))
        log.info("LoRA adapter %r loaded from %s", request.lora_name, request.lora_path)
        return worker_pb2.AdapterReply(lora_adapters=self.adapters.names)

    async def UnloadAdapter(self, request, context) -> worker_pb2.AdapterReply:
        try:
            await self.adapters.unload(request.lora_name)
        except AdapterNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except AdapterInUse as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        log.info("LoRA adapter %r unloaded", request.lora_name)
        return worker_pb2.AdapterReply(lora_adapters=self.adapters.names)

    # -- helpers for the role servicers --------------------------------------------------

    async def lora_request(self, name: str, context):
        """The `LoRARequest` a call names (None: the base model); INVALID_ARGUMENT for a
        name this worker does not serve."""
        try:
            return self.adapters.resolve(name)
        except AdapterNotFound as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def collector(self) -> EngineCollector:
        """Engine gauges for /metrics; must be created on the serving event loop."""
        self._loop = asyncio.get_running_loop()
        return EngineCollector(self._snapshot, self.model_name, self.role)

    def _snapshot(self):
        # Runs on the scrape thread: ask the engine thread through the event loop.
        if self._loop is None or self._loop.is_closed():
            return None
        future = asyncio.run_coroutine_threadsafe(self.engine_stats(), self._loop)
        return future.result(timeout=5)

    async def serve_generate(self, request, context) -> AsyncIterator[worker_pb2.GenerateChunk]:
        """Generate: run a whole request (resumed from `request.resume_token_ids`, if any)
        in this worker's engine. Colocated workers serve it; decode workers too, for the
        router's local prefill and failover."""
        await self.runtime.refuse_if_draining(context)
        with self.runtime.work():
            arrival = time.time()
            params = await self.parse_params(request.params, context)
            lora = await self.lora_request(request.lora_name, context)
            ids = list(request.prompt_token_ids)
            outputs = self.engine.generate({"prompt_token_ids": ids}, params, request.request_id,
                                           resume_token_ids=list(request.resume_token_ids), lora_request=lora)
            async for chunk in self.stream_outputs(outputs, context, arrival, len(ids)):
                yield chunk

    async def parse_params(self, msg, context) -> SamplingParams:
        try:
            return params_from_proto(msg)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # unreachable: abort raises

    async def stream_outputs(
        self, outputs: AsyncIterator, context, arrival: float, num_prompt_tokens: int
    ) -> AsyncIterator[worker_pb2.GenerateChunk]:
        """Turn an engine stream of cumulative RequestOutputs into delta chunks.

        Closing the engine stream (also on cancellation) aborts the request in the engine.
        An engine error aborts the call with its `engine_status`.
        """
        writer = ChunkWriter(num_prompt_tokens)
        first_token_at: float | None = None
        completion = None
        async with contextlib.aclosing(outputs):
            try:
                async for out in outputs:
                    completion = out.outputs[0]
                    if first_token_at is None and completion.token_ids:
                        first_token_at = time.time()
                    chunk = writer.chunk(completion, out.num_cached_tokens, out.error, out.prompt_logprobs)
                    if chunk is not None:
                        yield chunk
            except Exception as exc:
                await abort_for_engine_error(context, exc)
        if completion is not None:
            self.metrics.observe(arrival, first_token_at, time.time(), len(completion.token_ids),
                                 completion.finish_reason)


def engine_status(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for an exception raised by the engine, by its type."""
    for kind, code in _ENGINE_CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.UNAVAILABLE


async def abort_for_engine_error(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """End the call with the engine error's status (raises, as `context.abort` does)."""
    code = engine_status(exc)
    message = str(exc)
    if code is grpc.StatusCode.UNAVAILABLE:
        log.error("request failed in the engine: %s", exc)
        message = f"engine failed: {exc}"
    await context.abort(code, message)
