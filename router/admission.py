"""Admission: take a request only if the fleet can start it now or soon, else 429 at once.

A request's output streams are admitted together, before any worker sees them, and each
stays *queued* until its first output arrives or it ends: while its decode KV is reserved,
while it waits for KV room, while it waits for a prefill or in an engine's queue. The router
knows these exactly, without waiting for a poll; the old count missed a reservation in
flight and a stream whose task had not started, so `--max-queue` never fired in a burst.

The bound comes from what the workers report, per healthy decode (or colocated) worker:

- room: streams it could start now, `min(max_num_seqs - streams it holds, free KV blocks //
  blocks one stream's prompt needs)` (`WorkerInfo.max_num_seqs`, `LoadStats`, plus what
  this router sent since the last poll);
- queue: streams allowed to wait for it, `--max-queue` when given, else one more batch,
  `min(max_num_seqs, KV blocks // blocks one stream needs)`.

A request of k streams is admitted when `queued + k <= room + queue` summed over the
workers, or when nothing is queued (a request larger than the whole queue still runs, alone).
Anything else is a 429 with `Retry-After` before any byte of a response: a burst is refused
at once instead of timing out in a queue. Other router replicas' running streams show in
the workers' reports; their queues are their own. Slow calls never count as failures
here: health is the polls' business (router/workers.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from baton.router.errors import no_worker, overloaded
from baton.router.workers import Worker, WorkerPool


def blocks_for(num_tokens: int, block_size: int) -> int:
    """KV blocks a prompt of `num_tokens` needs to start (its own blocks plus the first
    generated token's)."""
    return -(-(num_tokens + 1) // max(1, block_size))


def worker_room(worker: Worker, blocks_per_stream: int) -> tuple[int, int]:
    """(streams `worker` could start now, streams allowed to wait for it), from its reports."""
    info, stats = worker.info, worker.stats
    if info is None or stats is None:
        return 0, 0
    seqs = info.max_num_seqs or 1
    by_seqs = seqs - worker.load()
    free_blocks = stats.num_free_blocks - worker.reserved_blocks_since_poll
    room = max(0, min(by_seqs, free_blocks // blocks_per_stream))
    batch = max(1, min(seqs, (stats.num_blocks or info.num_blocks) // blocks_per_stream))
    return room, batch


class Admission:
    """Counts queued streams and decides admission; one per router (one event loop)."""

    def __init__(self, pool: WorkerPool, role: str, max_queue: int | None):
        self.pool = pool
        self.role = role  # decode or colocated: the workers that hold a stream to its end
        self.max_queue = max_queue
        self.queued = 0  # streams admitted whose first output has not arrived (nor their end)

    def capacity(self, blocks_per_stream: int) -> tuple[int, int]:
        """(room now, queue size) over the healthy workers of the role."""
        room = queue = 0
        for worker in self.pool.available(self.role):
            r, batch = worker_room(worker, blocks_per_stream)
            room += r
            queue += self.max_queue if self.max_queue is not None else batch
        return room, queue

    def admit(self, prompt_lengths: Sequence[int], streams: int) -> AdmissionTicket:
        """Admit `streams` outputs of prompts this long, or raise 503 (no worker) / 429."""
        workers = self.pool.available(self.role)
        if not workers:
            raise no_worker(self.role)
        block_size = next((w.info.block_size for w in workers if w.info is not None and w.info.block_size), 16)
        need = blocks_for(max(prompt_lengths, default=1), block_size)
        if self.queued:
            room, queue = self.capacity(need)
            if self.queued + streams > room + queue:
                raise overloaded()
        self.queued += streams
        return AdmissionTicket(self, streams)


class AdmissionTicket:
    """One request's admitted streams: each leaves the queue once (`started`: first output
    or end); `close()` releases whatever is left. Both are idempotent."""

    def __init__(self, admission: Admission, streams: int):
        self._admission = admission
        self._left = set(range(streams))

    def started(self, index: int) -> None:
        """Stream `index` (its position in the request's job list) produced output or ended."""
        if index in self._left:
            self._left.discard(index)
            self._admission.queued -= 1

    def close(self) -> None:
        self._admission.queued -= len(self._left)
        self._left.clear()
