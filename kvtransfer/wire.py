"""Framed TCP connections for the `tcp` and `ipc` data planes.

A frame is `kind (1 byte) | length (8 bytes, little endian) | payload`; control frames are
small and go through the event loop (non-blocking socket). Bulk bytes are not framed: after
an `OK` they follow as a raw stream of exactly `header.num_bytes` bytes, moved by blocking
`sendall` / `recv_into` calls on the connection's own thread, straight from or into the
blocks (or pinned staging buffers), so no protobuf and no extra copy touches them.

Each connection has its own bulk thread: a transfer never waits for a thread another
transfer holds, so senders and receivers cannot starve each other of threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from concurrent.futures import ThreadPoolExecutor

from baton.kvtransfer.errors import HandoffError

# Frame kinds.
HEADER = 1      # sender: a KVHandoffHeader; the bytes follow after OK (tcp)
OK = 2          # receiver: the header is accepted, send
REPLY = 3       # receiver: a KVPushReply (done or error); ends the handoff
IPC_OPEN = 4    # sender: how do I map your pool? (payload: empty)
IPC_POOL = 5    # receiver: the pool's export (JSON), or a REPLY with the error
IPC_HEADER = 6  # sender: a KVHandoffHeader; after OK it writes into the mapped pool
WRITTEN = 7     # sender: every byte is in place (device copies synchronised)

MAX_FRAME = 1 << 20
_PREFIX = 9


def frame(kind: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_FRAME:
        raise HandoffError("bad_request", f"a {len(payload)}-byte control frame is too large")
    return bytes([kind]) + len(payload).to_bytes(8, "little") + payload


class Connection:
    """One TCP connection: control frames on the event loop, bulk work on its own thread."""

    def __init__(self, sock: socket.socket, peer: str):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.sock = sock
        self.peer = peer
        self.closed = False
        self.clean = False  # the last handoff on it ended with its final frame read
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="kv-wire")
        self.state: dict = {}  # per-connection data of a transport (staging buffers, mapped pool)

    @classmethod
    async def connect(cls, address: str, timeout_s: float) -> Connection:
        host, port = address.rsplit(":", 1)
        loop = asyncio.get_running_loop()
        try:
            sock = await asyncio.wait_for(_connect(loop, host, int(port)), timeout_s)
        except TimeoutError:
            raise HandoffError("timeout", f"no TCP connection to the KV listener at {address}",
                               nothing_sent=True) from None
        except OSError as exc:
            raise HandoffError("peer_lost", f"cannot reach the KV listener at {address}: {exc}",
                               nothing_sent=True) from None
        return cls(sock, address)

    async def send(self, kind: int, payload: bytes = b"") -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, frame(kind, payload))

    async def recv(self) -> tuple[int, bytes]:
        """The next frame; raises EOFError when the peer closed the connection."""
        prefix = await self._recv_exact(_PREFIX)
        n = int.from_bytes(prefix[1:], "little")
        if n > MAX_FRAME:
            raise HandoffError("bad_request", f"a control frame claims {n} bytes")
        return prefix[0], (await self._recv_exact(n) if n else b"")

    async def _recv_exact(self, n: int) -> bytes:
        loop = asyncio.get_running_loop()
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = await loop.sock_recv_into(self.sock, view[got:])
            if k == 0:
                raise EOFError(f"{self.peer} closed the connection")
            got += k
        return bytes(buf)

    async def bulk(self, fn, *args, interruptible: bool = True):
        """Run `fn(sock, *args)` on this connection's thread with the socket blocking.

        Cancelling the caller waits until `fn` returned, so no transfer outlives its caller;
        an `interruptible` one is hurried by stopping the socket first (its blocking call
        fails), else the socket is stopped only after `fn` ended."""
        self.sock.setblocking(True)
        fut = asyncio.get_running_loop().run_in_executor(self._thread, fn, self.sock, *args)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if interruptible:
                self.stop()
            await asyncio.gather(fut, return_exceptions=True)
            self.stop()
            raise
        finally:
            if not self.closed:
                self.sock.setblocking(False)

    def readable_now(self) -> bool:
        """Whether bytes (or EOF) wait on an idle connection: then it is not reusable."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) is not None
        except BlockingIOError:
            return False
        except OSError:
            return True

    def stop_reading(self) -> None:
        """Make a blocked `recv_into` return (the peer may still be told why)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)

    def stop(self) -> None:
        """Make any blocked socket call fail at once; `close` afterwards."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stop()
        self.sock.close()
        self._thread.shutdown(wait=False)


async def _connect(loop, host: str, port: int) -> socket.socket:
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, addr)
    except BaseException:
        sock.close()
        raise
    return sock


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from a blocking socket; EOFError if the peer stops first."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("the peer closed the connection mid-transfer")
        got += k


class Connections:
    """A sender's connections, per address: up to `limit` at once, idle ones reused.

    A handoff sets `conn.clean` once its last frame was read; only clean connections go back
    to the idle list, anything else is closed (its protocol state is unknown)."""

    def __init__(self, limit: int, connect_timeout_s: float):
        self._limit = limit
        self._timeout = connect_timeout_s
        self._idle: dict[str, list[Connection]] = {}
        self._limits: dict[str, asyncio.Semaphore] = {}

    @contextlib.asynccontextmanager
    async def connection(self, address: str):
        limit = self._limits.setdefault(address, asyncio.Semaphore(self._limit))
        async with limit:
            conn = None
            idle = self._idle.setdefault(address, [])
            while idle and conn is None:
                conn = idle.pop()
                if conn.closed or conn.readable_now():  # the peer closed it meanwhile
                    conn.close()
                    conn = None
            if conn is None:
                conn = await Connection.connect(address, self._timeout)
            conn.clean = False
            try:
                yield conn
            finally:
                if conn.clean and not conn.closed:
                    idle.append(conn)
                else:
                    conn.close()

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
