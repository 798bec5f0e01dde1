"""A benchmark's worker process, driven over a pipe: `(command, kwargs)` in, `(ok, value)` out.

Used by `kv_transfer.py` and `kv_cell.py`, whose two processes (sender and receiver, or
prefill and decode engine) each serve commands from the parent while their asyncio loop runs.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp


async def serve_commands(conn, handle) -> None:
    """Answer `await handle(cmd, kwargs)` for each command until the parent sends None; an
    exception is reported as text and serving goes on."""
    loop = asyncio.get_running_loop()
    while True:
        msg = await loop.run_in_executor(None, conn.recv)
        if msg is None:
            return
        cmd, kw = msg
        try:
            conn.send((True, await handle(cmd, kw)))
        except Exception as exc:
            conn.send((False, f"{type(exc).__name__}: {exc}"))


class Worker:
    """`target(conn, *args)` in a spawned process; `call` sends a command and waits for its
    answer (`send` and `recv` split it, so another process can be driven meanwhile)."""

    def __init__(self, target, *args):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()

    def send(self, cmd: str, **kw) -> None:
        self.conn.send((cmd, kw))

    def recv(self):
        ok, value = self.conn.recv()
        if not ok:
            raise RuntimeError(value)
        return value

    def call(self, cmd: str, **kw):
        self.send(cmd, **kw)
        return self.recv()

    def close(self, timeout_s: float = 30) -> None:
        self.conn.send(None)
        self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.kill()
