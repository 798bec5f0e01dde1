"""Byte views of a block-major KV pool, and how a handoff's bytes map onto blocks.

A pool `kv[num_blocks, ...]` is seen as `rows[num_blocks, block_bytes]` of uint8 (a view).
Block-major means a run of consecutive block ids is one contiguous region, so a handoff is
as many copies as there are runs, not one per layer per block (a transfer's cost is set
by its number of messages more than by its bytes). A handoff's byte stream is its blocks' bytes in prompt order:
byte `i * block_bytes + j` is byte `j` of the prompt's block `i`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

_local = threading.local()


def _pinned(nbytes: int) -> torch.Tensor:
    """This thread's pinned host buffer (reused: host <-> device copies of a chunk go through it)."""
    buf = getattr(_local, "pinned", None)
    if buf is None or buf.numel() < nbytes:
        buf = _local.pinned = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, pin_memory=True)
    return buf[:nbytes]


def _breaks(*seqs: np.ndarray) -> np.ndarray:
    """Indices where a stretch of consecutive ids (in every sequence at once) starts."""
    step = np.zeros(len(seqs[0]) - 1, dtype=bool)
    for ids in seqs:
        step |= np.diff(ids) != 1
    return np.concatenate(([0], np.flatnonzero(step) + 1, [len(seqs[0])]))


def runs(ids: Sequence[int]) -> list[tuple[int, int]]:
    """(start, count) of each stretch of consecutive ids, in the given order."""
    if len(ids) == 0:
        return []
    arr = np.asarray(ids, dtype=np.int64)
    b = _breaks(arr)
    return [(int(arr[i]), int(j - i)) for i, j in zip(b[:-1], b[1:])]


def _consecutive(ids: Sequence[int]) -> bool:
    first = ids[0]
    return ids[-1] - first == len(ids) - 1 and list(ids) == list(range(first, first + len(ids)))


def segments(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, count): maximal stretches contiguous on both sides."""
    if len(src) != len(dst):
        raise ValueError(f"{len(src)} source blocks for {len(dst)} destination blocks")
    if len(src) == 0:
        return []
    if _consecutive(src) and _consecutive(dst):  # the common case, without numpy's overhead
        return [(int(src[0]), int(dst[0]), len(src))]
    s, d = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    b = _breaks(s, d)
    return [(int(s[i]), int(d[i]), int(j - i)) for i, j in zip(b[:-1], b[1:])]


def block_rows(kv: torch.Tensor) -> torch.Tensor:
    """`kv` as `[num_blocks, block_bytes]` uint8, sharing its memory."""
    if not kv.is_contiguous():
        raise ValueError("a KV pool must be one contiguous tensor")
    return kv.view(kv.shape[0], -1).view(torch.uint8)


def region(rows: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """The flat bytes of blocks `start .. start+count-1` (one contiguous view)."""
    return rows[start : start + count].view(-1)


def split(length: int, max_bytes: int) -> list[tuple[int, int]]:
    """[a, b) pieces of at most `max_bytes` (no limit when 0) covering `length` bytes."""
    if max_bytes <= 0 or length <= max_bytes:
        return [(0, length)]
    return [(a, min(a + max_bytes, length)) for a in range(0, length, max_bytes)]


class BlockStream:
    """The bytes of `block_ids` (in order) of a pool, read and written by stream offset."""

    def __init__(self, rows: torch.Tensor, block_ids: Sequence[int]):
        self.rows = rows
        self.block_bytes = rows.shape[1]
        self.num_bytes = len(block_ids) * self.block_bytes
        self._runs = runs(block_ids)
        self._starts = np.cumsum([0] + [c * self.block_bytes for _, c in self._runs]).tolist()

    def pieces(self, offset: int, length: int) -> Iterator[tuple[torch.Tensor, int, int]]:
        """(pool bytes, a, b): stream bytes [offset+a, offset+b) live in the view, in order."""
        if offset < 0 or length < 0 or offset + length > self.num_bytes:
            raise ValueError(f"bytes [{offset}, {offset + length}) outside a {self.num_bytes}-byte stream")
        base, end = offset, offset + length
        i = int(np.searchsorted(self._starts, offset, side="right")) - 1
        while offset < end:
            start, count = self._runs[i]
            run_lo, run_hi = self._starts[i], self._starts[i + 1]
            hi = min(end, run_hi)
            view = region(self.rows, start, count)[offset - run_lo : hi - run_lo]
            yield view, offset - base, hi - base
            offset = hi
            i += 1

    def read(self, offset: int, length: int) -> bytes:
        """Stream bytes [offset, offset+length) as bytes (device pools go through pinned memory)."""
        pieces = list(self.pieces(offset, length))
        if pieces[0][0].device.type == "cpu":
            parts = [view.numpy().tobytes() for view, _, _ in pieces]
            return parts[0] if len(parts) == 1 else b"".join(parts)
        host = _pinned(length)
        for view, a, b in pieces:
            host[a:b].copy_(view)
        return host.numpy().tobytes()

    def write(self, offset: int, data: bytes | memoryview, stream: torch.cuda.Stream | None = None) -> None:
        """Write `data` at stream `offset`. A device pool's copies run on `stream` through this
        thread's pinned buffer and are complete when this returns."""
        src = np.frombuffer(data, dtype=np.uint8)
        pieces = list(self.pieces(offset, len(src)))
        if pieces[0][0].device.type == "cpu":
            for view, a, b in pieces:
                view.numpy()[:] = src[a:b]
            return
        host = _pinned(len(src))
        host.numpy()[:] = src
        with torch.cuda.stream(stream):
            for view, a, b in pieces:
                view.copy_(host[a:b], non_blocking=True)
        (stream or torch.cuda.current_stream(pieces[0][0].device)).synchronize()
