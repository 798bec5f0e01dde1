"""The decode worker (`baton serve-decode`): reserves KV blocks for prompts computed
elsewhere, receives their KV through `baton.kvtransfer`, and streams the rest of each output.

It also serves `Generate` (a whole request, prefilled here) for the router's local prefill
and decode failover (docs/architecture.md).

Reserve -> (a prefill worker pushes the KV and the first token) -> Decode. A Decode call
waits for its reservation's handoff, admits the request into the running batch with
`generate_prefilled` and streams every token, the first one included. Cancelling Decode
(or Abort) frees the reservation or the running request; the receiver frees reservations
nobody fills or claims in time.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from baton import settings
from baton.kvtransfer import HandoffError, KVReceiver, TransferConfig
from baton.protos import worker_pb2, worker_pb2_grpc
from baton.worker.servicer import EngineServicer

log = logging.getLogger(__name__)

_RESERVE_CODES = {
    "no_capacity": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "bad_request": grpc.StatusCode.INVALID_ARGUMENT,
    "shutdown": grpc.StatusCode.UNAVAILABLE,
}


def advertise_host(bind_host: str, explicit: str | None) -> str:
    """The address prefill workers use to reach this worker: --advertise-host, $POD_IP, or
    the bind address when it is a concrete one (else loopback, for one machine)."""
    if explicit:
        return explicit
    pod_ip = settings.pod_ip()
    if pod_ip:
        return pod_ip
    return bind_host if bind_host not in ("0.0.0.0", "::", "") else "127.0.0.1"


class DecodeServicer(EngineServicer):
    def __init__(self, engine, runtime):
        super().__init__(engine, runtime)
        opts = runtime.options
        self.receiver = KVReceiver(
            engine, opts.kv_transfer,
            advertise_host=advertise_host(opts.host, opts.advertise_host),
            ucx_port=opts.kv_port,
            tcp_port=opts.kv_tcp_port,
            default_ttl_s=opts.reservation_ttl_seconds,
            config=TransferConfig(ucx_progress_mode=opts.ucx_progress_mode, keepalive=opts.keepalive),
            model_name=self.model_name,
        )

    def register(self, server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_WorkerServicer_to_server(self, server)
        self.receiver.add_to_server(server)

    async def start(self) -> None:
        await self.receiver.start(self.runtime.port)
        self.runtime.kv_address = self.receiver.ucx_address or self.receiver.tcp_address or None

    async def stop(self) -> None:
        await self.receiver.stop()

    async def Reserve(self, request, context) -> worker_pb2.ReserveReply:
        await self.runtime.refuse_if_draining(context)
        with self.runtime.work():
            ttl = request.ttl_seconds or None
            lora = await self.lora_request(request.lora_name, context)  # refused before blocks are taken
            if lora is not None:  # an adapter the host LRU dropped is read while the prefill runs
                self.adapters.prefetch(lora)
            try:
                ticket = await self.receiver.reserve(request.request_id, request.num_prompt_tokens, ttl,
                                                     lora_name=request.lora_name)
            except HandoffError as exc:
                code = _RESERVE_CODES.get(exc.reason, grpc.StatusCode.UNAVAILABLE)
                await context.abort(code, str(exc))
            return worker_pb2.ReserveReply(ticket_id=ticket.ticket_id, ticket=ticket.to_bytes())

    async def Decode(self, request, context):
        # Not refused while draining: its reservation was accepted before the drain began.
        with self.runtime.work():
            arrival = time.time()
            rid, ticket_id = request.request_id, request.ticket_id
            try:
                params = await self.parse_params(request.params, context)
                lora = await self.lora_request(request.lora_name, context)
            except BaseException:
                await self.receiver.cancel(ticket_id, "the decode parameters were invalid")
                raise
            try:
                handoff = await self.receiver.wait(ticket_id)
            except HandoffError as exc:
                # ABORTED: the handoff failed; the router may reserve again and retry.
                await context.abort(grpc.StatusCode.ABORTED, f"KV handoff failed: {exc}")
            except asyncio.CancelledError:
                await asyncio.shield(self.receiver.cancel(ticket_id, "the router cancelled the request"))
                raise
            ids, resume = list(request.prompt_token_ids), list(request.resume_token_ids)
            if len(ids) + len(resume) != handoff.num_tokens:
                await self.receiver.release(handoff)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{len(ids)} prompt and {len(resume)} resumed tokens for a reservation "
                                    f"of {handoff.num_tokens}")
            # The engine owns the blocks from this call on, even if it refuses the request.
            outputs = self.engine.generate_prefilled(
                rid, prompt_token_ids=ids, params=params, resume_token_ids=resume, lora_request=lora,
                **handoff.prefilled_kwargs())
            async for chunk in self.stream_outputs(outputs, context, arrival, len(ids)):
                yield chunk

    async def Generate(self, request, context):
        # A whole request on this worker: the router's local prefill and decode failover.
        async for chunk in self.serve_generate(request, context):
            yield chunk

    async def Abort(self, request, context) -> worker_pb2.AbortReply:
        cancelled = await self.receiver.cancel_request(request.request_id, "aborted by the router")
        reply = await super().Abort(request, context)
        return worker_pb2.AbortReply(found=reply.found or cancelled)
