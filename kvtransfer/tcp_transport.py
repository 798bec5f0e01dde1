"""The `tcp` data plane: host-staged KV over a plain TCP connection per sender/receiver pair.

For hosts where neither CUDA IPC nor RDMA is available. Each decode worker listens on its
KV TCP port; a sender keeps a few connections per decode worker and runs one handoff at a
time on each:

    sender                                   receiver (one task per connection)
    HEADER (KVHandoffHeader)             ->  begin(): check ticket, layout, sizes
                                         <-  OK (or REPLY error: nothing was sent)
    num_bytes raw bytes, prompt order    ->  recv_into the reserved blocks
                                         <-  REPLY done | error

The bytes are neither framed nor checksummed by Baton (TCP checksums every segment; the
header's layout and sizes are checked before a byte moves). Host pools are sent from and
received into the blocks themselves (`sendall` / `recv_into` on memoryviews of the pool: no
copy in Python); device pools go through two pinned staging buffers per connection, so the
device-to-host copy of one chunk overlaps the socket work of the previous one (and on the
receiver the host-to-device copy of one chunk overlaps receiving the next).

The same listener serves the `ipc` data plane's control frames (ipc_transport.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from baton.kvtransfer import faults, wire
from baton.kvtransfer.blocks import BlockStream
from baton.kvtransfer.errors import HandoffError
from baton.kvtransfer.transport import ReceiverTransport, SenderTransport
from baton.protos import kvtransfer_pb2 as pb

log = logging.getLogger(__name__)


class Staging:
    """Two pinned host buffers of `chunk_bytes` and a copy stream, for one connection's
    device transfers (allocated on first use, reused by every handoff on the connection)."""

    def __init__(self, device, chunk_bytes: int):
        import torch

        self.buffers = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.events: list = [None, None]
        self.stream = torch.cuda.Stream(device)


def _staging(conn: wire.Connection, rows, chunk_bytes: int) -> Staging | None:
    if rows.device.type != "cuda":
        return None
    staging = conn.state.get("staging")
    if staging is None:
        staging = conn.state["staging"] = Staging(rows.device, chunk_bytes)
    return staging


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    return [(off, min(size, total - off)) for off in range(0, total, size)]


def _midway(off: int, n: int, total: int) -> bool:
    """Whether the chunk [off, off+n) holds the middle of the stream (faults fire there)."""
    return off <= total // 2 < off + n


def send_stream(sock: socket.socket, rows, block_ids: list[int], chunk_bytes: int,
                staging: Staging | None) -> None:
    """Send the blocks' bytes in prompt order (blocking; runs on the connection's thread)."""
    stream = BlockStream(rows, block_ids)
    total = stream.num_bytes
    if staging is None:
        for off, n in _chunks(total, chunk_bytes):
            if _midway(off, n, total):
                faults.fire("sender_exit")
                faults.fire("sender_stop")
            for view, _, _ in stream.pieces(off, n):
                sock.sendall(memoryview(view.numpy()))
        return
    import torch

    torch.cuda.current_stream(rows.device).synchronize()  # the engine's writes landed
    chunks = _chunks(total, chunk_bytes)

    def stage(i: int) -> None:
        off, n = chunks[i]
        buf = staging.buffers[i % 2]
        with torch.cuda.stream(staging.stream):
            for view, a, b in stream.pieces(off, n):
                buf[a:b].copy_(view, non_blocking=True)
            event = staging.events[i % 2] = torch.cuda.Event()
            event.record(staging.stream)

    stage(0)
    for i, (off, n) in enumerate(chunks):
        staging.events[i % 2].synchronize()
        if i + 1 < len(chunks):  # the other buffer's send returned: refill it meanwhile
            stage(i + 1)
        if _midway(off, n, total):
            faults.fire("sender_exit")
            faults.fire("sender_stop")
        sock.sendall(memoryview(staging.buffers[i % 2].numpy())[:n])


def recv_stream(sock: socket.socket, rows, block_ids: list[int], chunk_bytes: int,
                staging: Staging | None) -> None:
    """Receive the blocks' bytes in prompt order into the blocks (blocking; device copies
    are synchronised when this returns)."""
    stream = BlockStream(rows, block_ids)
    total = stream.num_bytes
    if staging is None:
        for off, n in _chunks(total, chunk_bytes):
            if _midway(off, n, total):
                faults.fire("receiver_exit")
                faults.fire("receiver_stop")
            for view, _, _ in stream.pieces(off, n):
                wire.recv_exact_into(sock, memoryview(view.numpy()))
        return
    import torch

    for i, (off, n) in enumerate(_chunks(total, chunk_bytes)):
        buf = staging.buffers[i % 2]
        if staging.events[i % 2] is not None:  # its previous host-to-device copy is done
            staging.events[i % 2].synchronize()
        if _midway(off, n, total):
            faults.fire("receiver_exit")
            faults.fire("receiver_stop")
        wire.recv_exact_into(sock, memoryview(buf.numpy())[:n])
        with torch.cuda.stream(staging.stream):
            for view, a, b in stream.pieces(off, n):
                view.copy_(buf[a:b], non_blocking=True)
            event = staging.events[i % 2] = torch.cuda.Event()
            event.record(staging.stream)
    staging.stream.synchronize()


def read_reply(payload: bytes, address: str) -> None:
    """Raise the error a REPLY frame carries; return if it says done."""
    msg = pb.KVPushReply.FromString(payload)
    kind = msg.WhichOneof("kind")
    if kind == "error":
        raise HandoffError.from_proto(msg.error, f"the decode worker at {address}")
    if kind != "done":
        raise HandoffError("transport", f"the decode worker at {address} answered {kind!r}, not done")


async def expect(conn: wire.Connection, kind: int, address: str) -> bytes:
    """The next frame's payload if it is `kind`; a REPLY error is raised as the peer's."""
    got, payload = await conn.recv()
    if got == kind:
        return payload
    if got == wire.REPLY:
        read_reply(payload, address)
    raise HandoffError("transport", f"the decode worker at {address} sent frame {got}, expected {kind}")


async def reason_after_break(conn: wire.Connection, address: str) -> HandoffError:
    """The connection broke mid-handoff: the receiver's REPLY if it sent one, else peer_lost."""
    with contextlib.suppress(Exception):
        kind, payload = await asyncio.wait_for(conn.recv(), 0.5)
        if kind == wire.REPLY:
            read_reply(payload, address)
    return HandoffError("peer_lost", f"the connection to the decode worker at {address} broke mid-handoff")


