"""Paged KV block bookkeeping: free list, reference counts, prefix cache. CPU only.

Each full block of a sequence gets a chained hash: hash(parent block's hash, the block's
token ids); a sequence with a LoRA adapter starts its chain from the adapter's name, so
sequences of different adapters never share blocks. A block whose KV is computed is registered under its hash, so a later sequence
with the same prefix reuses it (automatic prefix caching). A block whose reference count
drops to zero goes back to the free list but keeps its hash and contents until it is handed
out again: free cached blocks are evicted least-recently-freed first, and blocks with no
hash are handed out before any cached one.

Methods come in check-then-act pairs (`can_allocate` / `allocate`); the act never fails
after its check said yes.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from baton.engine.sequence import Sequence

BlockHash = bytes


def adapter_root(seq: Sequence) -> BlockHash | None:
    """The parent of a sequence's first block: None for the base model, else a hash of its
    LoRA adapter's name (the name, not the engine-local id: it is what workers agree on)."""
    if seq.lora_request is None:
        return None
    return hashlib.blake2b(b"lora\0" + seq.lora_request.lora_name.encode(), digest_size=16).digest()


def hash_block(parent: BlockHash | None, token_ids: list[int]) -> BlockHash:
    """Chained hash of one full block; equal prefixes give equal hashes in every process."""
    h = hashlib.blake2b(digest_size=16)
    if parent is not None:
        h.update(parent)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[BlockHash | None] = [None] * num_blocks
        self.cached: dict[BlockHash, int] = {}
        # Free blocks in hand-out order: the head goes first. Uncached blocks are put at the
        # head, freed cached blocks at the tail (least recently freed is evicted first).
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    # -- views ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Share of blocks referenced by some sequence (free cached blocks count as free)."""
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache --------------------------------------------------------------------

    def _seq_hashes(self, seq: Sequence, num_full_blocks: int) -> list[BlockHash]:
        hashes: list[BlockHash] = seq.block_hashes
        bs = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else adapter_root(seq)
            hashes.append(hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs]))
        return hashes

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of `seq` (no references taken).

        The last token is always left to compute, since the engine needs its logits.
        """
        # Prompt logprobs and pooling need the hidden states of every prompt position.
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None or seq.pooled:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        found: list[int] = []
        for h in self._seq_hashes(seq, max_blocks):
            block = self.cached.get(h)
            if block is None:
                break
            found.append(block)
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += len(found) * self.block_size
        return found

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register the sequence's full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        # Under asynchronous scheduling the count runs ahead of the tokens the host has read.
        computed = min(seq.num_computed_tokens, seq.num_tokens)
        num_full = min(computed // self.block_size, len(seq.block_table))
        done = seq.num_registered_blocks
        if num_full <= done:
            return
        hashes = self._seq_hashes(seq, num_full)
        for i in range(done, num_full):
            block = seq.block_table[i]
            if self.block_hashes[block] is None and hashes[i] not in self.cached:
                self.cached[hashes[i]] = block
                self.block_hashes[block] = hashes[i]
        seq.num_registered_blocks = num_full

    # -- allocation ----------------------------------------------------------------------

    def _num_new_blocks(self, seq: Sequence, num_new_tokens: int, cached: list[int]) -> int:
        total = self.blocks_for(seq.num_computed_tokens + len(cached) * self.block_size + num_new_tokens)
        return max(0, total - len(seq.block_table) - len(cached))

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> bool:
        """Whether `allocate(seq, num_new_tokens, cached)` would succeed."""
        cached_free = sum(1 for b in cached if self.ref_counts[b] == 0)
        return self._num_new_blocks(seq, num_new_tokens, cached) + cached_free <= len(self.free)

    def can_allocate_all(self, seqs: list[Sequence], num_new_tokens: int) -> bool:
        """Whether every sequence can get `num_new_tokens` more tokens at once."""
        return sum(self._num_new_blocks(seq, num_new_tokens, ()) for seq in seqs) <= len(self.free)

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> None:
        """Give `seq` the blocks for `num_new_tokens` more tokens, after `cached` prefix blocks.

        `cached` comes from `lookup_prefix` and is only passed when the sequence has no
        blocks yet; its tokens count as computed.
        """
        num_new = self._num_new_blocks(seq, num_new_tokens, cached)
        for block in cached:
            self._take_ref(block)
        seq.block_table.extend(cached)
        if cached:
            seq.num_computed_tokens = len(cached) * self.block_size
            seq.num_cached_tokens = seq.num_computed_tokens
            seq.num_registered_blocks = len(cached)
        seq.block_table.extend(self._pop_free() for _ in range(num_new))

    def _take_ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def _pop_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        self._evict(block)
        self.ref_counts[block] = 1
        return block

    def _evict(self, block: int) -> None:
        h = self.block_hashes[block]
        if h is not None:
            if self.cached.get(h) == block:
                del self.cached[h]
            self.block_hashes[block] = None

    def free_seq(self, seq: Sequence) -> None:
        """Drop the sequence's references; its blocks stay cached until evicted."""
        self.release(reversed(seq.block_table))
        seq.block_table = []
        seq.num_registered_blocks = 0

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Drop the blocks past the first `blocks_for(num_tokens)` of `seq` (speculative
        decoding: blocks that held only rejected drafts). Those blocks were never registered in
        the prefix cache (only computed, accepted tokens are), so they go back uncached."""
        keep = self.blocks_for(num_tokens)
        if len(seq.block_table) > keep:
            self.release(reversed(seq.block_table[keep:]))
            # A new list: input preparation caches a table's array per list object.
            seq.block_table = seq.block_table[:keep]

    def release(self, blocks) -> None:
        """Drop one reference on each block, in the given order."""
        for block in blocks:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] < 0:
                raise RuntimeError(f"block {block} released more often than taken")
            if self.ref_counts[block] == 0:
                self.free[block] = None
                if self.block_hashes[block] is None:
                    self.free.move_to_end(block, last=False)

    # -- reservations for KV transfer --------------------------------------------------------

    def can_reserve(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free)

    def reserve(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` free blocks, preferring few contiguous runs of ids.

        A handoff into contiguous blocks is a few large copies instead of many small ones.
        Returns the block ids in order; each holds one reference.
        """
        if num_blocks > len(self.free):
            raise ValueError(f"cannot reserve {num_blocks} blocks: {len(self.free)} free")
        runs = _runs(sorted(self.free))
        # Best fit: the shortest single run that holds everything, else the longest runs.
        fitting = [r for r in runs if r[1] - r[0] >= num_blocks]
        if fitting:
            start, _ = min(fitting, key=lambda r: r[1] - r[0])
            chosen = list(range(start, start + num_blocks))
        else:
            chosen = []
            for start, end in sorted(runs, key=lambda r: r[0] - r[1]):
                chosen.extend(range(start, min(end, start + num_blocks - len(chosen))))
                if len(chosen) == num_blocks:
                    break
        for block in chosen:
            del self.free[block]
            self._evict(block)
            self.ref_counts[block] = 1
        return chosen


def _runs(sorted_ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for i in sorted_ids:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
