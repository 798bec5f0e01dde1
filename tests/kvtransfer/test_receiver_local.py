"""The reservation life cycle in one process: a real gRPC server on loopback, bare KV pools."""

import asyncio

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from baton.kvtransfer import (
    HandoffError,
    KVLayout,
    KVReceiver,
    KVSender,
    TensorPool,
    TransferConfig,
)
from baton.rpc import server_options

LAYOUT = KVLayout("tiny", 2, 2, 16, 4, "float32")


@pytest.fixture
async def ends():
    registry = CollectorRegistry()
    src, dst = TensorPool(LAYOUT, 32), TensorPool(LAYOUT, 32)
    src.kv.copy_(torch.randn_like(src.kv))
    server = grpc.aio.server(options=server_options())
    receiver = KVReceiver(dst, "grpc", default_ttl_s=5.0, registry=registry,
                          config=TransferConfig(chunk_bytes=4096, window_chunks=2))
    receiver.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await receiver.start(port)
    sender = KVSender(src, registry=registry, config=TransferConfig(chunk_bytes=4096, window_chunks=2))
    yield src, dst, receiver, sender, registry
    await sender.close()
    await receiver.stop()
    await server.stop(None)


async def settle(dst, expected, timeout=5.0):
    for _ in range(int(timeout / 0.01)):
        if await dst.num_free_blocks() == expected:
            return
        await asyncio.sleep(0.01)
    assert await dst.num_free_blocks() == expected


async def test_handoff_copies_bytes_and_hands_over_the_blocks(ends):
    src, dst, receiver, sender, registry = ends
    ticket = await receiver.reserve("r1", 30)  # 8 blocks of 4 tokens, 2 KiB each: 8 chunks
    assert receiver.reserved_blocks == 8 and await dst.num_free_blocks() == 24
    waiter = asyncio.ensure_future(receiver.wait(ticket.ticket_id))
    result = await sender.push(ticket.to_bytes(), [20, 21, 3, 4, 5, 6, 30, 31], 11, -0.1, {11: -0.1})
    handoff = await waiter
    assert result.num_bytes == handoff.num_bytes == 8 * LAYOUT.block_bytes
    assert torch.equal(dst.kv[list(handoff.block_ids)], src.kv[[20, 21, 3, 4, 5, 6, 30, 31]])
    assert handoff.prefilled_kwargs() == {
        "block_ids": list(ticket.block_ids), "first_token_id": 11,
        "first_logprob": pytest.approx(-0.1), "first_top_logprobs": {11: pytest.approx(-0.1)},
    }
    assert receiver.reserved_blocks == 0
    assert await dst.num_free_blocks() == 24  # the caller owns them now
    await receiver.release(handoff)
    assert await dst.num_free_blocks() == 32
    assert result.transport == "grpc"
    for role in ("decode", "prefill"):  # each handoff is counted by transport, with its size
        labels = {"model_name": "tiny", "role": role, "transport": "grpc"}
        assert registry.get_sample_value("baton:kv_transfer_bytes_total", labels) == 8 * LAYOUT.block_bytes
        assert registry.get_sample_value("baton:kv_transfer_seconds_count", labels) == 1
        assert registry.get_sample_value("baton:kv_transfer_handoff_bytes_sum", labels) == 8 * LAYOUT.block_bytes
        assert registry.get_sample_value("baton:kv_transfer_handoff_bytes_bucket", {**labels, "le": "65536.0"}) == 1


async def test_wait_after_completion_still_gets_the_handoff(ends):
    src, dst, receiver, sender, _ = ends
    ticket = await receiver.reserve("r1", 4)
    await sender.push(ticket, [0], 3)
    handoff = await receiver.wait(ticket.ticket_id)
    assert handoff.first_token.token_id == 3
    with pytest.raises(HandoffError) as info:  # claimed: the ticket is gone
        await receiver.wait(ticket.ticket_id)
    assert info.value.reason == "unknown_ticket"
    await receiver.release(handoff)