class TcpSender(SenderTransport):
    name = "tcp"

    def __init__(self, config):
        self.config = config
        self.connections = wire.Connections(config.max_endpoints_per_peer, config.push_timeout_s)

    async def send(self, ticket, rows, src_block_ids, header) -> None:
        address = ticket.tcp_address
        if not address:
            raise HandoffError("transport_unavailable",
                               f"the decode worker at {ticket.control_address} has no KV TCP listener")
        async with self.connections.connection(address) as conn:
            await conn.send(wire.HEADER, header.SerializeToString())
            await expect(conn, wire.OK, address)
            try:
                await conn.bulk(send_stream, rows, list(src_block_ids), self.config.tcp_chunk_bytes,
                                _staging(conn, rows, self.config.tcp_chunk_bytes))
                payload = await expect(conn, wire.REPLY, address)
            except (OSError, EOFError):
                raise await reason_after_break(conn, address) from None
            read_reply(payload, address)
            conn.clean = True

    async def close(self) -> None:
        self.connections.close()


class SocketReceiver(ReceiverTransport):
    """The decode worker's KV TCP listener: `tcp` handoffs, and `ipc` control frames."""

    name = "tcp"

    def __init__(self, receiver):
        self.receiver = receiver
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._conns: dict[wire.Connection, asyncio.Task] = {}
        self.ipc = None  # an ipc_transport.IpcExport once the pool is exported

    async def start(self, advertise_host: str, port: int) -> str:
        sock = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True) \
            if socket.has_dualstack_ipv6() else socket.create_server(("0.0.0.0", port))
        sock.setblocking(False)
        self._listener = sock
        self._accepting = asyncio.ensure_future(self._accept(sock))
        return f"{advertise_host}:{sock.getsockname()[1]}"

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        for conn in list(self._conns):
            conn.stop()
        if self._conns:
            await asyncio.gather(*self._conns.values(), return_exceptions=True)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as exc:  # out of file descriptors, a reset before accept: keep serving
                log.warning("KV listener: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            conn = wire.Connection(sock, f"{addr[0]}:{addr[1]}")
            self._conns[conn] = asyncio.ensure_future(self._serve(conn))

    async def _serve(self, conn: wire.Connection) -> None:
        """One connection: handoffs one after another until the sender goes away."""
        try:
            while True:
                try:
                    kind, payload = await conn.recv()
                except (OSError, EOFError):
                    return
                if kind == wire.HEADER:
                    usable = await self._handoff(conn, payload)
                elif kind in (wire.IPC_OPEN, wire.IPC_HEADER) and self.ipc is not None:
                    usable = await self.ipc.serve(self.receiver, conn, kind, payload)
                else:
                    log.warning("KV listener: unexpected frame %d from %s", kind, conn.peer)
                    usable = False
                if not usable:
                    return
        except Exception:
            log.exception("KV connection from %s failed", conn.peer)
        finally:
            self._conns.pop(conn, None)
            conn.close()

    async def _handoff(self, conn: wire.Connection, payload: bytes) -> bool:
        """One tcp handoff; returns whether the connection is still usable."""
        recv = self.receiver
        try:
            slot = recv.begin(pb.KVHandoffHeader.FromString(payload), self.name)
        except HandoffError as exc:  # refused before the sender sent a byte
            await reply(conn, exc)
            return True
        except Exception as exc:
            log.warning("bad KV handoff header from %s: %s", conn.peer, exc)
            return False
        dst = list(slot.ticket.block_ids)
        chunk = recv.config.tcp_chunk_bytes
        try:
            async with recv.writing(slot):
                slot.abort_hooks.append(conn.stop_reading)  # expiry or cancel: stop receiving
                await conn.send(wire.OK)
                await conn.bulk(recv_stream, recv.rows, dst, chunk, _staging(conn, recv.rows, chunk))
        except HandoffError as exc:
            recv.fail_transfer(slot, exc)
            await reply(conn, slot.error or exc)
            return False
        except Exception as exc:  # the sender went away (or the slot failed and stopped us)
            recv.fail_transfer(slot, HandoffError("peer_lost", f"the prefill worker's connection broke: {exc!r}"))
            await reply(conn, slot.error)
            return False
        return await finish(recv, conn, slot)


async def reply(conn: wire.Connection, error: HandoffError | None) -> None:
    """Tell the sender why its handoff failed (best effort: it may be gone)."""
    msg = pb.KVPushReply(error=error.to_proto()) if error is not None else pb.KVPushReply(done=True)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.send(wire.REPLY, msg.SerializeToString()), 2.0)


async def finish(recv, conn: wire.Connection, slot) -> bool:
    """Every byte is in place: complete the slot and answer; whether the connection is usable.

    A sender that closed its connection behind its last bytes gave up (its timeout): the
    handoff fails rather than complete for nobody."""
    if conn.readable_now():
        recv.fail_transfer(slot, HandoffError("peer_lost", "the prefill worker gave up on the handoff"))
        return False
    try:
        recv.complete(slot)
    except HandoffError as exc:
        await reply(conn, exc)
        return True
    await reply(conn, None)
    return True
