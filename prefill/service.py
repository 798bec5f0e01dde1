"""The prefill worker (`baton serve-prefill`): computes a prompt's KV, samples the first
token and pushes both into the blocks a decode worker reserved (the ticket).

The engine runs the request with the client's parameters stopped after one token
(`first_token_params`) and `hold_kv=True`, so the prompt's blocks stay referenced until the
push has finished; `KVSender.push_held` releases them either way. The reply carries the
first token and the text the router may show for it at once: the same text the decode
engine will produce for that token (held back where a stop string could begin), so the two
streams join without a seam.
"""

from __future__ import annotations

import contextlib
import logging
import time

import grpc

from baton.kvtransfer import HandoffError, KVSender, Ticket, TransferConfig
from baton.protos import worker_pb2, worker_pb2_grpc
from baton.tokenizer import IncrementalDetokenizer
from baton.worker.messages import first_token_params, hold_back, logprobs_to_proto
from baton.worker.servicer import EngineServicer

log = logging.getLogger(__name__)

# A failed push ended the reservation (or never reached it): the router must reserve again.
_PUSH_CODES = {
    "layout_mismatch": grpc.StatusCode.FAILED_PRECONDITION,
    "transport_unavailable": grpc.StatusCode.FAILED_PRECONDITION,
    "bad_request": grpc.StatusCode.INVALID_ARGUMENT,
}


class PrefillServicer(EngineServicer):
    def __init__(self, engine, runtime):
        super().__init__(engine, runtime)
        transports = ("grpc", "ucx") if runtime.options.kv_transfer == "ucx" else ("grpc",)
        config = TransferConfig(ucx_progress_mode=runtime.options.ucx_progress_mode)
        self.sender = KVSender(engine, config=config, model_name=self.model_name, transports=transports)

    def register(self, server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_WorkerServicer_to_server(self, server)

    async def stop(self) -> None:
        await self.sender.close()

    async def Prefill(self, request, context) -> worker_pb2.PrefillReply:
        await self.runtime.refuse_if_draining(context)
        with self.runtime.work():
            arrival = time.time()
            rid, ids = request.request_id, list(request.prompt_token_ids)
            params = await self.parse_params(request.params, context)
            try:
                ticket = Ticket.from_bytes(request.ticket)
            except HandoffError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            final = await self._prefill(rid, ids, params, context)
            completion = final.outputs[0]
            token = completion.token_ids[0]
            entry = completion.logprobs[0] if completion.logprobs else None
            first_at = time.time()
            try:
                result = await self.sender.push_held(
                    ticket, rid, token, entry.get(token) if entry else None, entry)
            except HandoffError as exc:
                code = _PUSH_CODES.get(exc.reason, grpc.StatusCode.ABORTED)
                await context.abort(code, f"KV push failed: {exc}")
            chunk = self._first_chunk(completion, ids, params, final.num_cached_tokens)
            self.metrics.observe(arrival, first_at, time.time(), 1, chunk.finish_reason or "prefilled")
            return worker_pb2.PrefillReply(first=chunk, kv_transfer_seconds=result.seconds)

    async def _prefill(self, rid: str, ids: list[int], params, context):
        """Run the prompt through the engine; returns the finished RequestOutput whose KV
        the engine holds. Cancellation aborts it and frees the blocks."""
        outputs = self.engine.generate({"prompt_token_ids": ids}, first_token_params(params), rid, hold_kv=True)
        final = None
        async with contextlib.aclosing(outputs):
            try:
                async for out in outputs:
                    final = out
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except Exception as exc:  # EngineDeadError or a failed step
                log.error("prefill of %s failed in the engine: %s", rid, exc)
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine failed: {exc}")
        completion = final.outputs[0] if final is not None else None
        if completion is None or not completion.token_ids or completion.finish_reason in ("error", "abort"):
            await self.engine.run(lambda e: e.release_held(rid), always=True)
            why = (final.error if final is not None else None) or "no token was sampled"
            await context.abort(grpc.StatusCode.INTERNAL, f"prefill failed: {why}")
        return final

    def _first_chunk(self, completion, ids: list[int], params, num_cached: int) -> worker_pb2.GenerateChunk:
        token = completion.token_ids[0]
        max_len = self.engine.config.max_model_len
        # The engine stopped after one token because we asked it to; unless the request
        # really ends here, show the text as a running request shows it.
        continues = (completion.finish_reason == "length"
                     and (params.max_tokens is None or params.max_tokens > 1)
                     and len(ids) + 1 < max_len)
        chunk = worker_pb2.GenerateChunk(token_index=0, token_ids=[token], text_index=0,
                                         num_prompt_tokens=len(ids), num_cached_tokens=num_cached)
        if completion.logprobs:
            chunk.logprobs.append(logprobs_to_proto(completion.logprobs[0]))
        if continues:
            detok = IncrementalDetokenizer(self.engine.tokenizer, ids, params.skip_special_tokens)
            text = detok.add(token)
            keep = len(text) - hold_back(params)
            chunk.text = text[:max(0, keep)]
            return chunk
        chunk.text = completion.text
        chunk.finish_reason = completion.finish_reason or "stop"
        stop = completion.stop_reason
        if isinstance(stop, str):
            chunk.stop_string = stop
        elif isinstance(stop, int):
            chunk.stop_token_id = stop
        return chunk
