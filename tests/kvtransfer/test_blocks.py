"""How a handoff's byte stream maps onto block runs, and the UCX message plan."""

import asyncio

import pytest
import torch

from baton.kvtransfer.blocks import BlockStream, block_rows, runs, segments, split
from baton.kvtransfer.ucx_transport import _post, plan_buffers


def pool(num_blocks=16, block_numel=24, dtype=torch.float32):
    kv = torch.arange(num_blocks * block_numel, dtype=dtype).view(num_blocks, 2, 3, 4)
    return kv, block_rows(kv)


def test_runs_and_segments_keep_prompt_order():
    assert runs([7, 8, 9, 3, 4, 10]) == [(7, 3), (3, 2), (10, 1)]
    assert runs([]) == []
    assert segments([0, 1, 2, 3], [5, 6, 9, 10]) == [(0, 5, 2), (2, 9, 2)]
    assert segments([4, 5, 6], [1, 2, 3]) == [(4, 1, 3)]
    with pytest.raises(ValueError):
        segments([1, 2], [3])


def test_segments_one_run_shortcut_only_takes_consecutive_ids():
    assert segments([4, 5, 6], (9, 10, 11)) == [(4, 9, 3)]
    # first and last ids span the right length, but the middle is not consecutive
    assert segments([0, 2, 2], [0, 1, 2]) == [(0, 0, 1), (2, 1, 1), (2, 2, 1)]
    assert segments([0, 1, 2], [5, 7, 7]) == [(0, 5, 1), (1, 7, 1), (2, 7, 1)]


def test_split_covers_every_byte():
    assert split(10, 0) == [(0, 10)]
    assert split(10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_block_rows_is_a_byte_view_of_the_same_memory():
    kv, rows = pool(dtype=torch.bfloat16)
    assert rows.shape == (16, 24 * 2) and rows.dtype == torch.uint8
    rows[3].zero_()
    assert kv[3].abs().sum() == 0


def test_stream_reads_blocks_in_prompt_order_across_runs():
    kv, rows = pool()
    ids = [9, 10, 2, 5, 6, 7]
    stream = BlockStream(rows, ids)
    assert stream.num_bytes == 6 * rows.shape[1]
    whole = stream.read(0, stream.num_bytes)
    assert whole == rows[ids].numpy().tobytes()
    # Any window, including ones crossing run boundaries, matches the whole.
    for off, n in [(0, 1), (95, 3), (rows.shape[1] - 5, 200), (stream.num_bytes - 7, 7)]:
        assert stream.read(off, n) == whole[off : off + n]
    with pytest.raises(ValueError):
        stream.read(stream.num_bytes - 1, 2)


def test_stream_writes_land_only_in_its_blocks():
    src_kv, src_rows = pool()
    dst_kv = torch.zeros_like(src_kv)
    dst_rows = block_rows(dst_kv)
    data = BlockStream(src_rows, [0, 1, 2, 3]).read(0, 4 * src_rows.shape[1])
    dst = BlockStream(dst_rows, [12, 3, 4, 8])
    for off in range(0, len(data), 37):  # odd chunk size: chunks straddle blocks and runs
        dst.write(off, data[off : off + 37])
    assert torch.equal(dst_kv[[12, 3, 4, 8]], src_kv[[0, 1, 2, 3]])
    untouched = [b for b in range(16) if b not in (12, 3, 4, 8)]
    assert dst_kv[untouched].abs().sum() == 0


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("max_message", [0, 40])
def test_ucx_plans_agree_on_message_sizes_and_move_the_right_bytes(staged, max_message):
    src_kv, src_rows = pool()
    dst_kv = torch.zeros_like(src_kv)
    dst_rows = block_rows(dst_kv)
    src, dst = [1, 2, 3, 9, 4], [10, 11, 5, 6, 7]
    send, send_staging = plan_buffers(src_rows, src, dst, True, staged, max_message)
    recv, recv_staging = plan_buffers(dst_rows, dst, src, False, staged, max_message)
    assert [b.numel() for b in send] == [b.numel() for b in recv]
    if not staged and not max_message:
        assert len(send) == len(segments(src, dst)) == 4  # zero-copy: one message per region
    if staged and not max_message:
        assert len(send) == 1  # one gathered message
    if send_staging is not None:
        torch.index_select(src_rows, 0, torch.tensor(src), out=send_staging.view(len(src), -1))
    for s, r in zip(send, recv):  # what UCX does
        r.copy_(s)
    if recv_staging is not None:
        dst_rows.index_copy_(0, torch.tensor(dst), recv_staging.view(len(dst), -1))
    assert torch.equal(dst_kv[dst], src_kv[src])


async def test_posted_requests_start_in_call_order():
    """Messages of one tag match receives in posting order: `_post` must keep call order."""
    order = []

    async def submit(i):
        order.append(i)  # a UCXX request is submitted here, before the first await
        await asyncio.sleep(0)
        return i

    tasks = [_post(submit(i)) for i in range(5)]
    assert await asyncio.gather(*tasks) == [0, 1, 2, 3, 4]
    assert order == [0, 1, 2, 3, 4]
