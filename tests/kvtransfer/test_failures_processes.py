"""Every failure ends in a clear error on both sides and zero leaked blocks.

Two real processes on loopback with real engine KV caches. Processes are killed or stopped
mid-transfer on purpose through BATON_KV_FAULT (baton.kvtransfer.faults).
"""

import time

import pytest
from kvt_harness import PeerDied

from baton.kvtransfer import HandoffError, Ticket

TRANSPORTS = ["grpc", "ucx", "tcp", "ipc"]
PROMPT = list(range(5, 205))  # 200 tokens, 100 KiB of KV: 25 gRPC chunks, 7 UCX messages


def prefill_and_reserve(decode, prefill, rid, ttl_s=None, tokens=PROMPT):
    first = prefill.call("prefill", request_id=rid, prompt_token_ids=tokens)
    ticket = decode.call("reserve", request_id=rid, num_tokens=len(tokens), ttl_s=ttl_s)
    return first, ticket, Ticket.from_bytes(ticket).ticket_id


def error_of(fn, *args, **kwargs) -> HandoffError:
    with pytest.raises(HandoffError) as info:
        fn(*args, **kwargs)
    return info.value


def test_layout_mismatch_is_refused_by_both_sides(peers):
    decode, prefill = peers["d16"], peers["p4"]  # block sizes 16 and 4
    first, ticket, tid = prefill_and_reserve(decode, prefill, "mismatch", tokens=PROMPT[:40])
    sent = error_of(prefill.call, "push", ticket=ticket, request_id="mismatch", first_token=first["token"])
    assert sent.reason == "layout_mismatch" and sent.field == "block_size", sent
    assert "block_size: 4 here, 16 at the peer" in sent.message
    waited = error_of(decode.call, "wait", ticket_id=tid, timeout_s=10)
    assert waited.reason == "layout_mismatch" and "block_size" in waited.message, waited
    assert decode.wait_free(decode.num_blocks) == decode.num_blocks
    assert prefill.wait_free(prefill.num_blocks) == prefill.num_blocks


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_expired_reservation_is_freed_and_refused(peers, transport):
    decode, prefill = peers["d16"], peers["p16"]
    first, ticket, tid = prefill_and_reserve(decode, prefill, f"expired-{transport}", ttl_s=0.3)
    assert decode.wait_free(decode.num_blocks) == decode.num_blocks  # freed at expiry
    sent = error_of(prefill.call, "push", ticket=ticket, request_id=f"expired-{transport}",
                    first_token=first["token"], transport=transport)
    assert sent.reason == "expired", sent
    waited = error_of(decode.call, "wait", ticket_id=tid)
    assert waited.reason == "expired", waited
    assert prefill.wait_free(prefill.num_blocks) == prefill.num_blocks


