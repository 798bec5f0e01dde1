"""Handoffs between two real processes on loopback, into a real engine KV cache, every transport
(`ipc`: the decode engine's pool in shared memory, mapped by the prefill process)."""

import random

import pytest

from baton.kvtransfer import Ticket

TRANSPORTS = ["grpc", "ucx", "tcp", "ipc"]


def handoff(decode, prefill, prompt, transport, request_id):
    """Prefill `prompt` on `prefill`, push it into a reservation on `decode`; returns
    (handoff, digest of the source blocks, the prefill's first token)."""
    first = prefill.call("prefill", request_id=request_id, prompt_token_ids=prompt)
    src_digest = prefill.call("digest", block_ids=first["blocks"])
    ticket = decode.call("reserve", request_id=request_id, num_tokens=len(prompt))
    waiter = decode.submit("wait", ticket_id=Ticket.from_bytes(ticket).ticket_id)
    prefill.call("push", ticket=ticket, request_id=request_id, first_token=first["token"],
                 logprob=first["logprob"], top=first["top"], transport=transport)
    return waiter.result(30), src_digest, first


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("pair", ["16", "4"])
def test_copies_are_byte_exact_for_every_prompt_length(peers, pair, transport):
    decode, prefill = peers["d" + pair], peers["p" + pair]
    bs = int(pair)
    rng = random.Random(f"{pair}{transport}")
    for n in (1, bs - 1 or 2, bs, bs + 1, 100, 333):
        prompt = [rng.randrange(5, 500) for _ in range(n)]
        rid = f"exact-{pair}-{transport}-{n}"
        ticket_blocks_before = decode.call("free")
        got, src_digest, first = handoff(decode, prefill, prompt, transport, rid)
        assert len(got["block_ids"]) == -(-n // bs)
        assert decode.call("digest", block_ids=got["block_ids"]) == src_digest, f"{n} tokens"
        assert got["first_token"].token_id == first["token"]
        assert got["first_token"].logprob == pytest.approx(first["logprob"])
        assert got["first_token"].top_logprobs == pytest.approx(first["top"])
        decode.call("release", block_ids=got["block_ids"])
        assert decode.wait_free(ticket_blocks_before) == ticket_blocks_before
    assert prefill.wait_free(prefill.num_blocks) == prefill.num_blocks  # held blocks released


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_fragmented_blocks_on_both_ends_touch_nothing_else(peers, transport):
    """Source and reservation spread over 30 one-block runs each (UCX gathers into one
    message and scatters it) land exactly in their blocks; the rest of the pool is untouched."""
    decode, prefill = peers["d4"], peers["p4"]
    bs, total = 4, decode.num_blocks
    singles = [Ticket.from_bytes(decode.call("reserve", request_id=f"frag-{i}", num_tokens=bs)) for i in range(60)]
    rest = decode.call("reserve", request_id="frag-rest", num_tokens=bs * (total - 60))
    for t in singles[::2]:  # 30 one-block holes and no longer free run
        assert decode.call("cancel", ticket_id=t.ticket_id)
    ticket = Ticket.from_bytes(decode.call("reserve", request_id="frag-big", num_tokens=bs * 30))
    assert len(ticket.block_ids) == 30 and max(ticket.block_ids) < 60
    src_all = prefill.call("reserve_local", num_tokens=bs * 60, seed=7)
    src = src_all[::2]
    before = decode.call("digest_except", block_ids=list(ticket.block_ids))
    waiter = decode.submit("wait", ticket_id=ticket.ticket_id)
    prefill.call("push", ticket=ticket.to_bytes(), src_block_ids=src, transport=transport)
    got = waiter.result(30)
    assert decode.call("digest", block_ids=got["block_ids"]) == prefill.call("digest", block_ids=src)
    assert decode.call("digest_except", block_ids=got["block_ids"]) == before
    decode.call("release", block_ids=got["block_ids"])
    prefill.call("release", block_ids=src_all)
    for t in [*singles[1::2], Ticket.from_bytes(rest)]:
        assert decode.call("cancel", ticket_id=t.ticket_id)
    assert decode.wait_free(total) == total
    assert prefill.wait_free(total) == total


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("pair", ["16", "4"])
def test_decode_continues_exactly_like_a_single_engine(peers, pair, transport):
    decode, prefill = peers["d" + pair], peers["p" + pair]
    prompt = [random.Random(pair + transport).randrange(5, 500) for _ in range(37)]
    reference = decode.call("generate", request_id=f"ref-{pair}-{transport}", prompt_token_ids=prompt, max_tokens=12)
    rid = f"cont-{pair}-{transport}"
    first = prefill.call("prefill", request_id=rid, prompt_token_ids=prompt)
    ticket = decode.call("reserve", request_id=rid, num_tokens=len(prompt))
    decoded = decode.submit("decode", ticket_id=Ticket.from_bytes(ticket).ticket_id, request_id=rid,
                            prompt_token_ids=prompt, max_tokens=12)
    prefill.call("push", ticket=ticket, request_id=rid, first_token=first["token"], transport=transport)
    assert decoded.result(60) == reference
    assert reference[0] == first["token"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_hundred_concurrent_handoffs(peers, transport):
    decode, prefill = peers["d16"], peers["p16"]
    rng = random.Random(transport)
    lengths = [rng.randrange(1, 65) for _ in range(100)]
    tickets = [decode.call("reserve", request_id=f"many-{transport}-{i}", num_tokens=n)
               for i, n in enumerate(lengths)]
    sources = [prefill.call("reserve_local", num_tokens=n, seed=i) for i, n in enumerate(lengths)]
    waits = decode.submit("wait_many", ticket_ids=[Ticket.from_bytes(t).ticket_id for t in tickets])
    pushes = [dict(ticket=t, src_block_ids=s, first_token=i) for i, (t, s) in enumerate(zip(tickets, sources))]
    results = prefill.call("push_many", pushes=pushes, transport=transport, timeout=120)
    assert [r for r in results if isinstance(r, BaseException)] == []
    handoffs = waits.result(60)
    assert [h["first_token"].token_id for h in handoffs] == list(range(100))
    assert decode.call("digest_many", block_lists=[h["block_ids"] for h in handoffs]) == \
        prefill.call("digest_many", block_lists=sources)
    for h in handoffs:
        decode.call("release", block_ids=h["block_ids"])
    for s in sources:
        prefill.call("release", block_ids=s)
    assert decode.wait_free(decode.num_blocks) == decode.num_blocks
    assert prefill.wait_free(prefill.num_blocks) == prefill.num_blocks
