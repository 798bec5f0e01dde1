"""CUDA graphs of the decode step (one new token per sequence) for a set of batch sizes.

A decode step of an 8B model is a few hundred kernels; launched one by one from Python they
cost more than the step's memory traffic at small batches. Each captured graph replays the
whole forward pass and the LM head with one launch. A step of `n` sequences replays the
graph of the smallest captured size `>= n`; the padding rows have length 0 and slot -1, so
they read and write no KV and their logits are ignored.

Inputs live in one static device buffer that the graphs read (int64 rows: token ids,
positions, slots; then int32: lengths and block tables); each step fills a pinned host
mirror with numpy and copies the part the step's graph reads over in one non-blocking
transfer. The copy of step n+1 can never overwrite
inputs step n still reads (the copies and replays are ordered on one stream), and the host
never rewrites a mirror whose copy may still be queued: steps alternate between two sets
of mirrors, and the host has waited for step n-1's tokens before it fills step n+1's.

With `side_stream_inputs` (`KernelConfig`) the copy runs on a stream of its own instead: it
waits for the previous replay to end (an event), so it overlaps that step's sampling and
token copy rather than following them, and the replay waits for it (another event). Off by
default: it did not change batch-1 time per token beyond noise. The ordering
above holds either way (step n+1's copy starts after step n's replay, step n+1's replay
after its copy, and step n's replay after step n's copy, which the host's wait for step
n-1's tokens does not precede).
"""

from __future__ import annotations

import logging

import torch

from baton.engine.attention.base import AttentionBackend, AttentionMetadata
from baton.engine.input_prep import table_array
from baton.engine.scheduler import ScheduledBatch
from baton.engine.sequence import Sequence

log = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64 and every 16 after, up to `max_num_seqs`."""
    sizes = [1, 2, 4, 8, *range(16, 65, 8), *range(80, 4097, 16)]
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


class DecodeGraphs:
    def __init__(self, model, backend: AttentionBackend, kv: torch.Tensor, block_size: int,
                 max_model_len: int, max_num_seqs: int, device: torch.device,
                 sizes: list[int] | None = None, side_stream_inputs: bool = False):
        self.model = model
        self.side_stream_inputs = side_stream_inputs
        self.backend = backend
        self.kv = kv
        self.block_size = block_size
        self.device = device
        self.sizes = sorted(sizes) if sizes else capture_sizes(max_num_seqs)
        self.max_size = self.sizes[-1]
        self.width = -(-max_model_len // block_size)  # block-table columns
        b, w = self.max_size, self.width
        # int64 rows: ids, positions, slots [3, b]. int32: lengths [b], then tables [b, w].
        self._inputs = torch.zeros(self._nbytes(b), dtype=torch.uint8, device=device)
        self._longs, self._ints = self._views(self._inputs, b)
        # Two pinned host mirrors, used in turn: with asynchronous scheduling the next step's
        # inputs are written while the previous step's copy may still be queued.
        self._host_sets = [torch.zeros(self._nbytes(b), dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        for host in self._host_sets:
            self._views(host, b)[0][2] = -1
        self._use_host_set(0)
        self._tables = self._ints[b:].view(b, w)
        self._query_start = torch.arange(b + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_replays = 0
        self._copy_stream: torch.cuda.Stream | None = None  # side_stream_inputs, made on first use
        self._replayed: torch.cuda.Event | None = None  # recorded after each replay, with it

    def _nbytes(self, size: int) -> int:
        """Bytes of the inputs a graph of `size` rows reads (all int64 rows and lengths)."""
        return 8 * 3 * self.max_size + 4 * (self.max_size + size * self.width)

    def _views(self, buf: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return buf[: 24 * b].view(torch.long).view(3, b), buf[24 * b :].view(torch.int32)

    def _use_host_set(self, i: int) -> None:
        self._host_index = i
        self._host = self._host_sets[i]
        longs, ints = self._views(self._host, self.max_size)
        self._np_longs = longs.numpy()
        self._np_ints = ints.numpy()
        self._host_tables = self._np_ints[self.max_size :].reshape(self.max_size, self.width)

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self._longs[2, :size],
            query_start_loc=self._query_start[: size + 1],
            seq_lens_t=self._ints[:size],
            block_tables=self._tables[:size],
            query_lens=[1] * size,
            seq_lens=[1] * size,  # never read on the graph path: lengths come from the device
            block_size=self.block_size,
        )

    def _forward(self, size: int) -> torch.Tensor:
        hidden = self.model(self._longs[0, :size], self._longs[1, :size], self.kv, self._meta(size), self.backend)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first so that the smaller ones reuse its memory pool."""
        self._upload(self.max_size)  # all rows padding: length 0, slot -1 (touch no KV)
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)  # compiles the kernels and settles the allocator
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = (graph, logits)
        torch.cuda.synchronize(self.device)
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def can_run(self, batch: ScheduledBatch) -> bool:
        """A decode-only step that fits a captured size and samples every sequence."""
        return bool(self.graphs) and len(batch.seqs) <= self.max_size and batch.decode_only

    def run(self, seqs: list[Sequence], input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [len(seqs), vocab] of the next token of each sequence (a view: use it now).

        `input_ids` (on the device): the step's tokens, when the host does not know them yet
        (asynchronous scheduling: the previous step's samples)."""
        size = self.fill(seqs)
        aside = self.side_stream_inputs
        if aside:
            self._upload_aside(size)
        else:
            self._upload(size)
        self._use_host_set(1 - self._host_index)  # the next step fills the other set
        if input_ids is not None:
            self._longs[0, : len(seqs)].copy_(input_ids)
        graph, logits = self.graphs[size]
        graph.replay()
        if aside:
            self._replayed.record()
        else:
            self._replayed = None  # an ordinary copy follows every replay on the stream
        self.num_replays += 1
        return logits[: len(seqs)]

    def fill(self, seqs: list[Sequence]) -> int:
        """Write the step's inputs into the pinned host buffers; returns the graph size."""
        n = len(seqs)
        size = next(s for s in self.sizes if s >= n)
        bs = self.block_size
        ids, positions, slots = [], [], []
        lens = self._np_ints
        tables = self._host_tables
        for i, seq in enumerate(seqs):
            p = seq.num_computed_tokens
            table = table_array(seq)
            ids.append(seq.token_ids[p])
            positions.append(p)
            slots.append(int(table[p // bs]) * bs + p % bs)
            lens[i] = p + 1
            tables[i, : len(table)] = table
        longs = self._np_longs
        longs[0, :n] = ids
        longs[1, :n] = positions
        longs[2, :n] = slots
        longs[:2, n:size] = 0  # padding rows: token 0 (never a placeholder left from earlier)
        longs[2, n:size] = -1
        lens[n:size] = 0
        return size

    def _upload(self, size: int) -> None:
        end = self._nbytes(size)  # the first `size` table rows
        self._inputs[:end].copy_(self._host[:end], non_blocking=True)

    def _upload_aside(self, size: int) -> None:
        """`_upload` on the side stream, after the previous replay; the current stream waits
        for it."""
        main = torch.cuda.current_stream(self.device)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        previous, self._replayed = self._replayed, torch.cuda.Event()
        copy = self._copy_stream
        if previous is None:  # no replay recorded since the last ordinary copy: all queued work
            copy.wait_stream(main)
        else:
            copy.wait_event(previous)
        with torch.cuda.stream(copy):
            self._upload(size)
            done = torch.cuda.Event()
            done.record(copy)
        main.wait_event(done)