async def test_expiry_frees_the_blocks_and_both_sides_hear_why(ends):
    src, dst, receiver, sender, registry = ends
    ticket = await receiver.reserve("r1", 9, ttl_s=0.1)
    assert registry.get_sample_value("baton:kv_transfer_reserved_blocks", {"model_name": "tiny", "role": "decode"}) == 3
    await asyncio.sleep(0.2)
    await settle(dst, 32)
    with pytest.raises(HandoffError) as sent:
        await sender.push(ticket, [0, 1, 2], 3)
    with pytest.raises(HandoffError) as waited:
        await receiver.wait(ticket.ticket_id)
    assert sent.value.reason == waited.value.reason == "expired"
    assert receiver.reserved_blocks == 0
    # The reservation expired before any data plane began filling it: transport "none".
    assert registry.get_sample_value("baton:kv_transfer_failures_total",
                                     {"model_name": "tiny", "role": "decode", "reason": "expired",
                                      "transport": "none"}) == 1
    assert registry.get_sample_value("baton:kv_transfer_failures_total",
                                     {"model_name": "tiny", "role": "prefill", "reason": "expired",
                                      "transport": "grpc"}) == 1


async def test_an_unclaimed_filled_ticket_expires_too(ends):
    src, dst, receiver, sender, _ = ends
    receiver.default_ttl_s = 0.1  # the claim window after completion
    ticket = await receiver.reserve("r1", 4, ttl_s=5)
    await sender.push(ticket, [0], 3)
    await asyncio.sleep(0.2)
    await settle(dst, 32)
    with pytest.raises(HandoffError, match="claimed"):
        await receiver.wait(ticket.ticket_id)


async def test_cancel_and_cancel_request(ends):
    src, dst, receiver, sender, _ = ends
    a = await receiver.reserve("r1", 8)
    b = await receiver.reserve("r2", 8)
    waiter = asyncio.ensure_future(receiver.wait(a.ticket_id))
    assert await receiver.cancel(a.ticket_id)
    with pytest.raises(HandoffError) as info:
        await waiter
    assert info.value.reason == "cancelled"
    assert await receiver.cancel_request("r2")
    assert not await receiver.cancel_request("r2")
    assert not await receiver.cancel("nope")
    await settle(dst, 32)
    with pytest.raises(HandoffError) as info:
        await sender.push(b, [0, 1], 3)
    assert info.value.reason == "cancelled" and info.value.from_peer


async def test_wait_timeout_leaves_the_reservation_open(ends):
    src, dst, receiver, sender, _ = ends
    ticket = await receiver.reserve("r1", 4)
    with pytest.raises(HandoffError) as info:
        await receiver.wait(ticket.ticket_id, timeout_s=0.05)
    assert info.value.reason == "timeout"
    await sender.push(ticket, [0], 3)
    await receiver.release(await receiver.wait(ticket.ticket_id))
    await settle(dst, 32)


async def test_a_ticket_is_filled_once(ends):
    src, dst, receiver, sender, _ = ends
    ticket = await receiver.reserve("r1", 4)
    await sender.push(ticket, [0], 3)
    with pytest.raises(HandoffError) as info:
        await sender.push(ticket, [1], 3)
    assert info.value.reason == "busy"
    await receiver.release(await receiver.wait(ticket.ticket_id))


async def test_bad_pushes_fail_before_any_byte_moves(ends):
    src, dst, receiver, sender, _ = ends
    ticket = await receiver.reserve("r1", 8)
    with pytest.raises(HandoffError) as info:
        await sender.push(ticket, [0], 3)  # one block for two
    assert info.value.reason == "bad_request"
    with pytest.raises(HandoffError) as info:  # the sender told the receiver
        await receiver.wait(ticket.ticket_id, timeout_s=2)
    assert info.value.reason == "bad_request"
    with pytest.raises(HandoffError) as info:
        await sender.push(b"garbage", [0], 3)
    assert info.value.reason == "bad_request"
    await settle(dst, 32)


async def test_no_capacity_and_too_long(ends):
    src, dst, receiver, sender, _ = ends
    with pytest.raises(HandoffError) as info:
        await receiver.reserve("r1", 33 * 4)
    assert info.value.reason == "bad_request"
    tickets = [await receiver.reserve(f"r{i}", 16) for i in range(8)]
    with pytest.raises(HandoffError) as info:
        await receiver.reserve("r9", 1)
    assert info.value.reason == "no_capacity"
    for t in tickets:
        await receiver.cancel(t.ticket_id)
    await settle(dst, 32)


async def test_stop_fails_open_reservations(ends):
    src, dst, receiver, sender, _ = ends
    ticket = await receiver.reserve("r1", 8)
    waiter = asyncio.ensure_future(receiver.wait(ticket.ticket_id))
    await receiver.stop()
    with pytest.raises(HandoffError) as info:
        await waiter
    assert info.value.reason == "shutdown"
    assert await dst.num_free_blocks() == 32
