"""Block manager and scheduler bookkeeping, on the CPU in milliseconds."""

from __future__ import annotations

import pytest

from baton.engine.block_manager import BlockManager
from baton.engine.scheduler import Scheduler
from baton.engine.sequence import Sequence
from baton.sampling_params import SamplingParams


def make_seq(tokens, rid="r", priority=0, arrival=0.0) -> Sequence:
    return Sequence(rid, 0, list(tokens), SamplingParams(), arrival, priority)


def run_prefill(bm: BlockManager, seq: Sequence) -> None:
    cached = bm.lookup_prefix(seq)
    n = seq.num_tokens - len(cached) * bm.block_size
    assert bm.can_allocate(seq, n, cached)
    bm.allocate(seq, n, cached)
    seq.num_computed_tokens += n
    bm.cache_computed_blocks(seq)


def test_allocation_and_free_return_every_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq(range(10))
    run_prefill(bm, seq)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 7
    bm.free_seq(seq)
    assert bm.num_free_blocks == 10 and all(r == 0 for r in bm.ref_counts)


def test_prefix_hit_shares_blocks_and_counts_tokens():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    run_prefill(bm, a)
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 10, 11])
    run_prefill(bm, b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == 8
    assert bm.ref_counts[a.block_table[0]] == 2
    assert (bm.prefix_queries, bm.prefix_hits) == (9 + 10, 8)


def test_a_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(num_blocks=10, block_size=4)
    run_prefill(bm, make_seq(range(8)))
    again = make_seq(range(8))
    cached = bm.lookup_prefix(again)
    assert len(cached) == 1  # the second block is recomputed for the last token's logits


def test_freed_cached_blocks_survive_until_evicted_least_recent_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    old = make_seq([1, 2, 3, 4, 9])
    run_prefill(bm, old)
    bm.free_seq(old)
    # An uncached allocation takes the never-hashed block first.
    filler = make_seq([7, 7])
    filler_blocks = (bm.allocate(filler, 1), filler.block_table)[1]
    assert bm.block_hashes[filler_blocks[0]] is None
    again = make_seq([1, 2, 3, 4, 5])
    assert len(bm.lookup_prefix(again)) == 2  # still cached
    big = make_seq(range(100, 106))
    assert bm.can_allocate(big, 6)  # 3 free blocks, 2 of them cached: evicted on demand
    bm.allocate(big, 6)
    assert bm.lookup_prefix(make_seq([1, 2, 3, 4, 5])) == []


def test_reserve_prefers_one_contiguous_run():
    bm = BlockManager(num_blocks=16, block_size=4)
    holes = make_seq(range(12))
    bm.allocate(holes, 12)  # blocks 0, 1, 2
    assert bm.reserve(5) == [3, 4, 5, 6, 7]
    with pytest.raises(ValueError):
        bm.reserve(100)
    bm.release([3, 4, 5, 6, 7])
    assert bm.num_free_blocks == 13


def test_release_more_than_taken_is_caught():
    bm = BlockManager(num_blocks=4, block_size=4)
    blocks = bm.reserve(1)
    bm.release(blocks)
    with pytest.raises(RuntimeError, match="released more often"):
        bm.release(blocks)


def scheduler(num_blocks=32, budget=8, max_seqs=4, chunked=True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, 4), max_seqs, budget, chunked)


def test_token_budget_chunks_a_long_prompt():
    s = scheduler(budget=8)
    s.add(make_seq(range(20)))
    batch = s.schedule()
    assert batch.num_new_tokens == [8]


def test_running_decodes_go_before_new_prefills_and_the_budget_holds():
    s = scheduler(budget=6)
    first = make_seq(range(5), "a")
    s.add(first)
    s.schedule()
    first.num_computed_tokens = 5
    first.token_ids.append(99)  # sampled
    s.add(make_seq(range(30), "b", arrival=1.0))
    batch = s.schedule()
    assert [q.request_id for q in batch.seqs] == ["a", "b"]
    assert batch.num_new_tokens == [1, 5]


def test_without_chunked_prefill_a_prompt_waits_for_a_full_budget():
    s = scheduler(budget=8, chunked=False)
    s.add(make_seq(range(10)))
    assert len(s.schedule()) == 0


def test_max_num_seqs_caps_the_batch():
    s = scheduler(budget=100, max_seqs=2)
    for i in range(4):
        s.add(make_seq(range(3), f"r{i}", arrival=i))
    assert [q.request_id for q in s.schedule().seqs] == ["r0", "r1"]


def test_out_of_blocks_preempts_the_lowest_priority_running_sequence():
    s = scheduler(num_blocks=3, budget=100)
    a = make_seq(range(4), "a", priority=0)
    b = make_seq(range(4), "b", priority=1, arrival=1.0)
    s.add(a)
    s.add(b)
    s.schedule()
    for q in (a, b):
        q.num_computed_tokens = 4
        q.token_ids.append(1)
    batch = s.schedule()  # both need a second block: only one is free
    assert batch.preempted == [b] and [q.request_id for q in batch.seqs] == ["a"]
    assert b.num_computed_tokens == 0 and b.block_table == [] and b in s.waiting
