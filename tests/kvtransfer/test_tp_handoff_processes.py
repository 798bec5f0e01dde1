"""KV handoffs between engines of different tensor-parallel sizes, real processes on
loopback: prefill at TP 2 (two processes over gloo) into decode at TP 1, and TP 1 into
TP 2. Each side's handoff pool is in the whole model's layout (the ranks' KV heads
gathered into it, or spread from it), so the transports copy it as they copy any pool,
and decoding continues exactly as a single TP 1 engine."""

import random

import pytest

from baton.kvtransfer import Ticket

TRANSPORTS = ["grpc", "tcp", "ipc"]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("prefill_name, decode_name", [("p4tp2", "d4"), ("p4", "d4tp2")])
def test_decode_at_another_tp_continues_like_a_single_engine(peers, prefill_name, decode_name, transport):
    prefill, decode = peers[prefill_name], peers[decode_name]
    prompt = [random.Random(prefill_name + transport).randrange(5, 500) for _ in range(37)]
    rid = f"tp-{prefill_name}-{decode_name}-{transport}"
    reference = peers["d4"].call("generate", request_id=f"ref-{rid}", prompt_token_ids=prompt, max_tokens=12)
    first = prefill.call("prefill", request_id=rid, prompt_token_ids=prompt)
    assert first["token"] == reference[0]
    ticket = decode.call("reserve", request_id=rid, num_tokens=len(prompt))
    decoded = decode.submit("decode", ticket_id=Ticket.from_bytes(ticket).ticket_id, request_id=rid,
                            prompt_token_ids=prompt, max_tokens=12)
    prefill.call("push", ticket=ticket, request_id=rid, first_token=first["token"], transport=transport)
    assert decoded.result(120) == reference
    assert prefill.wait_free(prefill.num_blocks) == prefill.num_blocks
    assert decode.wait_free(decode.num_blocks) == decode.num_blocks
