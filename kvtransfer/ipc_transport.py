"""The `ipc` data plane: a prefill engine writes straight into a decode engine's KV pool on
the same node (a "cell"), through memory both processes map.

On GPUs the decode worker exports its KV pool with CUDA IPC and the prefill worker copies
device to device into it (NVLink between GPUs, or within one GPU). On CPU the decode worker
moves its pool into a POSIX shared-memory file (torch's file-system sharing) and the prefill
worker maps it: the same protocol, the same code, host memory instead of device memory.

The control frames travel over the decode worker's KV TCP listener (tcp_transport.py):

    sender                                   receiver
    IPC_OPEN (once per connection)       ->
                                         <-  IPC_POOL: how to map the pool (JSON)
    IPC_HEADER (KVHandoffHeader)         ->  begin(): check ticket, layout, sizes
                                         <-  OK
    copy src blocks -> mapped dst blocks;
    synchronise; WRITTEN                 ->
                                         <-  REPLY done | error

A copy in flight cannot be stopped from the decode side, so a reservation that fails while
the sender copies (expiry, cancel) keeps its blocks until WRITTEN arrives or the sender's
connection closes (its process ended): no write lands in blocks given to someone else.

Who may use it: both processes must share the node and its IPC and mount namespaces (the
ticket's `ipc_domain`), and on GPUs the sender must see the decode worker's device (matched
by UUID). Anything else is `transport_unavailable` before a byte moves, and `auto` moves on
to the next transport.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import uuid

import torch

from baton.kvtransfer import faults, wire
from baton.kvtransfer.blocks import segments
from baton.kvtransfer.errors import HandoffError
from baton.kvtransfer.tcp_transport import expect, finish, read_reply, reply
from baton.kvtransfer.transport import SenderTransport
from baton.protos import kvtransfer_pb2 as pb

log = logging.getLogger(__name__)


@functools.cache
def local_domain() -> str:
    """This process's sharing domain: boot id, IPC and mount namespaces ("" if unknown).
    Two processes with the same domain can map each other's exported pools."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/ipc')}/{os.readlink('/proc/self/ns/mnt')}"
    except OSError:
        return ""


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


class IpcExport:
    """The decode side: the pool's memory made mappable, and the ipc control frames."""

    def __init__(self, kv: torch.Tensor, rows: torch.Tensor):
        self.kv, self.rows = kv, rows
        self.pool_id = uuid.uuid4().hex
        if kv.device.type == "cpu":
            # tmpfs grants pages lazily: a pool larger than /dev/shm's free space would die
            # of SIGBUS while being moved, so refuse up front (no ipc then).
            fs = os.statvfs("/dev/shm")
            need = kv.untyped_storage().nbytes()
            if fs.f_bavail * fs.f_frsize < need:
                raise RuntimeError(f"/dev/shm has {fs.f_bavail * fs.f_frsize} bytes free, the KV pool needs {need}")
            # Moves the pool into a shared-memory file in place (every view follows): call
            # it only while nothing reads or writes the pool (`KVPool.exclusive`).
            manager, filename, size = kv.untyped_storage()._share_filename_cpu_()
            self._cpu = {"manager": manager.decode(), "filename": filename.decode(), "size": size}
        else:
            self.describe()  # fails here, not at a sender's first handoff, if CUDA IPC cannot share it

    def describe(self) -> dict:
        """What a sender needs to map the pool (JSON-safe)."""
        kv = self.kv
        out = {"pool_id": self.pool_id, "device": kv.device.type, "num_blocks": self.rows.shape[0],
               "block_bytes": self.rows.shape[1], "offset_bytes": kv.storage_offset() * kv.element_size()}
        if kv.device.type == "cpu":
            return out | self._cpu
        # A fresh share per sender: each consumer gets its own reference counter.
        (device, handle, size, offset, counter, counter_offset, event, event_sync) = \
            kv.untyped_storage()._share_cuda_()
        return out | {"device_uuid": str(torch.cuda.get_device_properties(device).uuid),
                      "handle": _b64(handle), "size": size, "storage_offset": offset,
                      "counter": _b64(counter), "counter_offset": counter_offset,
                      "event": _b64(event), "event_sync": event_sync}

    async def serve(self, recv, conn: wire.Connection, kind: int, payload: bytes) -> bool:
        """Answer one ipc frame; returns whether the connection is still usable."""
        if kind == wire.IPC_OPEN:
            await conn.send(wire.IPC_POOL, json.dumps(self.describe()).encode())
            return True
        try:
            slot = recv.begin(pb.KVHandoffHeader.FromString(payload), "ipc")
        except HandoffError as exc:
            await reply(conn, exc)
            return True
        except Exception as exc:
            log.warning("bad KV handoff header from %s: %s", conn.peer, exc)
            return False
        try:
            async with recv.writing(slot):  # held until the sender's copy has ended
                await conn.send(wire.OK)
                faults.fire("receiver_exit")
                faults.fire("receiver_stop")
                kind, _ = await conn.recv()
                if kind != wire.WRITTEN:
                    raise HandoffError("bad_request", f"frame {kind} instead of WRITTEN")
        except HandoffError as exc:
            recv.fail_transfer(slot, exc)
            await reply(conn, slot.error or exc)
            return False
        except Exception as exc:
            recv.fail_transfer(slot, HandoffError("peer_lost", f"the prefill worker's connection broke: {exc!r}"))
            return False
        return await finish(recv, conn, slot)


def _local_device(device_uuid: str) -> int | None:
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == device_uuid:
            return i
    return None


