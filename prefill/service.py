"""The prefill worker (`baton serve-prefill`): computes a prompt's KV, samples the first
token and pushes both into the blocks a decode worker reserved (the ticket).

The engine runs the request with the client's parameters and `hold_kv=True`: it stops after
the first token and keeps the prompt's blocks referenced until the push has finished
(`KVSender.push_held` releases them either way). The reply carries the first token and the
text the router may show for it at once; the engine produced that text as the decode engine
will (held back where a stop string could begin), so the two streams join without a seam.
Unless the output really ends on its first token (finish_reason "stop" or "length"), the
engine's finish_reason is "handoff" and the reply's chunk has none. Prompt logprobs, when
asked for, are computed here and travel in the reply's chunk. A failover
(`resume_token_ids`) prefills the prompt and the tokens already streamed; the token it
samples and pushes is the one after them, and the reply repeats them (the router drops
what the client has).
"""

from __future__ import annotations

import contextlib
import time

import grpc

from baton.kvtransfer import HandoffError, KVSender, Ticket, TransferConfig
from baton.kvtransfer.transport import sender_transports
from baton.protos import worker_pb2, worker_pb2_grpc
from baton.worker.messages import ChunkWriter
from baton.worker.servicer import EngineServicer, abort_for_engine_error

# A failed push ended the reservation (or never reached it): the router must reserve again.
_PUSH_CODES = {
    "layout_mismatch": grpc.StatusCode.FAILED_PRECONDITION,
    "transport_unavailable": grpc.StatusCode.FAILED_PRECONDITION,
    "bad_request": grpc.StatusCode.INVALID_ARGUMENT,
}


class PrefillServicer(EngineServicer):
    def __init__(self, engine, runtime):
        super().__init__(engine, runtime)
        transports = sender_transports(runtime.options.kv_transfer)
        config = TransferConfig(ucx_progress_mode=runtime.options.ucx_progress_mode,
                                keepalive=runtime.options.keepalive)
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
            if ticket.lora_name != request.lora_name:  # the decode engine would continue another model
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the reservation is for LoRA adapter {ticket.lora_name or '(none)'!r}, the "
                                    f"prefill request names {request.lora_name or '(none)'!r}")
            lora = await self.lora_request(request.lora_name, context)
            final = await self._prefill(rid, ids, list(request.resume_token_ids), params, lora, context)
            completion = final.outputs[0]
            token = completion.token_ids[-1]  # after the resumed tokens, if any
            entry = completion.logprobs[-1] if completion.logprobs else None
            first_at = time.time()
            try:
                result = await self.sender.push_held(
                    ticket, rid, token, entry.get(token) if entry else None, entry)
            except HandoffError as exc:
                code = _PUSH_CODES.get(exc.reason, grpc.StatusCode.ABORTED)
                await context.abort(code, f"KV push failed: {exc}")
            chunk = ChunkWriter(len(ids)).chunk(completion, final.num_cached_tokens, prompt_logprobs=final.prompt_logprobs)
            if chunk.finish_reason == "handoff":  # the decode worker streams the rest
                chunk.finish_reason = ""
            self.metrics.observe(arrival, first_at, time.time(), 1, chunk.finish_reason or "prefilled")
            return worker_pb2.PrefillReply(first=chunk, kv_transfer_seconds=result.seconds)

    async def _prefill(self, rid: str, ids: list[int], resume: list[int], params, lora, context):
        """Run the prompt (and the resumed tokens) through the engine, with the LoRA adapter
        `lora` (or none); returns the finished RequestOutput whose KV the engine holds.
        Cancellation aborts it and frees the blocks."""
        outputs = self.engine.generate({"prompt_token_ids": ids}, params, rid, hold_kv=True,
                                       resume_token_ids=resume, lora_request=lora)
        final = None
        async with contextlib.aclosing(outputs):
            try:
                async for out in outputs:
                    final = out
            except Exception as exc:
                await abort_for_engine_error(context, exc)
        completion = final.outputs[0] if final is not None else None
        if completion is None or len(completion.token_ids) <= len(resume) or completion.finish_reason in ("error", "abort"):
            await self.engine.run(lambda e: e.release_held(rid), always=True)
            why = (final.error if final is not None else None) or "no token was sampled"
            await context.abort(grpc.StatusCode.INTERNAL, f"prefill failed: {why}")
        return final
