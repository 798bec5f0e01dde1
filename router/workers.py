"""The router's view of the workers: a client per worker, health and load by polling.

A worker's client (`Worker.stub`) is the worker API's gRPC stub over a channel, or, for
the engine of an in-process `baton serve` (worker/local.py:LocalStub), an object with the
same methods, calls and errors that calls the servicer in this process directly: the pool's
`connect` chooses. Everything here and in the dispatcher is the same for both.

Each `Worker` is polled every `poll_interval` seconds (`Info` once, then `Stats`); a worker
is healthy when its last poll succeeded, its role is the one expected and it is not
draining. Between polls the router counts what it sent (`sent_since_poll`, `outstanding`) so
that a burst of requests spreads out instead of piling onto the worker that looked idlest
at the last poll. Discovery replaces the address set; a removed worker is retired: it takes
no new work and its channel closes once its in-flight calls end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

import grpc

from baton import tracing
from baton.protos import worker_pb2, worker_pb2_grpc
from baton.rpc import DEFAULT_KEEPALIVE, Keepalive, channel_options

log = logging.getLogger(__name__)

ROLE_NAMES = {worker_pb2.PREFILL: "prefill", worker_pb2.DECODE: "decode",
              worker_pb2.COLOCATED: "colocated"}
SLOW_POLLS_UNHEALTHY = 3
# Reconnect quickly after a worker restarts.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class Worker:
    """One worker as the router sees it. `stub`: the worker API's client; None: a gRPC
    stub over a channel to `address`."""

    def __init__(self, address: str, role: str, keepalive: Keepalive = DEFAULT_KEEPALIVE, stub=None):
        self.address = address
        self.role = role
        self.channel = None
        if stub is None:
            self.channel = grpc.aio.insecure_channel(address, options=channel_options(keepalive) + RECONNECT_OPTIONS,
                                                     interceptors=tracing.client_interceptors())
            stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.stub = stub
        self.info: worker_pb2.WorkerInfo | None = None
        self.stats: worker_pb2.LoadStats | None = None
        self.healthy = False
        self.retired = False
        self.last_error: str | None = None
        self.last_poll = 0.0
        self.slow_polls = 0  # consecutive polls that timed out
        self.outstanding = 0  # calls from this router in flight on the worker
        self.sent_since_poll = 0  # new requests sent since the last Stats
        self.reserved_blocks_since_poll = 0

    def __repr__(self) -> str:
        return f"Worker({self.role} {self.address} healthy={self.healthy})"

    @property
    def available(self) -> bool:
        return self.healthy and not self.retired

    @property
    def cell(self) -> str:
        """The cell (one pod of prefill and decode engines) the worker reported; "" if none."""
        return self.info.cell if self.info is not None else ""

    def load(self) -> int:
        """Requests running or queued on the worker, as best the router knows."""
        polled = (self.stats.num_running + self.stats.num_waiting) if self.stats else 0
        return max(polled + self.sent_since_poll, self.outstanding)

    def waiting(self) -> int:
        """Requests queued in the worker's engine: the last poll, or what this router alone
        has in flight beyond the engine's batch size, whichever is larger."""
        polled = self.stats.num_waiting if self.stats else 0
        batch = self.info.max_num_seqs if self.info is not None and self.info.max_num_seqs else None
        return max(polled, self.outstanding - batch) if batch else polled

    def add_blocks_since_poll(self, num_prompt_tokens: int) -> None:
        """Count the KV a prompt sent to this worker takes until the next poll shows it."""
        if self.info is not None and self.info.block_size:
            self.reserved_blocks_since_poll += -(-num_prompt_tokens // self.info.block_size)

    def serves(self, lora_name: str) -> bool:
        """Whether requests may name LoRA adapter `lora_name` here ("": the base model)."""
        return not lora_name or (self.stats is not None and lora_name in self.stats.lora_adapters)

    def holds(self, lora_name: str) -> bool:
        """Whether the adapter's weights are in the worker's memory (no disk read), as of
        the last poll."""
        return bool(lora_name) and self.stats is not None and lora_name in self.stats.lora_resident

    def kv_usage(self) -> float:
        if self.stats is None or not self.stats.num_blocks:
            return 0.0
        return self.stats.kv_cache_usage + self.reserved_blocks_since_poll / self.stats.num_blocks

    def mark_failed(self, error: str) -> None:
        """Out of rotation until a poll succeeds. Only polls call this: a call that fails
        asks for a poll (`WorkerPool.check`), so one slow or refused call is never taken
        for a dead worker on its own."""
        if self.healthy:
            log.warning("%s worker %s failed: %s", self.role, self.address, error)
        self.healthy = False
        self.last_error = error

    async def poll(self, timeout: float) -> None:
        try:
            if self.info is None:
                info = await self.stub.Info(worker_pb2.InfoRequest(), timeout=timeout)
                actual = ROLE_NAMES.get(info.role, "unknown")
                if actual != self.role:
                    self.mark_failed(f"is a {actual} worker, listed as {self.role}")
                    return
                self.info = info
            stats = await self.stub.Stats(worker_pb2.StatsRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            # A worker that answers slowly is busy, not gone: only a few slow polls in a row
            # (or a refused connection) take it out.
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and self.info is not None:
                self.slow_polls += 1
                if self.slow_polls < SLOW_POLLS_UNHEALTHY:
                    return
            self.mark_failed(f"{exc.code().name}: {exc.details()}")
            self.info = None  # a restarted worker may be configured differently
            return
        self.slow_polls = 0
        self.stats = stats
        self.sent_since_poll = 0
        self.reserved_blocks_since_poll = 0
        self.last_poll = time.monotonic()
        was = self.healthy
        self.healthy = not stats.draining
        self.last_error = "draining" if stats.draining else None
        if self.healthy and not was:
            log.info("%s worker %s is healthy (%s)", self.role, self.address, self.info.model_name)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()


class WorkerPool:
    """Workers by role, kept fresh by a polling task. `connect(address)` gives the client of
    a worker added by address (default: None, a gRPC stub over a channel)."""

    def __init__(self, roles: Iterable[str], poll_interval: float = 0.5, keepalive: Keepalive = DEFAULT_KEEPALIVE,
                 connect: Callable[[str], object | None] = lambda address: None):
        self.roles = tuple(roles)
        self.connect = connect
        self.poll_interval = poll_interval
        self.keepalive = keepalive
        self.workers: dict[str, dict[str, Worker]] = {role: {} for role in self.roles}
        self._retired: list[Worker] = []
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()
        self._checks: dict[Worker, asyncio.Task] = {}

    # -- membership ----------------------------------------------------------------------

    def set_addresses(self, role: str, addresses: Iterable[str]) -> None:
        current = self.workers[role]
        wanted = set(addresses)
        for address in wanted - set(current):
            current[address] = Worker(address, role, self.keepalive, self.connect(address))
            log.info("%s worker added: %s", role, address)
        for address in set(current) - wanted:
            worker = current.pop(address)
            worker.retired = True
            self._retired.append(worker)
            log.info("%s worker removed: %s", role, address)
        if self._task is not None:
            asyncio.get_running_loop().create_task(self.poll_all())

    def all(self, role: str) -> list[Worker]:
        return list(self.workers[role].values())

    def available(self, role: str) -> list[Worker]:
        return [w for w in self.workers[role].values() if w.available]

    def adapters(self, roles: Iterable[str]) -> set[str]:
        """LoRA adapter names that every role has an available worker serving."""
        names: set[str] | None = None
        for role in roles:
            served = {n for w in self.available(role) if w.stats is not None for n in w.stats.lora_adapters}
            names = served if names is None else names & served
        return names or set()

    def model_limits(self, roles: Iterable[str]) -> tuple[int, int] | None:
        """(max_model_len, vocab_size) every available worker of these roles accepts."""
        infos = [w.info for role in roles for w in self.available(role) if w.info is not None]
        if not infos:
            return None
        return min(i.max_model_len for i in infos), min(i.vocab_size for i in infos)

    # -- change notification: waiters for capacity wake when load may have dropped ---------

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_changed(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    # -- polling -------------------------------------------------------------------------

    async def poll_all(self) -> None:
        workers = [w for role in self.roles for w in self.workers[role].values()]
        timeout = max(1.0, 4 * self.poll_interval)
        await asyncio.gather(*(w.poll(timeout) for w in workers), return_exceptions=True)
        for worker in list(self._retired):
            if worker.outstanding == 0:
                self._retired.remove(worker)
                await worker.close()
        self.notify()

    def check(self, worker: Worker) -> None:
        """Poll `worker` now (a call to it failed as if it were unreachable); the poll
        decides whether it leaves rotation. One check per worker at a time."""
        if worker in self._checks or self._task is None:
            return

        async def run() -> None:
            try:
                await worker.poll(max(1.0, 4 * self.poll_interval))
            finally:
                self._checks.pop(worker, None)
                self.notify()

        self._checks[worker] = asyncio.get_running_loop().create_task(run())

    async def _poll_loop(self) -> None:
        while True:
            try:
                await self.poll_all()
            except Exception:  # polling must never stop
                log.exception("polling workers failed")
            await asyncio.sleep(self.poll_interval)

    async def start(self) -> None:
        await self.poll_all()
        self._task = asyncio.get_running_loop().create_task(self._poll_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for worker in [w for role in self.roles for w in self.workers[role].values()] + self._retired:
            await worker.close()

    def summary(self) -> dict:
        return {role: {"healthy": len(self.available(role)), "total": len(self.workers[role])}
                for role in self.roles}
