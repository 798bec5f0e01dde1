"""`KVSender`: the prefill side. Pushes a prompt's KV blocks into a decode worker's ticket."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from baton import tracing
from baton.kvtransfer.blocks import block_rows
from baton.kvtransfer.config import TransferConfig
from baton.kvtransfer.errors import HandoffError
from baton.kvtransfer.layout import KVLayout
from baton.kvtransfer.metrics import TransferMetrics
from baton.kvtransfer.pool import KVPool, as_pool
from baton.kvtransfer.ticket import FirstToken, Ticket
from baton.kvtransfer.transport import SenderTransport, candidates, create_sender
from baton.protos import common_pb2
from baton.protos import kvtransfer_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushResult:
    num_bytes: int
    seconds: float  # from the start of `push` to the decode worker's confirmation
    transport: str = ""  # the data plane that moved the bytes


class KVSender:
    """The prefill worker's end of KV handoffs.

    Usage (prefill worker), for a request prefilled with `hold_kv=True` (it ends after its
    first token and keeps its blocks):

        sender = KVSender(engine)
        ticket = Ticket.from_bytes(request.ticket)         # from the router
        result = await sender.push_held(ticket, request_id, first_token_id, logprob, top)
        await sender.close()                               # at shutdown

    The transport is the one the ticket names (`grpc`, `ucx`, `tcp`, `ipc`), or for an
    `auto` ticket the fastest the pair can use (`transport.candidates`); `transports` limits
    which this sender may use. Many pushes may run at once; none blocks the engine: blocks
    are read on copy threads while the engine keeps stepping (held blocks are never
    rewritten).
    """

    def __init__(self, engine, *, config: TransferConfig | None = None, registry=None,
                 model_name: str | None = None, transports: tuple[str, ...] = ("grpc", "tcp", "ipc", "ucx")):
        self.pool: KVPool = as_pool(engine)
        self.layout: KVLayout = self.pool.layout
        self.rows = block_rows(self.pool.kv)
        self.config = config or TransferConfig()
        self.allowed = tuple(transports)
        self.metrics = TransferMetrics(model_name or self.layout.model, "prefill", registry)
        self._layout_proto = self.layout.to_proto()  # in every header; built once
        self._transports: dict[str, SenderTransport] = {}
        self._aborts: set[asyncio.Task] = set()
        from baton.kvtransfer.grpc_transport import Channels

        self._channels = Channels(self.config.keepalive)

    async def push(
        self,
        ticket: Ticket | bytes,
        src_block_ids: list[int],
        first_token_id: int,
        first_logprob: float | None = None,
        first_top_logprobs: dict[int, float] | None = None,
        timeout_s: float | None = None,
    ) -> PushResult:
        """Copy `src_block_ids` (this engine's blocks, prompt order) into the ticket's blocks
        on the decode worker, then hand it the first token.

        Returns once the decode worker verified every byte. Raises HandoffError on any
        failure, after telling the decode worker (which frees the reservation). The caller
        keeps ownership of `src_block_ids` either way."""
        t0 = time.perf_counter()
        timeout = timeout_s or self.config.push_timeout_s
        try:
            if isinstance(ticket, bytes | bytearray):
                ticket = Ticket.from_bytes(bytes(ticket))
        except HandoffError as exc:
            self.metrics.failed(exc.reason)
            raise
        used: list[str] = []  # the transports tried, the last one in use
        try:
            self.layout.check_compatible(ticket.layout)
            if len(src_block_ids) != len(ticket.block_ids):
                raise HandoffError(
                    "bad_request", f"{len(src_block_ids)} source blocks for a ticket of {len(ticket.block_ids)}")
            if any(not 0 <= b < self.rows.shape[0] for b in src_block_ids):
                raise HandoffError("bad_request", "a source block id is outside this engine's KV pool")
            first = FirstToken(first_token_id, first_logprob, first_top_logprobs)
            header = self._header(ticket, list(src_block_ids), first)
            async with asyncio.timeout(timeout):
                await self._send(ticket, list(src_block_ids), header, used)
        except TimeoutError:
            err = HandoffError("timeout", f"the decode worker at {ticket.control_address} did not finish "
                                          f"the handoff within {timeout:g}s")
            self._fail(ticket, err, used)
            raise err from None
        except HandoffError as err:
            self._fail(ticket, err, used)
            raise
        except Exception as exc:  # a bug or an unexpected library error: still a clean failure
            log.exception("KV push of ticket %s failed", ticket.ticket_id)
            err = HandoffError("transport", f"the push failed here: {exc!r}")
            self._fail(ticket, err, used)
            raise err from exc
        seconds = time.perf_counter() - t0
        self.metrics.completed(used[-1], ticket.num_bytes, seconds)
        return PushResult(ticket.num_bytes, seconds, used[-1])

    async def _send(self, ticket: Ticket, src: list[int], header, used: list[str]) -> None:
        """Send over the first candidate transport that is available here (appended to
        `used` when tried); a transport that is unavailable, or whose listener cannot be
        reached, gives way to the next one (nothing was sent: the reservation is untouched)."""
        names = candidates(ticket, self.allowed)
        if not names:
            raise HandoffError("transport_unavailable",
                               f"this prefill worker may use none of the transports ticket {ticket.ticket_id} offers")
        for i, name in enumerate(names):
            used.append(name)
            try:
                await self._transport(name).send(ticket, self.rows, src, header)
                return
            except HandoffError as exc:
                usable_elsewhere = exc.reason == "transport_unavailable" or exc.nothing_sent
                if not usable_elsewhere or exc.from_peer or i == len(names) - 1:
                    raise
                log.info("KV transport %s unavailable for %s (%s); trying %s", name,
                         ticket.control_address, exc.message, names[i + 1])

    async def push_held(
        self,
        ticket: Ticket | bytes,
        request_id: str,
        first_token_id: int,
        first_logprob: float | None = None,
        first_top_logprobs: dict[int, float] | None = None,
        timeout_s: float | None = None,
    ) -> PushResult:
        """`push` the blocks the engine holds for a finished `hold_kv=True` request, and
        release them afterwards, whether the push succeeded or not."""
        try:
            blocks = await self.pool.held_blocks(request_id)
            if blocks is None:
                raise HandoffError("bad_request", f"the engine holds no KV for request {request_id!r}")
            with tracing.span("kv_transfer", **{"baton.request_id": request_id,
                                                "baton.kv_blocks": len(blocks)}):
                return await self.push(ticket, blocks, first_token_id, first_logprob,
                                       first_top_logprobs, timeout_s)
        finally:
            await self.pool.release_held(request_id)

    async def close(self) -> None:
        """Finish pending aborts and drop every connection."""
        if self._aborts:
            await asyncio.gather(*list(self._aborts), return_exceptions=True)
        for transport in self._transports.values():
            await transport.close()
        await self._channels.close()

    # -- internals -----------------------------------------------------------------------

    def _header(self, ticket: Ticket, src: list[int], first: FirstToken) -> pb.KVHandoffHeader:
        from baton.kvtransfer.blocks import segments

        staged = len(segments(src, ticket.block_ids)) > self.config.max_direct_messages
        return pb.KVHandoffHeader(
            ticket_id=ticket.ticket_id,
            layout=self._layout_proto,
            src_block_ids=src,
            num_bytes=ticket.num_bytes,
            first_token=first.to_proto(),
            staged=staged,
            max_message_bytes=self.config.max_message_bytes,
        )

    def _transport(self, name: str) -> SenderTransport:
        transport = self._transports.get(name)
        if transport is not None:
            return transport
        if name not in self.allowed:
            raise HandoffError("transport_unavailable", f"this prefill worker does not use the {name} transport")
        try:
            if name == "grpc":
                from baton.kvtransfer.grpc_transport import GrpcSender

                transport = GrpcSender(self.config, self._channels)
            else:
                transport = create_sender(name, self.config)
        except ImportError as exc:
            raise HandoffError("transport_unavailable", f"the {name} transport cannot load here: {exc}") from None
        self._transports[name] = transport
        return transport

    def _fail(self, ticket: Ticket, err: HandoffError, used: list[str]) -> None:
        self.metrics.failed(err.reason, used[-1] if used else None)
        if err.from_peer:
            return  # the decode worker failed its end already
        task = asyncio.get_running_loop().create_task(self._abort(ticket, err))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _abort(self, ticket: Ticket, err: HandoffError) -> None:
        """Tell the decode worker; best effort (it frees the blocks at expiry otherwise)."""
        request = pb.KVAbortRequest(
            ticket_id=ticket.ticket_id, error=common_pb2.Error(reason=err.reason, message=err.message))
        try:
            await self._channels.stub(ticket.control_address).Abort(request, timeout=self.config.abort_timeout_s)
        except Exception as exc:
            log.info("could not tell %s that ticket %s failed: %s", ticket.control_address, ticket.ticket_id, exc)
