"""The `grpc` data plane: the handoff as one bidirectional stream on the decode worker's port.

    sender                                   receiver (KVTransfer.Push)
    header (ticket, layout, blocks, token) ->  begin(): check ticket, layout, sizes
    chunk(offset, bytes, crc32)  x N       ->  verify crc, copy into the reserved blocks
                                           <-  acked_bytes (in order, as copies finish)
    end                                    ->  all bytes there? sync device copies
                                           <-  done | error

The sender keeps at most `window_chunks` chunks unacknowledged, so a slow receiver slows the
sender instead of piling chunks up in memory. Chunks are read, checksummed and copied on
thread pools, never on the event loop; a device pool is staged through host memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from concurrent.futures import ThreadPoolExecutor

import grpc

from baton.kvtransfer import faults
from baton.kvtransfer.blocks import BlockStream
from baton.kvtransfer.errors import HandoffError
from baton.kvtransfer.transport import ReceiverTransport, SenderTransport
from baton.protos import kvtransfer_pb2 as pb
from baton.protos import kvtransfer_pb2_grpc as pb_grpc
from baton.rpc import DEFAULT_KEEPALIVE, Keepalive, channel_options

log = logging.getLogger(__name__)

def rpc_error(exc: grpc.aio.AioRpcError, address: str) -> HandoffError:
    """Map a failed call to the reason a person can act on."""
    code = exc.code()
    where = f"the decode worker at {address}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return HandoffError("timeout", f"{where} did not answer in time")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return HandoffError("peer_lost", f"{where} went away: {exc.details()}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return HandoffError("transport_unavailable", f"{where} does not serve baton.v1.KVTransfer")
    return HandoffError("transport", f"{where} failed the stream: {code.name} {exc.details()}")


class Channels:
    """One gRPC channel per decode worker address, shared by pushes and aborts."""

    def __init__(self, keepalive: Keepalive = DEFAULT_KEEPALIVE):
        self._options = channel_options(keepalive)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> pb_grpc.KVTransferStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address, options=self._options)
        return pb_grpc.KVTransferStub(channel)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()


class GrpcSender(SenderTransport):
    name = "grpc"

    def __init__(self, config, channels: Channels | None = None):
        self.config = config
        self.channels = channels or Channels(config.keepalive)
        self._pool = ThreadPoolExecutor(config.copy_threads, thread_name_prefix="kv-send")

    async def send(self, ticket, rows, src_block_ids, header) -> None:
        address = ticket.control_address
        call = self.channels.stub(address).Push()
        ok = False
        try:
            await self._send(call, rows, src_block_ids, header, address)
            await call.code()  # the stream ended on the server too; never cancel it now
            ok = True
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, address) from None
        finally:
            if not ok:  # errors and timeouts: stop the stream at once
                call.cancel()

    async def _send(self, call, rows, src_block_ids, header, address: str) -> None:
        loop = asyncio.get_running_loop()
        stream = BlockStream(rows, src_block_ids)
        size, window = self.config.chunk_bytes, self.config.chunk_bytes * self.config.window_chunks
        offsets = list(range(0, stream.num_bytes, size))
        acked = 0
        progress = asyncio.Event()

        async def read_replies() -> None:
            nonlocal acked
            async for reply in call:
                kind = reply.WhichOneof("kind")
                if kind == "error":
                    raise HandoffError.from_proto(reply.error, f"the decode worker at {address}")
                if kind == "done":
                    return
                acked = reply.acked_bytes
                progress.set()
            raise HandoffError("peer_lost", f"the decode worker at {address} ended the stream unfinished")

        def read_chunk(i: int) -> pb.KVPushMessage:
            off = offsets[i]
            data = stream.read(off, min(size, stream.num_bytes - off))
            crc = zlib.crc32(data)
            if i == 1 and faults.active("corrupt_chunk"):
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            return pb.KVPushMessage(chunk=pb.KVChunk(offset=off, data=data, crc32=crc))

        replies = asyncio.ensure_future(read_replies())
        nxt = None
        try:
            await call.write(pb.KVPushMessage(header=header))
            nxt = loop.run_in_executor(self._pool, read_chunk, 0) if offsets else None
            faulted = False
            for i, off in enumerate(offsets):
                msg = await nxt
                nxt = loop.run_in_executor(self._pool, read_chunk, i + 1) if i + 1 < len(offsets) else None
                while off - acked >= window:  # back-pressure: wait for the receiver's copies
                    progress.clear()
                    await _first(progress.wait(), replies)
                if not faulted and i >= len(offsets) // 2 and acked:  # mid-transfer, once
                    faulted = True
                    faults.fire("sender_exit")
                    faults.fire("sender_stop")
                await _first(call.write(msg), replies)
            await _first(call.write(pb.KVPushMessage(end=pb.KVHandoffEnd(num_chunks=len(offsets)))), replies)
            await call.done_writing()
            await replies
        except Exception:
            # A write that failed because the receiver ended the call: its reply says why.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(replies), 1.0)
            if replies.done() and not replies.cancelled() and isinstance(replies.exception(), HandoffError):
                raise replies.exception() from None
            raise
        finally:
            if not replies.done():
                replies.cancel()
            await asyncio.gather(replies, *([nxt] if nxt is not None else []), return_exceptions=True)


async def _first(aw, replies: asyncio.Future) -> None:
    """Await `aw`, but fail as soon as the reply reader fails (the receiver's error wins)."""
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task, replies}, return_when=asyncio.FIRST_COMPLETED)
    if replies in done and replies.exception() is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise replies.exception()
    if task not in done:
        await task
    task.result()


