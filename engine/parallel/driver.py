"""Rank 0's side: starting ranks 1..N-1 and driving them step by step.

Rank 0 is the engine process: the scheduler, the block manager, the sampler and the
rank-0 shard of the model live there. `RankGroup` spawns the other ranks (`worker.py`),
each with a control pipe; `DrivenModel` is the model the runner calls: every forward and
every LM-head call is first announced to the ranks (`steps.py`), then run on all of them,
in lockstep, through the collectives of the parallel layers.

Failures: a rank that dies (killed, out of memory, an exception) closes its connections,
so rank 0's next collective fails at once; rank 0 then stops every rank and raises
`RankFailedError` naming the rank and how it ended, now and on every later call. Any
other failure in the middle of an op leaves the ranks out of step, and ends them the same
way: a tensor-parallel engine never limps on with ranks that disagree.
"""

from __future__ import annotations

import datetime
import logging
import signal
import socket
import subprocess
import sys
import weakref
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist
from torch import nn

from baton.engine.config import EngineConfig
from baton.engine.errors import RankFailedError
from baton.engine.parallel import steps
from baton.engine.parallel.layers import Collectives
from baton.engine.parallel.layout import ShardLayout

log = logging.getLogger(__name__)

# How long one collective may wait for the other ranks (a hung rank; a dead one fails it
# at once). Ranks wait for the next op on their pipe, which has no limit.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=5)
_POLL_S = 0.1


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the CPU for every rank, or the r-th GPU from rank 0's."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


class RankGroup:
    """Ranks 1..N-1 of one engine, seen from rank 0 (which is this process)."""

    def __init__(self, config: EngineConfig):
        self.size = config.tensor_parallel_size
        self.layouts = [ShardLayout.of(config.hf_config, self.size, r) for r in range(self.size)]
        self.failed: str | None = None
        self.store = dist.TCPStore("127.0.0.1", 0, self.size, True, wait_for_workers=False,
                                   timeout=COLLECTIVE_TIMEOUT)
        self.procs: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        for rank in range(1, self.size):
            # A fresh interpreter, not multiprocessing's spawn: that would import the user's
            # __main__ again (a script without a main guard would start engines in a loop).
            mine, theirs = socket.socketpair()
            proc = subprocess.Popen(
                [sys.executable, "-c", "from baton.engine.parallel.worker import main; main()", str(theirs.fileno())],
                pass_fds=[theirs.fileno()])
            theirs.close()
            conn = Connection(mine.detach())
            conn.send((config, rank, self.store.port))
            self.procs.append(proc)
            self.conns.append(conn)
        # The ranks go when this object does (or the process exits): nothing to join by hand.
        self._finalizer = weakref.finalize(self, _terminate, list(self.procs))
        try:
            self.wait_for("hello")
            self.comm = Collectives(self.store, 0, self.size, config.device, COLLECTIVE_TIMEOUT)
        except BaseException:
            self.close()
            raise

    def wait_for(self, what: str) -> None:
        """Wait until every rank has sent `what` ("hello": reached the store, "ready": its
        shard is loaded); RankFailedError (with the rank's traceback) if one fails first."""
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            while True:
                if conn.poll(_POLL_S):
                    try:
                        message = conn.recv()
                    except EOFError:
                        message = ("error", "its pipe closed")
                    if message[0] == what:
                        break
                    self._fail_startup(rank, message[1] if message[0] == "error" else repr(message))
                if proc.poll() is not None and not conn.poll():
                    self._fail_startup(rank, _how_it_ended(proc))

    def _fail_startup(self, rank: int, why: str) -> None:
        self.close()
        raise RankFailedError(f"tensor-parallel rank {rank} failed while starting: {why}")

    def run(self, header: tuple, fn):
        """Send `header` to every rank, then run rank 0's part `fn()` (whose collectives the
        ranks join) and return its result; RankFailedError if the group fails."""
        if self.failed is not None:
            raise RankFailedError(self.failed)
        try:
            for conn in self.conns:
                conn.send(header)
            return fn()
        except Exception as exc:
            raise self._fail(header[0], exc) from exc

    def _fail(self, op: str, exc: Exception) -> RankFailedError:
        """Name what broke the group, stop every rank, remember it; returns the error."""
        reasons = []
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            try:
                proc.wait(timeout=2.0)  # a rank whose connections just closed is exiting
            except subprocess.TimeoutExpired:
                continue
            error = None
            while conn.poll():
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    break
                if message[0] == "error":
                    error = message[1].strip().splitlines()[-1]
            reasons.append(f"rank {rank} (pid {proc.pid}) {_how_it_ended(proc)}" + (f": {error}" if error else ""))
        if not reasons:
            reasons.append(f"rank 0 failed in the middle of a {op!r} step ({type(exc).__name__}: {exc}), "
                           f"which leaves the ranks out of step")
        self.failed = (f"tensor-parallel engine stopped: {'; '.join(reasons)}. Every rank was stopped; "
                       f"restart the engine")
        log.error("%s", self.failed)
        self.close()
        return RankFailedError(self.failed)

    def close(self) -> None:
        """Stop the ranks (a stop op, then a signal for any that lingers)."""
        for conn in self.conns:
            try:
                conn.send(("stop",))
            except (OSError, ValueError):
                pass  # that rank is gone already
        for proc in self.procs:
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass  # the finalizer below signals it
        self._finalizer()
        for conn in self.conns:
            conn.close()
        self.conns = []


