"""The `ucx` data plane (UCXX): the blocks' memory goes straight from one pool to the other.

Each decode worker listens on its UCX port; a sender keeps a few endpoints per decode worker
and runs one handoff at a time on each (so aborting one handoff's endpoint touches no other):

    sender                                  receiver (one task per endpoint)
    control: KVHandoffHeader            ->  begin(): check ticket, layout, sizes
    data: one message per region        ->  received in place into the reserved blocks
          (or one staged message)
                                        <-  control: KVPushReply(done) | error

The sender posts its data right behind the header, so a handoff costs one round trip beyond
the data. Nothing lands in the reserved blocks before `begin` accepted the header: the
receiver posts its receives only then (UCX holds a large message until its receive is
posted; a refused handoff's data is dropped with the connection, which the sender closes).
Control frames and data use different tags. A control frame is one message, an 8-byte
length and the payload, received into a 1 MiB buffer.

With CUDA pools both ends hand UCX device memory, which it moves with CUDA IPC (NVLink) in a
node or RDMA across nodes; host pools go over TCP or shared memory. When the source and
destination blocks form more than `max_direct_messages` regions that are contiguous at both
ends, the sender gathers them into one staging buffer and the receiver scatters from one
(one device copy each): one large message beats many small ones (each message has a fixed
cost; docs/performance.md, "KV transfer").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time

import numpy as np
import torch

from baton import settings
from baton.kvtransfer import faults
from baton.kvtransfer.blocks import region, runs, segments, split
from baton.kvtransfer.errors import HandoffError
from baton.kvtransfer.transport import ReceiverTransport, SenderTransport
from baton.protos import kvtransfer_pb2 as pb

log = logging.getLogger(__name__)


def _ucxx(progress_mode: str | None):
    """UCXX, started in `progress_mode` (None: $UCXPY_PROGRESS_MODE, else `thread`) unless
    this process started it before.

    In `thread` mode a request's completion reaches the event loop through a future set by
    UCXX's notifier thread. UCXX's default instead has each awaited request yield to the
    loop until it completes, which spins the loop for as long as a receive is posted: a
    decode worker waiting for the next header on an idle endpoint would burn a core. The
    polling modes spin by design (the fastest handoffs on GPUs) and keep UCXX's default.
    """
    import ucxx

    mode = progress_mode or settings.ucx_progress_mode() or "thread"
    try:
        ucxx.init(progress_mode=mode, enable_python_future=mode == "thread")
    except RuntimeError:  # already started in this process: its mode stays
        log.debug("UCX already initialised; progress mode %s not applied", mode)
    return ucxx


def _buffer(t: torch.Tensor):
    """What UCXX sends from or receives into: host memory as numpy, device memory as is."""
    return t.numpy() if t.device.type == "cpu" else t


CTRL_TAG, DATA_TAG = 1, 2
MAX_FRAME = 1 << 20

# Bench instrumentation, off in workers: while `stamps` is a list, each end appends
# (stage, time.perf_counter()) at its handoff stages (bench/kv_transfer.py reads them; one
# handoff at a time, or the stages interleave).
stamps: list[tuple[str, float]] | None = None


def _stamp(stage: str) -> None:
    if stamps is not None:
        stamps.append((stage, time.perf_counter()))


if sys.version_info >= (3, 12):
    def _post(coro) -> asyncio.Task:
        """Run `coro` up to its first wait now: a UCXX send or receive submits its request
        before it first awaits, so requests go out at once and in call order (which matters:
        the messages of one tag match receives in posting order)."""
        return asyncio.Task(coro, loop=asyncio.get_running_loop(), eager_start=True)
else:  # the task starts on the loop's next turn; tasks start in creation order
    _post = asyncio.ensure_future


def frame_buffer() -> np.ndarray:
    """A control-frame receive buffer; each endpoint reuses one (one frame at a time)."""
    return np.empty(MAX_FRAME, dtype=np.uint8)


async def send_frame(ep, payload: bytes) -> None:
    if len(payload) + 8 > MAX_FRAME:
        raise HandoffError("bad_request", f"a {len(payload)}-byte control frame is too large")
    frame = bytearray(len(payload).to_bytes(8, "little"))
    frame += payload
    await ep.send(frame, tag=CTRL_TAG)


async def recv_frame(ep, buf: np.ndarray | None = None) -> bytes:
    """The next control frame's payload, received into `buf` (from `frame_buffer`) if given."""
    if buf is None:
        buf = frame_buffer()
    await ep.recv(buf, tag=CTRL_TAG)  # a smaller message fills its start
    n = int.from_bytes(buf[:8].tobytes(), "little")
    if n + 8 > MAX_FRAME:
        raise HandoffError("bad_request", f"a control frame claims {n} bytes")
    return buf[8 : 8 + n].tobytes()


def _reply(msg: pb.KVPushReply) -> bytes:
    return msg.SerializeToString()