class GrpcReceiver(ReceiverTransport):
    name = "grpc"

    def __init__(self, receiver):
        self.receiver = receiver
        self._device_stream = None
        if receiver.rows.device.type == "cuda":
            import torch

            self._device_stream = torch.cuda.Stream(receiver.rows.device)

    async def serve_push(self, context) -> None:
        """The body of `KVTransfer.Push` (see the module docstring).

        This task reads; an acker task awaits the chunk copies in order and acknowledges
        them, and is the only writer of replies until the end (or its own error)."""
        recv = self.receiver
        slot = acker = None
        copies: asyncio.Queue = asyncio.Queue(maxsize=recv.config.window_chunks)
        try:
            msg = await context.read()
            if msg is grpc.aio.EOF:
                return
            if msg.WhichOneof("kind") != "header":
                raise HandoffError("bad_request", "a push must start with a header")
            slot = recv.begin(msg.header, self.name)
            stream = BlockStream(recv.rows, slot.ticket.block_ids)
            acker = asyncio.ensure_future(self._ack(context, slot, copies))
            expected = 0
            while True:
                msg = await context.read()
                if acker.done():  # it failed the slot and told the sender
                    return
                if msg is grpc.aio.EOF:
                    raise HandoffError("peer_lost", "the prefill worker closed the stream before its end")
                kind = msg.WhichOneof("kind")
                if kind == "chunk":
                    chunk = msg.chunk
                    n = len(chunk.data)
                    if chunk.offset != expected or n == 0 or expected + n > stream.num_bytes:
                        raise HandoffError(
                            "bad_request", f"chunk [{chunk.offset}, +{n}) does not follow byte {expected} "
                            f"of a {stream.num_bytes}-byte handoff")
                    if expected < stream.num_bytes // 2 <= expected + n:
                        faults.fire("receiver_exit")
                        faults.fire("receiver_stop")
                    expected += n
                    await copies.put(asyncio.ensure_future(self._write(slot, stream, chunk)))
                elif kind == "end":
                    await copies.put(None)
                    acked = await acker
                    if acked is None:
                        return
                    if acked != stream.num_bytes:
                        raise HandoffError("bad_request", f"the push ended after {acked} of {stream.num_bytes} bytes")
                    recv.complete(slot)
                    await context.write(pb.KVPushReply(done=True))
                    return
                else:
                    raise HandoffError("bad_request", "a second header in one push")
        # Fail the slot before awaiting anything: gRPC may cancel this task at any await.
        except HandoffError as exc:
            if slot is not None:
                recv.fail_transfer(slot, exc)
            await self._stop_acker(acker)
            await _reply_error(context, exc)
        except asyncio.CancelledError:
            if slot is not None:
                recv.fail_transfer(slot, HandoffError("peer_lost", "the prefill worker went away mid-transfer"))
            raise
        except Exception as exc:
            log.exception("KV push failed")
            err = HandoffError("transport", f"the decode worker failed the push: {exc}")
            if slot is not None:
                recv.fail_transfer(slot, err)
            await self._stop_acker(acker)
            await _reply_error(context, err)
        finally:
            if slot is not None and asyncio.current_task().cancelling():
                recv.fail_transfer(slot, HandoffError("peer_lost", "the prefill worker went away mid-transfer"))
            # A failure with copies in flight: let them finish (the last one releases).
            await self._stop_acker(acker)
            left = []
            while not copies.empty():
                fut = copies.get_nowait()
                if fut is not None:
                    left.append(fut)
            if left:
                await asyncio.shield(asyncio.gather(*left, return_exceptions=True))

    async def _ack(self, context, slot, copies: asyncio.Queue) -> int | None:
        """Acknowledge copies in order; returns the bytes acknowledged at the end marker, or
        None after failing the slot and telling the sender."""
        acked = 0
        try:
            while True:
                fut = await copies.get()
                if fut is None:  # every copy is complete (device copies synchronised)
                    return acked
                acked = await fut
                await context.write(pb.KVPushReply(acked_bytes=acked))
        except HandoffError as exc:
            self.receiver.fail_transfer(slot, exc)
            await _reply_error(context, exc)
            return None
        except Exception as exc:  # the reply stream broke: the sender is gone
            self.receiver.fail_transfer(slot, HandoffError("peer_lost", f"the prefill worker went away: {exc!r}"))
            return None

    @staticmethod
    async def _stop_acker(acker) -> None:
        if acker is not None and not acker.done():
            acker.cancel()
        if acker is not None:
            await asyncio.gather(acker, return_exceptions=True)

    async def _write(self, slot, stream: BlockStream, chunk) -> int:
        """Verify and copy one chunk on the copy pool; returns the stream offset after it."""
        recv = self.receiver

        def verify_and_copy() -> None:
            if zlib.crc32(chunk.data) != chunk.crc32:
                raise HandoffError("checksum", f"the chunk at byte {chunk.offset} failed its CRC-32 check")
            stream.write(chunk.offset, chunk.data, self._device_stream)

        async with recv.writing(slot):
            await asyncio.get_running_loop().run_in_executor(recv.copy_pool, verify_and_copy)
        return chunk.offset + len(chunk.data)


async def _reply_error(context, exc: HandoffError) -> None:
    try:
        await context.write(pb.KVPushReply(error=exc.to_proto()))
    except Exception:  # the sender is gone; its side fails on its own
        log.debug("could not report %s to the sender", exc)
