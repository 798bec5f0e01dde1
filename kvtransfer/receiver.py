"""`KVReceiver`: the decode side. Reserves blocks, lets a sender fill them, hands them over.

A reservation (`Slot`) lives through these states, all changed on the event loop thread:

    RESERVED --begin--> RECEIVING --complete--> DONE --wait--> (claimed: the caller owns it)
        \\______________________\\____________________\\--> FAILED (blocks released)

Expiry, `cancel`, a sender's Abort, a lost sender, a bad chunk: each fails the slot. A failed
slot's blocks go back to the pool once no copy into them is in flight (`writing`), so a late
write can never land in blocks that someone else already got.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from baton.kvtransfer.blocks import block_rows
from baton.kvtransfer.config import TransferConfig
from baton.kvtransfer.errors import HandoffError
from baton.kvtransfer.layout import KVLayout
from baton.kvtransfer.metrics import TransferMetrics
from baton.kvtransfer.pool import KVPool, as_pool
from baton.kvtransfer.ticket import FirstToken, Handoff, Ticket
from baton.kvtransfer.transport import create_receiver, ucx_for_auto

# What a decode worker's tickets may ask for ("ipc" is offered by "auto").
RECEIVER_TRANSPORTS = ("grpc", "ucx", "tcp", "auto")

log = logging.getLogger(__name__)
_ENDED_MEMORY = 4096  # failed ticket ids remembered, so late callers get the real reason


class State(enum.Enum):
    RESERVED = "reserved"
    RECEIVING = "receiving"
    DONE = "done"
    FAILED = "failed"
    CLAIMED = "claimed"


class Slot:
    """One reservation on the decode side (touched only on the event loop thread)."""

    def __init__(self, ticket: Ticket):
        self.ticket = ticket
        self.state = State.RESERVED
        self.error: HandoffError | None = None
        self.handoff: Handoff | None = None
        self.first_token: FirstToken | None = None
        self.settled = asyncio.Event()
        self.writers = 0
        self.released = False
        self.abort_hooks: list[Callable[[], None]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.started = 0.0
        self.waiting = False
        self.transport: str | None = None  # the data plane filling it, from `begin`


class KVReceiver:
    """The decode worker's end of KV handoffs.

    Usage (decode worker):

        receiver = KVReceiver(engine, transport="ucx", advertise_host=pod_ip)
        receiver.add_to_server(grpc_server)          # before grpc_server.start()
        await receiver.start(grpc_port)
        ticket = await receiver.reserve(request_id, num_prompt_tokens)   # -> router
        handoff = await receiver.wait(ticket.ticket_id)   # the sender filled it
        async for out in engine.generate_prefilled(request_id, prompt_token_ids=ids,
                                                   params=params, **handoff.prefilled_kwargs()):
            ...
        await receiver.stop()

    `engine` is an `AsyncLLMEngine` (or any `KVPool`). Every decode worker accepts `grpc`
    pushes; `transport` is the data plane its tickets ask for ("grpc", "ucx", "tcp", or
    "auto": the sender picks among what this worker offers). "tcp" and "auto" open the KV
    TCP listener on `tcp_port` (0: any free port); "auto" also exports the pool for `ipc`
    senders on this node, and opens a UCX listener where UCX has an RDMA device. All
    methods are called from the event loop that runs the gRPC server.
    """

    def __init__(
        self,
        engine,
        transport: str = "grpc",
        *,
        advertise_host: str = "127.0.0.1",
        ucx_port: int = 0,
        tcp_port: int = 0,
        default_ttl_s: float = 30.0,
        config: TransferConfig | None = None,
        registry=None,
        model_name: str | None = None,
    ):
        if transport not in RECEIVER_TRANSPORTS:
            raise ValueError(f"transport must be one of {RECEIVER_TRANSPORTS}, got {transport!r}")
        if default_ttl_s <= 0:
            raise ValueError(f"default_ttl_s must be > 0, got {default_ttl_s}")
        self.pool: KVPool = as_pool(engine)
        self.layout: KVLayout = self.pool.layout
        self.rows = block_rows(self.pool.kv)
        self.transport = transport
        self.advertise_host = advertise_host
        self.ucx_port = ucx_port
        self.tcp_port = tcp_port
        self.default_ttl_s = default_ttl_s
        self.config = config or TransferConfig()
        self.metrics = TransferMetrics(model_name or self.layout.model, "decode", registry)
        self.copy_pool = ThreadPoolExecutor(self.config.copy_threads, thread_name_prefix="kv-recv")
        self.control_address = ""
        self.ucx_address = ""
        self.tcp_address = ""
        self.ipc_domain = ""
        self._slots: dict[str, Slot] = {}
        self._ended: OrderedDict[str, HandoffError] = OrderedDict()
        self._releases: set[asyncio.Task] = set()
        self._unfilled_blocks = 0
        self.metrics.set_reserved_blocks(0)
        self._grpc = create_receiver("grpc", self)
        self._ucx = create_receiver("ucx", self) if transport == "ucx" or (
            transport == "auto" and ucx_for_auto()) else None
        self._socket = create_receiver("tcp", self) if transport in ("tcp", "auto") else None
        self._started = False

    # -- lifecycle -----------------------------------------------------------------------

    def add_to_server(self, server) -> None:
        """Register the worker-to-worker `baton.v1.KVTransfer` service on a `grpc.aio.Server`."""
        from baton.kvtransfer.service import add_service

        add_service(server, self, self._grpc)

    async def start(self, grpc_port: int) -> None:
        """Start taking pushes; `grpc_port` is the port the gRPC server listens on."""
        self.control_address = f"{self.advertise_host}:{grpc_port}"
        if self._ucx is not None:
            self.ucx_address = await self._ucx.start(self.advertise_host, self.ucx_port)
        if self._socket is not None:
            self.tcp_address = await self._socket.start(self.advertise_host, self.tcp_port)
        if self.transport == "auto":
            await self._export_pool()
        self._started = True

    async def stop(self) -> None:
        """Fail every open reservation (reason "shutdown") and wait until its blocks are back."""
        self._started = False
        for slot in list(self._slots.values()):
            self.fail(slot, HandoffError("shutdown", "the decode worker is shutting down"))
        if self._ucx is not None:
            await self._ucx.stop()
        if self._socket is not None:
            await self._socket.stop()
        while self._releases:
            await asyncio.gather(*list(self._releases), return_exceptions=True)
        self.copy_pool.shutdown(wait=True)

    # -- the decode worker's API ---------------------------------------------------------

    @property
    def reserved_blocks(self) -> int:
        """Blocks reserved for handoffs that have not been filled yet."""
        return self._unfilled_blocks

    async def reserve(self, request_id: str, num_prompt_tokens: int, ttl_s: float | None = None,
                      lora_name: str = "") -> Ticket:
        """Reserve blocks for a prompt of `num_prompt_tokens` tokens; return the ticket
        (which carries `lora_name`, the request's LoRA adapter, to the prefill worker).

        Raises HandoffError("no_capacity") when the pool has no room now (try later or
        elsewhere) and ("bad_request") for a prompt that can never fit. The blocks come back
        unless the ticket is filled and claimed by `wait` within `ttl_s` (default
        `default_ttl_s`)."""
        if not self._started:
            raise HandoffError("shutdown", "the KV receiver is not started")
        ttl = self.default_ttl_s if ttl_s is None or ttl_s <= 0 else ttl_s
        block_ids = await self.pool.reserve(num_prompt_tokens)
        ticket = Ticket(
            ticket_id=uuid.uuid4().hex,
            request_id=request_id,
            control_address=self.control_address,
            transport=self.transport,
            ucx_address=self.ucx_address,
            tcp_address=self.tcp_address,
            ipc_domain=self.ipc_domain,
            block_ids=tuple(block_ids),
            layout=self.layout,
            num_tokens=num_prompt_tokens,
            expires_at=time.time() + ttl,
            lora_name=lora_name,
        )
        slot = Slot(ticket)
        self._slots[ticket.ticket_id] = slot
        slot.timer = asyncio.get_running_loop().call_later(ttl, self._expire, slot)
        self._count_unfilled(len(block_ids))
        return ticket

    async def wait(self, ticket_id: str, timeout_s: float | None = None) -> Handoff:
        """Wait until the ticket's KV arrived and was verified; the caller then owns its blocks.

        Raises HandoffError with the reason the handoff failed ("timeout" if `timeout_s`
        passes first; the reservation stays open then). One caller may wait per ticket."""
        slot = self._slots.get(ticket_id)
        if slot is None:
            raise self._ended.get(ticket_id) or HandoffError("unknown_ticket", f"no reservation {ticket_id!r}")
        if slot.waiting:
            raise HandoffError("busy", f"someone is already waiting for reservation {ticket_id!r}")
        slot.waiting = True
        try:
            await asyncio.wait_for(slot.settled.wait(), timeout_s)
        except TimeoutError:
            raise HandoffError("timeout", f"reservation {ticket_id!r} was not filled within {timeout_s}s") from None
        finally:
            slot.waiting = False
        if slot.state is not State.DONE:
            raise slot.error
        slot.state = State.CLAIMED
        slot.timer.cancel()
        del self._slots[ticket_id]
        return slot.handoff

    async def cancel(self, ticket_id: str, message: str = "") -> bool:
        """Fail an open reservation (reason "cancelled") and free its blocks; False if unknown."""
        slot = self._slots.get(ticket_id)
        if slot is None:
            return False
        self.fail(slot, HandoffError("cancelled", message or "the decode worker cancelled the reservation"))
        return True

    async def cancel_request(self, request_id: str, message: str = "") -> bool:
        """`cancel` every open reservation made for `request_id`; False if there was none."""
        slots = [s for s in self._slots.values() if s.ticket.request_id == request_id]
        for slot in slots:
            self.fail(slot, HandoffError("cancelled", message or f"request {request_id!r} was cancelled"))
        return bool(slots)

    async def release(self, handoff: Handoff) -> None:
        """Give back the blocks of a claimed handoff that will not be admitted."""
        await self.pool.release(list(handoff.block_ids))

    # -- the transports' API -------------------------------------------------------------

    def begin(self, header, transport: str = "grpc") -> Slot:
        """A sender opens a handoff (`KVHandoffHeader`) over `transport`; returns the slot it
        may now fill.

        Raises HandoffError; a header that does not fit its reservation also fails it."""
        tid = header.ticket_id
        slot = self._slots.get(tid)
        if slot is None:
            raise self._ended.get(tid) or HandoffError("unknown_ticket", f"no reservation {tid!r}")
        if slot.state is not State.RESERVED:
            raise HandoffError("busy", f"reservation {tid!r} is already {slot.state.value}")
        slot.transport = transport
        try:
            try:
                theirs = KVLayout.from_proto(header.layout)
            except ValueError as exc:
                raise HandoffError("bad_request", f"the sender's layout is invalid: {exc}") from None
            self.layout.check_compatible(theirs)
            n = len(slot.ticket.block_ids)
            if len(header.src_block_ids) != n or header.num_bytes != n * self.layout.block_bytes:
                raise HandoffError(
                    "bad_request",
                    f"the sender offers {len(header.src_block_ids)} blocks ({header.num_bytes} bytes) "
                    f"for a reservation of {n} blocks",
                )
        except HandoffError as exc:
            self.fail(slot, exc)
            raise
        slot.state = State.RECEIVING
        slot.started = time.perf_counter()
        slot.first_token = FirstToken.from_proto(header.first_token)
        return slot

    @contextlib.asynccontextmanager
    async def writing(self, slot: Slot) -> AsyncIterator[None]:
        """Hold while bytes may be landing in the slot's blocks: a failure waits for it."""
        if slot.state is not State.RECEIVING:
            raise slot.error or HandoffError("bad_request", f"reservation is {slot.state.value}")
        slot.writers += 1
        try:
            yield
        finally:
            slot.writers -= 1
            self._maybe_release(slot)

    def complete(self, slot: Slot) -> Handoff:
        """Every byte arrived and was verified (device copies synchronised): hand it over."""
        if slot.state is not State.RECEIVING:
            raise slot.error or HandoffError("bad_request", f"reservation is {slot.state.value}")
        if slot.writers:
            raise RuntimeError("complete() while copies into the slot are in flight")
        t = slot.ticket
        seconds = time.perf_counter() - slot.started
        slot.handoff = Handoff(t.ticket_id, t.request_id, t.block_ids, t.num_tokens, slot.first_token,
                               t.num_bytes, seconds)
        slot.state = State.DONE
        self._count_unfilled(-len(t.block_ids))
        self.metrics.completed(slot.transport, t.num_bytes, seconds)
        # A filled ticket waits for its claim (the router may call Decode after Prefill).
        slot.timer.cancel()
        slot.timer = asyncio.get_running_loop().call_later(self.default_ttl_s, self._expire, slot)
        slot.abort_hooks.clear()
        slot.settled.set()
        return slot.handoff

    def fail(self, slot: Slot, error: HandoffError) -> None:
        """End the slot with `error`; its blocks return once no copy into them is in flight."""
        if slot.state in (State.FAILED, State.CLAIMED):
            return
        if slot.state in (State.RESERVED, State.RECEIVING):
            self._count_unfilled(-len(slot.ticket.block_ids))
        slot.state = State.FAILED
        slot.error = error
        self.metrics.failed(error.reason, slot.transport)
        if slot.timer is not None:
            slot.timer.cancel()
        tid = slot.ticket.ticket_id
        self._slots.pop(tid, None)
        self._ended[tid] = error
        while len(self._ended) > _ENDED_MEMORY:
            self._ended.popitem(last=False)
        log.info("KV handoff %s (request %s) failed: %s", tid, slot.ticket.request_id, error)
        hooks, slot.abort_hooks = slot.abort_hooks, []
        for hook in hooks:
            try:
                hook()
            except Exception:
                log.exception("aborting the transfer of %s failed", tid)
        slot.settled.set()
        self._maybe_release(slot)

    def fail_transfer(self, slot: Slot, error: HandoffError) -> None:
        """A transport's failure: ends the slot only while bytes are moving into it (after a
        verified completion the transfer can no longer fail it)."""
        if slot.state is State.RECEIVING:
            self.fail(slot, error)

    def fail_ticket(self, ticket_id: str, error: HandoffError) -> bool:
        slot = self._slots.get(ticket_id)
        if slot is None:
            return False
        self.fail(slot, error)
        return True

    # -- internals -----------------------------------------------------------------------

    async def _export_pool(self) -> None:
        """Make the pool mappable by `ipc` senders on this node; without it `auto` tickets
        simply offer no `ipc`."""
        try:
            from baton.kvtransfer.ipc_transport import IpcExport, local_domain

            domain = local_domain()
            if not domain:
                return
            self._socket.ipc = await self.pool.exclusive(lambda: IpcExport(self.pool.kv, self.rows))
            self.ipc_domain = domain
        except Exception as exc:
            log.warning("the KV pool cannot be shared with prefill workers on this node (%s); "
                        "auto handoffs will not use ipc", exc)

    def _expire(self, slot: Slot) -> None:
        what = "claimed" if slot.state is State.DONE else "filled"
        self.fail(slot, HandoffError("expired", f"reservation {slot.ticket.ticket_id!r} was not {what} in time"))

    def _maybe_release(self, slot: Slot) -> None:
        if slot.state is not State.FAILED or slot.writers or slot.released:
            return
        slot.released = True
        task = asyncio.get_running_loop().create_task(self.pool.release(list(slot.ticket.block_ids)))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    def _count_unfilled(self, delta: int) -> None:
        self._unfilled_blocks += delta
        self.metrics.set_reserved_blocks(self._unfilled_blocks)