def plan_buffers(rows: torch.Tensor, own: list[int], peer: list[int], is_sender: bool, staged: bool,
                 max_message_bytes: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The buffers this end passes to UCX, in message order, and the staging buffer if any.

    Both ends compute the same message sizes from the header: one message per region that
    is contiguous at both ends, or (staged) one message of all blocks in prompt order; each
    split at `max_message_bytes`."""
    src, dst = (own, peer) if is_sender else (peer, own)
    block_bytes = rows.shape[1]
    if not staged:
        regions = []
        for s, d, n in segments(src, dst):
            regions.append(region(rows, s if is_sender else d, n))
        staging = None
    else:
        own_runs = runs(own)
        if len(own_runs) == 1:  # already one region here: no copy on this side
            regions, staging = [region(rows, own_runs[0][0], own_runs[0][1])], None
        else:
            staging = torch.empty(len(own) * block_bytes, dtype=torch.uint8, device=rows.device)
            regions = [staging]
    out = []
    for r in regions:
        out.extend(r[a:b] for a, b in split(r.numel(), max_message_bytes))
    return out, staging


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class UcxSender(SenderTransport):
    name = "ucx"

    def __init__(self, config):
        self.config = config
        self.ucxx = _ucxx(config.ucx_progress_mode)
        self._idle: dict[str, list] = {}  # address -> [(endpoint, its frame buffer)]
        self._limits: dict[str, asyncio.Semaphore] = {}

    async def send(self, ticket, rows, src_block_ids, header) -> None:
        address = ticket.ucx_address
        if not address:
            raise HandoffError("transport_unavailable", f"the decode worker at {ticket.control_address} has no UCX listener")
        limit = self._limits.setdefault(address, asyncio.Semaphore(self.config.max_endpoints_per_peer))
        async with limit:
            ep, frame = await self._connect(address)
            ok = False
            try:
                await self._handoff(ep, frame, ticket, rows, src_block_ids, header, address)
                ok = True
            except HandoffError:
                raise
            except Exception as exc:
                raise HandoffError("peer_lost", f"the UCX connection to {address} failed: {exc!r}") from None
            finally:
                if ok:
                    self._idle.setdefault(address, []).append((ep, frame))
                else:  # its protocol state is unknown: never reuse it (nor its frame buffer)
                    ep.abort()

    async def _handoff(self, ep, frame, ticket, rows, src, header, address: str) -> None:
        bufs, staging = plan_buffers(rows, src, list(ticket.block_ids), True, header.staged,
                                     header.max_message_bytes)
        if staging is not None:
            torch.index_select(rows, 0, torch.tensor(src, device=rows.device), out=staging.view(len(src), -1))
        _sync(rows.device)  # the pool's pending writes (and the gather) land before UCX reads
        reply = _post(recv_frame(ep, frame))  # first, so the answer always finds its receive
        if len(bufs) > 1 and (faults.active("sender_exit") or faults.active("sender_stop")):
            sends = [_post(self._send_faulty(ep, header.SerializeToString(), bufs))]
        else:  # the header and every data message at once (none waits for another)
            sends = [_post(send_frame(ep, header.SerializeToString()))]
            sends += [_post(ep.send(_buffer(b), tag=DATA_TAG)) for b in bufs]
        _stamp("sends_posted")
        data = asyncio.gather(*sends)  # fails as soon as one send fails
        try:
            # The answer normally follows the data; a refusal comes without it (the receiver
            # never takes the data) and a broken connection fails the sends first.
            if not reply.done():
                await asyncio.wait((reply, data), return_when=asyncio.FIRST_COMPLETED)
            if data.done():
                data.result()  # raises if the connection broke
            msg = pb.KVPushReply.FromString(await reply)
            _stamp("reply_received")
            kind = msg.WhichOneof("kind")
            if kind == "error":  # refused (nothing was moved) or failed mid-way
                raise HandoffError.from_proto(msg.error, f"the decode worker at {address}")
            if kind != "done":
                raise HandoffError("transport", f"the decode worker at {address} answered {kind!r}, not done")
            await data
        finally:
            pending = [t for t in (reply, data, *sends) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            for task in (reply, data, *sends):  # mark failures seen (the error went up already)
                if not task.cancelled():
                    task.exception()

    @staticmethod
    async def _send_faulty(ep, header: bytes, bufs: list[torch.Tensor]) -> None:
        """Tests only (`sender_exit`, `sender_stop`): the header and the first message, then
        the fault, then the rest."""
        await asyncio.gather(send_frame(ep, header), ep.send(_buffer(bufs[0]), tag=DATA_TAG))
        faults.fire("sender_exit")
        faults.fire("sender_stop")
        await asyncio.gather(*(ep.send(_buffer(b), tag=DATA_TAG) for b in bufs[1:]))

    async def _connect(self, address: str):
        """An idle endpoint to `address` with its frame buffer, or a new pair."""
        idle = self._idle.get(address, [])
        while idle:
            ep, frame = idle.pop()
            if not ep.closed:
                return ep, frame
        host, port = address.rsplit(":", 1)
        try:
            ep = await asyncio.wait_for(self.ucxx.create_endpoint(host, int(port)), self.config.push_timeout_s)
        except TimeoutError:
            raise HandoffError("timeout", f"no UCX connection to {address}", nothing_sent=True) from None
        except Exception as exc:
            raise HandoffError("peer_lost", f"cannot reach the UCX listener at {address}: {exc!r}",
                               nothing_sent=True) from None
        return ep, frame_buffer()

    async def close(self) -> None:
        for eps in self._idle.values():
            for ep, _ in eps:
                ep.abort()
        self._idle.clear()


class UcxReceiver(ReceiverTransport):
    name = "ucx"

    def __init__(self, receiver):
        self.receiver = receiver
        self.ucxx = _ucxx(receiver.config.ucx_progress_mode)
        self._listener = None
        self._handlers: set[asyncio.Task] = set()
        self._endpoints: set = set()

    async def start(self, advertise_host: str, port: int) -> str:
        self._listener = self.ucxx.create_listener(self._serve, port=port)
        return f"{advertise_host}:{self._listener.port}"

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for ep in list(self._endpoints):
            ep.abort()
        if self._handlers:
            await asyncio.gather(*list(self._handlers), return_exceptions=True)

    async def _serve(self, ep) -> None:
        """One connection: handoffs one after another until the sender goes away."""
        task = asyncio.current_task()
        self._handlers.add(task)
        self._endpoints.add(ep)
        buf = frame_buffer()
        try:
            while True:
                try:
                    frame = await recv_frame(ep, buf)
                except Exception:
                    return  # the sender closed the connection (or died) between handoffs
                if not await self._serve_one(ep, frame):
                    return
        finally:
            self._endpoints.discard(ep)
            self._handlers.discard(task)
            with contextlib.suppress(Exception):
                ep.abort()

    async def _serve_one(self, ep, frame: bytes) -> bool:
        """One handoff; returns whether the connection is still usable."""
        recv = self.receiver
        try:
            _stamp("header_received")
            header = pb.KVHandoffHeader.FromString(frame)
            slot = recv.begin(header, self.name)
        except HandoffError as exc:
            await send_frame(ep, _reply(pb.KVPushReply(error=exc.to_proto())))
            return True
        except Exception as exc:  # not a header at all
            log.warning("bad UCX handoff frame: %s", exc)
            return False
        dst = list(slot.ticket.block_ids)
        try:
            async with recv.writing(slot):
                slot.abort_hooks.append(ep.abort)  # expiry or cancel: stop the posted receives
                bufs, staging = plan_buffers(recv.rows, dst, list(header.src_block_ids), False,
                                             header.staged, header.max_message_bytes)
                if len(bufs) > 1 and (faults.active("receiver_exit") or faults.active("receiver_stop")):
                    await ep.recv(_buffer(bufs[0]), tag=DATA_TAG)
                    faults.fire("receiver_exit")
                    faults.fire("receiver_stop")
                    bufs = bufs[1:]
                await self._receive(ep, bufs)
                _stamp("data_received")
                if staging is not None:
                    idx = torch.tensor(dst, device=recv.rows.device)
                    recv.rows.index_copy_(0, idx, staging.view(len(dst), -1))
                _sync(recv.rows.device)
                _stamp("data_synced")
        except HandoffError as exc:  # the slot failed while we were receiving
            recv.fail_transfer(slot, exc)
            return False
        except Exception as exc:
            recv.fail_transfer(slot, HandoffError("peer_lost", f"the prefill worker's UCX connection failed: {exc!r}"))
            return False
        try:
            recv.complete(slot)
        except HandoffError as exc:
            await send_frame(ep, _reply(pb.KVPushReply(error=exc.to_proto())))
            return True
        _stamp("completed")
        await send_frame(ep, _reply(pb.KVPushReply(done=True)))
        _stamp("reply_sent")
        return True

    @staticmethod
    async def _receive(ep, bufs: list[torch.Tensor]) -> None:
        """Post a receive per message, in message order, at once; return when all landed.

        On any failure the endpoint is aborted and every receive has ended before this
        raises, so nothing lands in the blocks after the slot lets them go."""
        if len(bufs) == 1:  # posted by this call, before its first wait
            _stamp("receives_posted")
            await ep.recv(_buffer(bufs[0]), tag=DATA_TAG)
            return
        recvs = [_post(ep.recv(_buffer(b), tag=DATA_TAG)) for b in bufs]
        _stamp("receives_posted")
        try:
            await asyncio.gather(*recvs)
        except BaseException:
            ep.abort()  # ends the receives still posted
            await asyncio.gather(*recvs, return_exceptions=True)
            raise
