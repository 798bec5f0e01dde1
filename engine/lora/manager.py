"""`LoRAManager`: an engine's adapters between disk, host memory and GPU slots.

Three stages, the last two each least-recently-used:
- reading: an adapter a request names that is not in host memory is read, checked and
  turned into host tensors on a thread of its own (`acquire` starts it, so the engine
  thread never waits on a disk); requests naming it wait in the queue (`ready` is false)
  while others run. The engine thread takes finished reads in before it schedules
  (`collect_reads`): a good one joins host memory, a bad one fails the requests naming it;
- host memory: adapters read from disk, kept while a request uses them (a reference
  count) and after, up to `max_cpu_loras` unused ones;
- GPU slots: `max_loras` fixed-size slots per projection (`ops.py` shapes; slot 0 is
  "no adapter", all zeros). Before each step `activate` puts the step's adapters into
  slots, evicting the least recently used slot the step does not need, and writes each
  token's slot into `token_slots`, the index the LoRA layers read. The buffers never move,
  so CUDA graphs captured over them replay any adapters.

The scheduler admits at most `max_loras` distinct adapters into the running set
(`Scheduler.max_loras`), and only adapters in host memory, so a step always fits in the
slots. No I/O happens in `activate`: an adapter in a step belongs to a live request, whose
reference keeps it in host memory; `activate` only copies host tensors into a slot.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from baton.engine.config import LoRAConfig
from baton.engine.lora.adapter import LoRAAdapter, LoRAError, LoRALayout, load_adapter
from baton.engine.lora.request import LoRARequest

log = logging.getLogger(__name__)


@dataclass
class LoRAStats:
    """Adapter counters for metrics (cumulative counts since start)."""

    max_loras: int
    resident: list[str]  # names of the adapters in GPU slots
    cached: list[str]  # names of the adapters in host memory
    reading: list[str]  # names of the adapters being read from disk
    loads: int  # copies from host memory into a GPU slot
    disk_loads: int  # reads of an adapter directory
    evictions: int  # adapters evicted from a GPU slot
    requests: dict[str, int]  # requests added, per adapter name


class LoRAManager:
    def __init__(self, config: LoRAConfig, layout: LoRALayout, dtype: torch.dtype, device: torch.device,
                 max_tokens: int, shard: tuple[LoRALayout, Callable] | None = None):
        """`layout`: the projections this model computes; `shard` (a tensor-parallel rank):
        (the whole model's layout, which adapters are checked against, and `cut(module, A,
        B)`, the rank's part of a pair, `parallel/shard.py:shard_lora`)."""
        self.config = config
        self.layout = layout
        self.adapter_layout, self.cut = shard or (layout, None)
        self.dtype = dtype
        self.device = device
        self.max_rank = config.max_lora_rank
        slots, rank = config.max_loras + 1, config.max_lora_rank
        # (layer, projection name) -> (A [slots, n R, in], B [slots, out, R])
        self.buffers: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in range(layout.num_layers):
            for proj in layout.projections:
                a = torch.zeros(slots, len(proj.slices) * rank, proj.in_features, dtype=dtype, device=device)
                b = torch.zeros(slots, proj.out_features, rank, dtype=dtype, device=device)
                self.buffers[(layer, proj.name)] = (a, b)
        self.token_slots = torch.zeros(max_tokens, dtype=torch.int32, device=device)
        # Whether the current step computes the adapters' products: false for an eager step
        # with no adapter; true while CUDA graphs are captured (their replays always do).
        self.active = False
        self.slot_ids: list[int | None] = [None] * slots  # slot -> adapter id (slot 0: none, always)
        self.slot_lru: OrderedDict[int, None] = OrderedDict()  # occupied slots, least recent first
        self.host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # adapter id -> adapter, least recent first
        self.refs: Counter[int] = Counter()  # adapter id -> live requests using it
        # adapter id -> (request, its read): adapters being read on threads of their own
        self.reading: dict[int, tuple[LoRARequest, concurrent.futures.Future]] = {}
        # Called on the reading thread when a read ends (the async engine wakes its thread).
        self.on_read: Callable[[], None] | None = None
        # Called on the engine thread when a read starts (at TP > 1 rank 0 tells the other
        # ranks to start theirs: `follow` then finds it done or under way).
        self.on_read_start: Callable[[LoRARequest], None] | None = None
        # A rank other than 0: adapters `follow` found prefetched (read, or being read, since
        # rank 0 started its read) and those it had to start reading on the step itself.
        self.prefetched_reads = self.step_reads = 0
        self.loads = self.disk_loads = self.evictions = 0
        self.requests_per_adapter: Counter[str] = Counter()
        self.load_seconds = 0.0  # time spent copying adapters into slots

    # -- reading and host memory (the engine's thread, at add and finish) -------------------

    def acquire(self, request: LoRARequest) -> None:
        """Count a new request on `request`'s adapter; start reading it if it is neither in
        host memory nor being read (the request waits until `ready`). Raises LoRAError
        (nothing kept) for an id already known under another path."""
        if not isinstance(request, LoRARequest):
            raise LoRAError(f"lora_request must be a LoRARequest, got {type(request).__name__}")
        lora_id = request.lora_int_id
        known = self.host[lora_id].request if lora_id in self.host else (
            self.reading[lora_id][0] if lora_id in self.reading else None)
        if known is not None and (known.lora_local_path != request.lora_local_path
                                  or known.lora_name != request.lora_name):
            raise LoRAError(f"lora_int_id {lora_id} is adapter {known.lora_name!r} ({known.lora_local_path}); "
                            f"give {request.lora_name!r} ({request.lora_local_path}) another id")
        if lora_id in self.host:
            self.host.move_to_end(lora_id)
        elif lora_id not in self.reading:
            self._start_read(request)
        self.refs[lora_id] += 1
        self.requests_per_adapter[request.lora_name] += 1
        self._trim_host()

    def prefetch(self, request: LoRARequest) -> None:
        """Start reading `request`'s adapter if it is neither in host memory nor being read,
        taking no reference (a decode worker's reservation: the read overlaps the prefill
        elsewhere). An id known under another path is left alone (`acquire` refuses it)."""
        if request.lora_int_id not in self.host and request.lora_int_id not in self.reading:
            self._start_read(request)

    def _start_read(self, request: LoRARequest) -> None:
        self.reading[request.lora_int_id] = (request, self.read_async(request))
        if self.on_read_start is not None:
            self.on_read_start(request)

    def ready(self, lora_id: int) -> bool:
        """The adapter is in host memory (a request naming it may be scheduled)."""
        return lora_id in self.host

    def read(self, request: LoRARequest) -> LoRAAdapter:
        """Read and check `request`'s adapter into host tensors (any thread: it touches no
        state of the manager). Raises LoRAError for an adapter that cannot be used."""
        try:
            return load_adapter(request, self.adapter_layout, self.max_rank, self.dtype,
                                pin=self.device.type == "cuda", cut=self.cut)
        except LoRAError:
            raise
        except Exception as exc:  # an I/O error, a torch error: still this adapter's fault
            raise LoRAError(f"LoRA adapter {request.lora_name!r} ({request.lora_local_path}) could not be read: "
                            f"{type(exc).__name__}: {exc}") from exc

    def read_async(self, request: LoRARequest) -> concurrent.futures.Future:
        """`read` on a daemon thread of its own (a slow disk delays only this adapter, and a
        hung one never blocks the process's exit); the future holds the `LoRAAdapter`."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            future.set_running_or_notify_cancel()
            try:
                future.set_result(self.read(request))
            except BaseException as exc:
                future.set_exception(exc)
            if self.on_read is not None:
                self.on_read()

        threading.Thread(target=run, name=f"baton-lora-read-{request.lora_int_id}", daemon=True).start()
        return future

    def collect_reads(self) -> dict[int, LoRAError]:
        """Take in the reads that ended: a good adapter joins host memory (the requests
        naming it become `ready`); returns {adapter id: error} for those that failed (the
        caller fails the requests naming them; their releases drop the references)."""
        failed = {}
        for lora_id, (request, future) in list(self.reading.items()):
            if not future.done():
                continue
            del self.reading[lora_id]
            error = future.exception()
            if error is not None:
                log.warning("LoRA adapter %r (id %d) could not be used: %s", request.lora_name, lora_id, error)
                failed[lora_id] = error if isinstance(error, LoRAError) else LoRAError(str(error))
                continue
            self.install(future.result())
        return failed

    def wait_for_read(self, timeout: float) -> None:
        """Block until a read ends (or `timeout` seconds): for a driver with nothing else to do."""
        futures = [f for _, f in self.reading.values()]
        if futures:
            concurrent.futures.wait(futures, timeout, return_when=concurrent.futures.FIRST_COMPLETED)

    def reads_pending(self) -> bool:
        """Some read has not ended yet, and none has ended untaken (`collect_reads`)."""
        return bool(self.reading) and not any(f.done() for _, f in self.reading.values())

    def install(self, adapter: LoRAAdapter) -> None:
        """Put an adapter read by `read` into host memory (most recently used; unused ones
        beyond `max_cpu_loras` go, least recently used first)."""
        lora_id = adapter.request.lora_int_id
        self.disk_loads += 1
        self.host[lora_id] = adapter
        self.host.move_to_end(lora_id)
        log.info("LoRA adapter %r (id %d, rank %d, %.1f MiB) read from %s", adapter.request.lora_name, lora_id,
                 adapter.rank, adapter.nbytes / 2**20, adapter.request.lora_local_path)
        self._trim_host()

    def release(self, lora_int_id: int) -> None:
        """A request using the adapter left the engine."""
        self.refs[lora_int_id] -= 1
        if self.refs[lora_int_id] <= 0:
            del self.refs[lora_int_id]
        self._trim_host()

    def _trim_host(self) -> None:
        """Drop least recently used adapters no request uses, down to max_cpu_loras in all."""
        excess = len(self.host) - self.config.max_cpu_loras
        for lora_id in list(self.host):
            if excess <= 0:
                break
            if lora_id not in self.refs:
                self._forget(lora_id)
                excess -= 1

    def _forget(self, lora_id: int) -> None:
        """Drop an adapter from host memory and its GPU slot (an id may come back with
        another path once it is forgotten)."""
        del self.host[lora_id]
        if lora_id in self.slot_ids:
            slot = self.slot_ids.index(lora_id)
            self.slot_ids[slot] = None
            self.slot_lru.pop(slot, None)
            self.evictions += 1

    def drop(self, lora_name: str) -> bool:
        """Forget an adapter that no request uses (unloading it from serving): its host copy
        and GPU slot, and the result of a read no request waits for any more. Returns False
        when a request still uses it (nothing changed)."""
        ids = [i for i, a in self.host.items() if a.request.lora_name == lora_name]
        reads = [i for i, (r, _) in self.reading.items() if r.lora_name == lora_name]
        if any(i in self.refs for i in ids + reads):
            return False
        for i in ids:
            self._forget(i)
        for i in reads:
            del self.reading[i]
        return True

    def follow(self, requests: list[LoRARequest | None], counts: list[int], keep: list[int]) -> None:
        """A tensor-parallel rank other than 0: the step rank 0 activated (`requests`: each
        sequence's adapter or None, `counts`: its token rows; `keep`: the adapter ids in rank
        0's host memory, which this rank's host memory mirrors). An adapter not in host
        memory was normally prefetched (rank 0 sends `prefetch` when it starts its own
        read): that read is taken in, waited for if it has not ended; one that was not (or
        was read under another path) is read here, on the step (rank 0 read and checked it
        before it scheduled the request); an id rank 0 now knows under another path
        replaces the old one."""
        step = {r.lora_int_id: r for r in requests if r is not None}
        # Rank 0's requests hold its adapters; here, what rank 0 keeps is held, and this
        # step's adapters (so that installing one never trims another of the step).
        self.refs = Counter(dict.fromkeys([*keep, *step], 1))
        for lora_id in [i for i in self.host if i not in self.refs]:
            self._forget(lora_id)
        for lora_id, request in step.items():
            known = self.host.get(lora_id)
            if known is not None and known.request != request:
                self._forget(lora_id)
        # Ended prefetches wait here for their step; beyond max_cpu_loras + max_loras the
        # oldest go (those of requests rank 0 failed or aborted, or, under pressure, one a
        # later step then reads itself), so they hold no unbounded host memory.
        excess = len(self.reading) - self.config.max_cpu_loras - self.config.max_loras
        for lora_id, (_, future) in list(self.reading.items()):
            if excess <= 0:
                break
            if future.done() and lora_id not in step:
                del self.reading[lora_id]
                excess -= 1
        for lora_id, request in step.items():
            if lora_id in self.host:
                self.host.move_to_end(lora_id)
                continue
            started, future = self.reading.pop(lora_id, (None, None))
            if started == request:
                self.prefetched_reads += 1
                self.install(future.result())  # waits for a read not ended; raises its error
            else:
                self.step_reads += 1
                self.install(self.read(request))
        self.activate([r.lora_int_id if r is not None else 0 for r in requests], counts)

    # -- GPU slots (the model runner, before each forward) -------------------------------

    def activate(self, lora_ids: list[int], counts: list[int]) -> None:
        """Put the adapters of a step into slots and write its token slots: sequence j
        (adapter id `lora_ids[j]`, 0: none) has `counts[j]` consecutive token rows.
        Raises RuntimeError if the step has more distinct adapters than slots (the scheduler
        never builds one)."""
        needed = {i for i in lora_ids if i}
        if len(needed) > self.config.max_loras:
            raise RuntimeError(f"a step with {len(needed)} adapters; max_loras={self.config.max_loras}")
        slot_of = {0: 0}
        for lora_id in needed:
            slot_of[lora_id] = self._slot(lora_id, needed)
        # Written even without adapters: a CUDA graph replay reads them whatever `active` says.
        self.active = bool(needed)
        rows = np.repeat(np.array([slot_of[i] for i in lora_ids], dtype=np.int32), counts)
        staged = torch.from_numpy(rows)
        if self.device.type == "cuda":
            staged = staged.pin_memory().to(self.device, non_blocking=True)
        self.token_slots[: len(rows)].copy_(staged)

    def _slot(self, lora_id: int, needed: set[int]) -> int:
        if lora_id in self.slot_ids:
            slot = self.slot_ids.index(lora_id)
            self.slot_lru.move_to_end(slot)
            return slot
        free = [s for s in range(1, len(self.slot_ids)) if self.slot_ids[s] is None]
        if free:
            slot = free[0]
        else:  # the least recently used slot this step does not need
            slot = next(s for s in self.slot_lru if self.slot_ids[s] not in needed)
            log.debug("LoRA slot %d: adapter id %d evicted", slot, self.slot_ids[slot])
            self.evictions += 1
            del self.slot_lru[slot]
        self._load(slot, self.host[lora_id])
        self.slot_ids[slot] = lora_id
        self.slot_lru[slot] = None
        return slot

    def _load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy an adapter from host memory into `slot` of every buffer (zeros where it
        trains nothing, and past its rank)."""
        start = time.perf_counter()
        rank, r = self.max_rank, adapter.rank
        for layer in range(self.layout.num_layers):
            for proj in self.layout.projections:
                a, b = self.buffers[(layer, proj.name)]
                a[slot].zero_()
                b[slot].zero_()
                for i, ((module, width), off) in enumerate(zip(proj.slices, proj.offsets())):
                    pair = adapter.weights.get((layer, module))
                    if pair is not None:
                        a[slot, i * rank : i * rank + r].copy_(pair[0], non_blocking=True)
                        b[slot, off : off + width, :r].copy_(pair[1], non_blocking=True)
        self.loads += 1
        self.load_seconds += time.perf_counter() - start

    @contextlib.contextmanager
    def capturing(self):
        """Steps run under this (CUDA graph capture) compute the adapters' products."""
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def stats(self) -> LoRAStats:
        names = {i: a.request.lora_name for i, a in self.host.items()}
        return LoRAStats(
            max_loras=self.config.max_loras,
            resident=[names.get(i, str(i)) for i in self.slot_ids[1:] if i is not None],
            cached=list(names.values()),
            reading=[r.lora_name for r, _ in self.reading.values()],
            loads=self.loads,
            disk_loads=self.disk_loads,
            evictions=self.evictions,
            requests=dict(self.requests_per_adapter),
        )


__all__ = ["LoRAError", "LoRAManager", "LoRAStats"]
