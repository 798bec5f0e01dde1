"""`auto`: the sender picks the fastest data plane the pair can use, and the choice shows in
both workers' metrics. Real processes on loopback; "another node" is a ticket whose
`ipc_domain` is not this node's (what a decode worker elsewhere would send)."""

import dataclasses

import pytest

from baton.kvtransfer import Ticket
from baton.kvtransfer.transport import candidates


def _ticket(**kw) -> Ticket:
    from baton.kvtransfer import KVLayout

    base = dict(ticket_id="t", request_id="r", control_address="10.0.0.5:50051", transport="auto",
                block_ids=(0,), layout=KVLayout("m", 1, 1, 8, 4, "float32"), num_tokens=4,
                expires_at=0.0, ucx_address="10.0.0.5:50052", tcp_address="10.0.0.5:50053",
                ipc_domain="node-a")
    return Ticket(**base | kw)


ALL = ("grpc", "tcp", "ipc", "ucx")


def test_the_order_is_ipc_ucx_tcp_grpc_among_what_both_sides_have():
    assert candidates(_ticket(), ALL) == ["ipc", "ucx", "tcp", "grpc"]
    assert candidates(_ticket(ucx_address=""), ALL) == ["ipc", "tcp", "grpc"]
    assert candidates(_ticket(ucx_address="", ipc_domain=""), ALL) == ["tcp", "grpc"]
    assert candidates(_ticket(ucx_address="", ipc_domain="", tcp_address=""), ALL) == ["grpc"]
    assert candidates(_ticket(), ("grpc", "tcp")) == ["tcp", "grpc"]  # a --kv-transfer tcp prefill worker


def test_a_ticket_that_names_its_transport_gets_only_that_one():
    assert candidates(_ticket(transport="tcp"), ALL) == ["tcp"]
    assert candidates(_ticket(transport="ucx"), ("grpc",)) == ["ucx"]  # refused later, with a reason


def push_auto(decode, prefill, tokens, seed, rewrite=None):
    """Push a synthetic prompt through an auto ticket (optionally rewritten); returns the
    transport the sender used. Checks the bytes and frees everything."""
    src = prefill.call("reserve_local", num_tokens=tokens, seed=seed)
    ticket = Ticket.from_bytes(decode.call("reserve", request_id=f"auto-{seed}", num_tokens=tokens))
    assert ticket.transport == "auto" and ticket.tcp_address and ticket.ipc_domain
    sent = dataclasses.replace(ticket, **rewrite) if rewrite else ticket
    waiter = decode.submit("wait", ticket_id=ticket.ticket_id)
    result = prefill.call("push", ticket=sent.to_bytes(), src_block_ids=src, first_token=5)
    got = waiter.result(30)
    assert decode.call("digest", block_ids=got["block_ids"]) == prefill.call("digest", block_ids=src)
    decode.call("release", block_ids=got["block_ids"])
    prefill.call("release", block_ids=src)
    return result["transport"]


def handoffs(peer, role, transport):
    return peer.call("metric", metric="baton:kv_transfer_seconds_count",
                     labels={"model_name": peer.model, "role": role, "transport": transport}) or 0


@pytest.fixture(scope="module")
def pair(peers):
    decode, prefill = peers["d16"], peers["p16"]
    for p in (decode, prefill):
        p.model = p.call("model_name")
    return decode, prefill


@pytest.mark.parametrize("rewrite, expected", [
    (None, "ipc"),                                              # same node, shared memory
    ({"ipc_domain": "another-node"}, "ucx"),                    # elsewhere, decode has UCX
    ({"ipc_domain": "another-node", "ucx_address": ""}, "tcp"),  # elsewhere, no UCX
    ({"ipc_domain": "", "ucx_address": "", "tcp_address": ""}, "grpc"),
    # A TCP listener nobody can reach (a port a network policy closes): nothing was sent, so
    # the handoff goes on over gRPC on the worker port.
    ({"ipc_domain": "", "ucx_address": "", "tcp_address": "127.0.0.1:1"}, "grpc"),
])
def test_auto_picks_the_fastest_path_and_the_metrics_say_which(pair, rewrite, expected):
    decode, prefill = pair
    before = handoffs(decode, "decode", expected), handoffs(prefill, "prefill", expected)
    assert push_auto(decode, prefill, 40, seed=len(expected), rewrite=rewrite) == expected
    assert handoffs(decode, "decode", expected) == before[0] + 1
    assert handoffs(prefill, "prefill", expected) == before[1] + 1
    assert decode.wait_free(decode.num_blocks) == decode.num_blocks


def test_auto_falls_back_to_tcp_when_the_pool_is_not_shared():
    """A decode worker on this node that exports no pool (here: a `tcp` worker; in life an
    export that failed) answers the ipc request by closing the connection: nothing moved,
    so the sender goes on to `tcp`."""
    from kvt_harness import Peer

    kw = dict(block_size=16, num_blocks=64, chunk_bytes=1 << 16)
    decode, prefill = Peer(None, transport="tcp", **kw), Peer(None, **kw)
    try:
        decode.ready(), prefill.ready()
        assert decode.info["tcp"] and not decode.info["ipc"]
        ticket = Ticket.from_bytes(decode.call("reserve", request_id="fallback", num_tokens=100))
        # What an auto worker on this node that could not export its pool would look like
        # to the sender if it still advertised the domain: the sender's own.
        claimed = dataclasses.replace(ticket, transport="auto", ipc_domain=prefill.info["ipc"])
        src = prefill.call("reserve_local", num_tokens=100, seed=1)
        waiter = decode.submit("wait", ticket_id=ticket.ticket_id)
        sent = prefill.call("push", ticket=claimed.to_bytes(), src_block_ids=src, first_token=1)
        got = waiter.result(30)
        assert sent["transport"] == "tcp"
        assert decode.call("digest", block_ids=got["block_ids"]) == prefill.call("digest", block_ids=src)
    finally:
        decode.close()
        prefill.close()