def _terminate(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()  # it holds nothing that outlives it
    for proc in procs:
        proc.wait()


def _how_it_ended(proc: subprocess.Popen) -> str:
    code = proc.poll()
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class DrivenModel(nn.Module):
    """Rank 0's model: the same contract as the reference model (`engine/models/registry.py`),
    each call announced to the other ranks and run on all of them."""

    def __init__(self, model: nn.Module, ranks: RankGroup):
        super().__init__()
        self.model = model
        self.ranks = ranks

    def forward(self, input_ids, positions, kv, meta, backend) -> torch.Tensor:
        def run():
            steps.send_forward(self.ranks.comm, input_ids, positions, meta)
            return self.model(input_ids, positions, kv, meta, backend)

        return self.ranks.run(steps.forward_header(input_ids, meta), run)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] (gathered from every rank's vocabulary part)."""
        hidden = hidden.contiguous()

        def run():
            self.ranks.comm.broadcast(hidden)
            return self.model.compute_logits(hidden)

        return self.ranks.run(("logits", int(hidden.shape[0])), run)

    def gather_kv(self, block_ids: list[int], kv: torch.Tensor, into: torch.Tensor) -> None:
        """Blocks `block_ids` of every rank's pool (`kv` is rank 0's) into `into`, a pool in
        the whole model's layout (all KV heads, any device): each rank's heads in place."""
        ids = torch.tensor(block_ids, device=kv.device)

        def run():
            parts = self.ranks.comm.gather(kv[ids].contiguous())  # [n, layers, 2, block, own heads, dim] each
            rows = ids.to(into.device)
            for layout, part in zip(self.ranks.layouts, parts):
                heads = layout.kv_heads
                into[rows, ..., heads.start : heads.stop, :] = part.to(into.device)

        self.ranks.run(("kv_gather", list(block_ids)), run)

    def scatter_kv(self, block_ids: list[int], kv: torch.Tensor, source: torch.Tensor) -> None:
        """Blocks `block_ids` of `source` (the whole model's layout) into every rank's pool,
        each rank taking its KV heads (rank 0's pool is `kv`)."""
        ids = torch.tensor(block_ids, device=kv.device)
        heads = self.ranks.layouts[0].kv_heads

        def run():
            blocks = self.ranks.comm.broadcast(source[ids.to(source.device)].to(kv.device).contiguous())
            kv[ids] = blocks[..., heads.start : heads.stop, :]

        self.ranks.run(("kv_scatter", list(block_ids)), run)

    def set_lora(self, requests: list, counts: list[int], keep: list[int]) -> None:
        """Every other rank activates the step's adapters as rank 0 did (`LoRAManager.follow`):
        `requests`, each sequence's `LoRARequest` or None; `counts`, its token rows; `keep`,
        the adapter ids in rank 0's host memory."""
        self.ranks.run(("lora", requests, counts, keep), lambda: None)

    def prefetch_lora(self, request) -> None:
        """Every other rank starts reading `request`'s adapter on a thread (rank 0 just
        started its own read; `LoRAManager.prefetch`). Waits for nothing."""
        self.ranks.run(("lora_prefetch", request), lambda: None)

    def lora_reads(self) -> list[tuple[int, int]]:
        """Each other rank's (adapters `follow` found prefetched, adapters it read on the
        step itself), in rank order."""
        return self.ranks.run(("lora_reads",), lambda: [conn.recv()[1] for conn in self.ranks.conns])

    def allocate_kv(self, num_blocks: int) -> None:
        """Every other rank (re)allocates its KV pool of `num_blocks` blocks (0: frees it)."""
        self.ranks.run(("kv", num_blocks), lambda: None)
