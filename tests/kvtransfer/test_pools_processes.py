"""Handoffs between bare KV pools in two processes: on CPU, GPU0 -> GPU1, and two processes
sharing GPU0 (a cell on one GPU); the GPU cases carry the `gpu` marker.

The same sender, receiver and transports as the engine tests, with pools of a larger,
Llama-like block (bf16); on GPUs UCX and `ipc` move device memory directly (CUDA IPC), `tcp`
stages it through pinned host buffers.
"""

import pytest
from kvt_harness import HAS_UCX, Peer

from baton.kvtransfer import Ticket

BLOCK = 16


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


# (device, receiver's CUDA_VISIBLE_DEVICES, sender's)
DEVICES = [
    ("cpu", None, None),
    pytest.param(("cuda", "1,0", "0,1"), id="cuda-two-gpus",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(_gpus() < 2, reason="needs two CUDA devices")]),
    pytest.param(("cuda", "0", "0"), id="cuda-one-gpu",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(_gpus() < 1, reason="needs a CUDA device")]),
]


@pytest.fixture(scope="module", params=DEVICES)
def pools(request):
    device, receiver_gpus, sender_gpus = request.param
    cuda = device == "cuda"
    kw = dict(block_size=BLOCK, num_blocks=256, device="cuda:0" if cuda else "cpu",
              chunk_bytes=1 << 20, max_message_bytes=0)
    receiver = Peer(None, gpu_order=receiver_gpus, **kw)
    sender = Peer(None, gpu_order=sender_gpus, **kw)
    yield receiver.ready(), sender.ready()
    receiver.close()
    sender.close()


def push_and_check(receiver, sender, ticket: Ticket, src, transport):
    waiter = receiver.submit("wait", ticket_id=ticket.ticket_id)
    sent = sender.call("push", ticket=ticket.to_bytes(), src_block_ids=src, first_token=3, transport=transport)
    assert sent["transport"] == transport
    got = waiter.result(60)
    assert receiver.call("digest", block_ids=got["block_ids"]) == sender.call("digest", block_ids=src)
    receiver.call("release", block_ids=got["block_ids"])


@pytest.mark.parametrize("transport", ["ucx", "grpc", "tcp", "ipc"])
def test_contiguous_and_fragmented_handoffs_are_byte_exact(pools, transport):
    if transport == "ucx" and not HAS_UCX:
        pytest.skip("ucxx is not installed")
    receiver, sender = pools
    for n in (1, BLOCK, BLOCK + 1, 1000):  # contiguous at both ends: one message per handoff
        src = sender.call("reserve_local", num_tokens=n, seed=n)
        ticket = Ticket.from_bytes(receiver.call("reserve", request_id=f"c{n}", num_tokens=n))
        push_and_check(receiver, sender, ticket, src, transport)
        sender.call("release", block_ids=src)
    # 20 one-block holes on the receiver, every other block on the sender: gather + scatter.
    singles = [Ticket.from_bytes(receiver.call("reserve", request_id=f"s{i}", num_tokens=BLOCK)) for i in range(40)]
    for t in singles[::2]:
        receiver.call("cancel", ticket_id=t.ticket_id)
    ticket = Ticket.from_bytes(receiver.call("reserve", request_id="frag", num_tokens=20 * BLOCK))
    assert len({b - i for i, b in enumerate(ticket.block_ids)}) == 20
    src_all = sender.call("reserve_local", num_tokens=40 * BLOCK, seed=1)
    before = receiver.call("digest_except", block_ids=list(ticket.block_ids))
    push_and_check(receiver, sender, ticket, src_all[::2], transport)
    assert receiver.call("digest_except", block_ids=list(ticket.block_ids)) == before
    sender.call("release", block_ids=src_all)
    for t in singles[1::2]:
        receiver.call("cancel", ticket_id=t.ticket_id)
    assert receiver.wait_free(256) == 256
    assert sender.wait_free(256) == 256