def map_pool(desc: dict) -> torch.Tensor:
    """The exported pool as `rows[num_blocks, block_bytes]` uint8 in this process.

    Raises HandoffError("transport_unavailable") when it cannot be mapped here."""
    try:
        if desc["device"] == "cpu":
            storage = torch.UntypedStorage._new_shared_filename_cpu(
                desc["manager"].encode(), desc["filename"].encode(), desc["size"])
            device = "cpu"
        else:
            index = _local_device(desc["device_uuid"]) if torch.cuda.is_available() else None
            if index is None:
                raise HandoffError("transport_unavailable",
                                   f"the decode worker's GPU {desc['device_uuid']} is not visible here")
            torch.cuda._lazy_init()
            storage = torch.UntypedStorage._new_shared_cuda(
                index, _unb64(desc["handle"]), desc["size"], desc["storage_offset"], _unb64(desc["counter"]),
                desc["counter_offset"], _unb64(desc["event"]), desc["event_sync"])
            device = f"cuda:{index}"
    except HandoffError:
        raise
    except Exception as exc:
        raise HandoffError("transport_unavailable", f"cannot map the decode worker's KV pool: {exc}") from None
    n, width = desc["num_blocks"], desc["block_bytes"]
    if desc["offset_bytes"] + n * width > storage.nbytes():
        raise HandoffError("transport_unavailable", "the decode worker's KV pool export is inconsistent")
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage, desc["offset_bytes"], (n, width), (width, 1))


def copy_blocks(_sock, src: torch.Tensor, dst: torch.Tensor, src_ids: list[int], dst_ids: list[int],
                max_direct: int, stream_holder: dict) -> None:
    """Copy `src[src_ids]` into `dst[dst_ids]` (blocking; device copies synchronised).

    A copy per stretch contiguous at both ends, or, past `max_direct` stretches, one
    gather and one scatter."""
    # Either end may be host memory (a TP engine's handoff pool): the copy runs on a stream
    # of the GPU end and is synchronised before the peer is told, whichever end that is.
    gpu = next((t.device for t in (dst, src) if t.device.type == "cuda"), None)
    if src.device.type == "cuda":
        torch.cuda.current_stream(src.device).synchronize()  # the engine's writes landed
    if gpu is not None:
        stream = stream_holder.get("stream")
        if stream is None:
            stream = stream_holder["stream"] = torch.cuda.Stream(gpu)
    # With a fault armed, the copy stops half way (tests: a peer that dies mid-copy).
    half = len(src_ids) // 2 if (faults.active("sender_exit") or faults.active("sender_stop")) else 0
    parts = [(src_ids[:half], dst_ids[:half]), (src_ids[half:], dst_ids[half:])] if half else [(src_ids, dst_ids)]
    for i, (s_ids, d_ids) in enumerate(parts):
        if i:
            faults.fire("sender_exit")
            faults.fire("sender_stop")
        if gpu is not None:
            with torch.cuda.device(gpu), torch.cuda.stream(stream):
                _copy(src, dst, s_ids, d_ids, max_direct)
            stream.synchronize()
        else:
            _copy(src, dst, s_ids, d_ids, max_direct)


def _copy(src, dst, s_ids, d_ids, max_direct: int) -> None:
    segs = segments(s_ids, d_ids)
    if len(segs) <= max_direct:
        for s, d, n in segs:
            dst[d : d + n].copy_(src[s : s + n], non_blocking=True)
        return
    gathered = src.index_select(0, torch.tensor(s_ids, device=src.device)).to(dst.device, non_blocking=True)
    dst.index_copy_(0, torch.tensor(d_ids, device=dst.device), gathered)


class IpcSender(SenderTransport):
    name = "ipc"

    def __init__(self, config):
        self.config = config
        self.connections = wire.Connections(config.max_endpoints_per_peer, config.push_timeout_s)
        self._mapped: dict[str, torch.Tensor] = {}  # pool_id -> rows, shared by connections

    async def send(self, ticket, rows, src_block_ids, header) -> None:
        address = ticket.tcp_address
        if not ticket.ipc_domain or ticket.ipc_domain != local_domain() or not address:
            raise HandoffError("transport_unavailable",
                               f"the decode worker at {ticket.control_address} does not share memory with this process")
        async with self.connections.connection(address) as conn:
            dst = conn.state.get("mapped")
            if dst is None:
                try:
                    await conn.send(wire.IPC_OPEN)
                    desc = json.loads(await expect(conn, wire.IPC_POOL, address))
                except (OSError, EOFError) as exc:  # nothing moved yet: let `auto` go on
                    raise HandoffError("transport_unavailable",
                                       f"the decode worker at {address} did not share its pool: {exc}") from None
                conn.clean = True  # a refusal below leaves the connection usable
                dst = self._mapped.get(desc["pool_id"])
                if dst is None:
                    dst = self._mapped[desc["pool_id"]] = map_pool(desc)
                if dst.shape[1] != rows.shape[1]:
                    raise HandoffError("layout_mismatch", "the decode worker's KV blocks have another size")
                conn.state["mapped"] = dst
                conn.clean = False
            await conn.send(wire.IPC_HEADER, header.SerializeToString())
            await expect(conn, wire.OK, address)
            try:
                # Not interruptible: the receiver keeps the blocks until this copy ended.
                await conn.bulk(copy_blocks, rows, dst, list(src_block_ids), list(ticket.block_ids),
                                self.config.max_direct_messages, conn.state, interruptible=False)
                await conn.send(wire.WRITTEN)
                payload = await expect(conn, wire.REPLY, address)
            except (OSError, EOFError):
                raise HandoffError("peer_lost", f"the decode worker at {address} went away mid-handoff") from None
            read_reply(payload, address)
            conn.clean = True

    async def close(self) -> None:
        self.connections.close()
        self._mapped.clear()