def test_a_corrupted_chunk_fails_the_handoff(peers):
    decode, prefill = peers["d16"], peers["p16"]
    first, ticket, tid = prefill_and_reserve(decode, prefill, "corrupt")
    prefill.call("set_fault", value="corrupt_chunk")
    try:
        sent = error_of(prefill.call, "push", ticket=ticket, request_id="corrupt",
                        first_token=first["token"], transport="grpc")
    finally:
        prefill.call("set_fault", value="")
    assert sent.reason == "checksum" and "CRC-32" in sent.message, sent
    waited = error_of(decode.call, "wait", ticket_id=tid)
    assert waited.reason == "checksum", waited
    assert decode.wait_free(decode.num_blocks) == decode.num_blocks
    assert prefill.wait_free(prefill.num_blocks) == prefill.num_blocks


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sender_killed_mid_transfer(peers, transport):
    decode, prefill = peers["d16"], peers["p16"]
    first, ticket, tid = prefill_and_reserve(decode, prefill, f"skill-{transport}")
    prefill.call("set_fault", value="sender_exit")
    push = prefill.submit("push", ticket=ticket, request_id=f"skill-{transport}",
                          first_token=first["token"], transport=transport)
    with pytest.raises(PeerDied):
        push.result(30)
    peers.discard("p16")
    peers.start("p16")  # respawn in the background for the next tests
    waited = error_of(decode.call, "wait", ticket_id=tid, timeout_s=20)
    assert waited.reason == "peer_lost", waited
    assert decode.wait_free(decode.num_blocks) == decode.num_blocks


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_receiver_killed_mid_transfer(peers, transport):
    decode, prefill = peers["d16"], peers["p16"]
    first, ticket, tid = prefill_and_reserve(decode, prefill, f"rkill-{transport}")
    decode.call("set_fault", value="receiver_exit")
    sent = error_of(prefill.call, "push", ticket=ticket, request_id=f"rkill-{transport}",
                    first_token=first["token"], transport=transport, timeout_s=10)
    assert decode.wait_exit(10) == 17  # it died mid-transfer
    peers.discard("d16")
    peers.start("d16")
    assert sent.reason == "peer_lost", sent
    assert prefill.wait_free(prefill.num_blocks) == prefill.num_blocks  # held blocks released


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_receiver_that_never_answers(peers, transport):
    """The decode process freezes mid-transfer: the sender times out and gives its blocks
    back; once the decode process runs again it frees the reservation and says why."""
    decode, prefill = peers["d16"], peers["p16"]
    first, ticket, tid = prefill_and_reserve(decode, prefill, f"rstop-{transport}")
    decode.call("set_fault", value="receiver_stop")
    start = time.monotonic()
    sent = error_of(prefill.call, "push", ticket=ticket, request_id=f"rstop-{transport}",
                    first_token=first["token"], transport=transport, timeout_s=1.5)
    try:  # a failed check must not leave the shared decode process stopped for later tests
        assert sent.reason == "timeout" and "did not finish" in sent.message, sent
        assert time.monotonic() - start < 10
        assert decode.wait_stopped(1)
        assert prefill.wait_free(prefill.num_blocks) == prefill.num_blocks
    finally:
        decode.resume()
        decode.call("set_fault", value="")
    waited = error_of(decode.call, "wait", ticket_id=tid, timeout_s=20)
    assert waited.reason in ("timeout", "peer_lost"), waited
    assert decode.wait_free(decode.num_blocks) == decode.num_blocks


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_sender_that_never_answers(peers, transport):
    """The prefill process freezes mid-transfer: the reservation expires and is freed;
    once the prefill process runs again its push fails and its blocks are released.

    With `ipc` the frozen process is half way through its own copy into the decode pool,
    which the decode side cannot stop: the expired reservation's blocks stay out of the pool
    until that copy has ended (here: the process resumes), so nothing lands in blocks that
    another request got."""
    decode, prefill = peers["d16"], peers["p16"]
    first, ticket, tid = prefill_and_reserve(decode, prefill, f"sstop-{transport}", ttl_s=4.0)
    prefill.call("set_fault", value="sender_stop")
    push = prefill.submit("push", ticket=ticket, request_id=f"sstop-{transport}",
                          first_token=first["token"], transport=transport)
    try:  # a failed check must not leave the shared prefill process stopped for later tests
        assert prefill.wait_stopped(15)
        waited = error_of(decode.call, "wait", ticket_id=tid, timeout_s=20)
        assert waited.reason == "expired", waited
        if transport == "ipc":
            reserved = len(Ticket.from_bytes(ticket).block_ids)
            time.sleep(1.0)
            assert decode.call("free") == decode.num_blocks - reserved  # held while the copy may run
        else:
            assert decode.wait_free(decode.num_blocks) == decode.num_blocks
    finally:
        prefill.resume()
        prefill.call("set_fault", value="")
    with pytest.raises(HandoffError) as info:
        push.result(30)
    assert info.value.reason in ("expired", "peer_lost", "timeout"), info.value
    assert prefill.wait_free(prefill.num_blocks) == prefill.num_blocks
    assert decode.wait_free(decode.num_blocks) == decode.num_blocks


def test_garbage_on_the_kv_tcp_port_is_dropped_and_serving_goes_on(peers):
    """A client that sends junk to the decode worker's KV TCP listener loses its connection;
    a header for a ticket that does not exist gets a clear error; handoffs go on."""
    import socket

    from baton.kvtransfer import wire
    from baton.protos import kvtransfer_pb2 as pb

    decode, prefill = peers["d16"], peers["p16"]
    host, port = decode.info["tcp"].rsplit(":", 1)
    for junk in (b"GET / HTTP/1.1\r\n\r\n", wire.frame(wire.HEADER, b"\xff\xff\xff"), wire.frame(99)):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(junk)
            assert sock.recv(1) == b""  # closed by the listener
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(wire.frame(wire.HEADER, pb.KVHandoffHeader(ticket_id="nope").SerializeToString()))
        head = sock.recv(9, socket.MSG_WAITALL)
        assert head[0] == wire.REPLY
        reply = pb.KVPushReply.FromString(sock.recv(int.from_bytes(head[1:], "little"), socket.MSG_WAITALL))
        assert reply.error.reason == "unknown_ticket"
    first, ticket, tid = prefill_and_reserve(decode, prefill, "after-junk", tokens=PROMPT[:40])
    waiter = decode.submit("wait", ticket_id=tid)
    prefill.call("push", ticket=ticket, request_id="after-junk", first_token=first["token"], transport="tcp")
    decode.call("release", block_ids=waiter.result(30)["block_ids"])
    assert decode.wait_free(decode.num_blocks) == decode.num_blocks
