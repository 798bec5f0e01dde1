"""Layout fingerprints, mismatch errors that name the field, and tickets on the wire."""

import pickle
import time

import pytest

from baton.kvtransfer import FirstToken, HandoffError, KVLayout, LayoutMismatchError, Ticket

LAYOUT = KVLayout("llama-3-8b", 32, 8, 128, 16, "bfloat16")


def make_ticket(**kw) -> Ticket:
    args = dict(ticket_id="t1", request_id="r1", control_address="10.0.0.5:50051", transport="ucx",
                ucx_address="10.0.0.5:50052", block_ids=(7, 8, 9), layout=LAYOUT, num_tokens=40,
                expires_at=time.time() + 30)
    args.update(kw)
    return Ticket(**args)


def test_llama3_8b_layout_is_128_kib_per_token():
    assert LAYOUT.bytes_per_token == 128 * 1024
    assert LAYOUT.block_bytes == 2 << 20
    assert LAYOUT.blocks_for(2048) == 128


def test_fingerprint_is_stable_and_changes_with_every_field():
    assert LAYOUT.fingerprint() == KVLayout("llama-3-8b", 32, 8, 128, 16, "bfloat16").fingerprint()
    assert len(LAYOUT.fingerprint()) == 16
    variants = [
        KVLayout("other", 32, 8, 128, 16, "bfloat16"),
        KVLayout("llama-3-8b", 16, 8, 128, 16, "bfloat16"),
        KVLayout("llama-3-8b", 32, 4, 128, 16, "bfloat16"),
        KVLayout("llama-3-8b", 32, 8, 64, 16, "bfloat16"),
        KVLayout("llama-3-8b", 32, 8, 128, 32, "bfloat16"),
        KVLayout("llama-3-8b", 32, 8, 128, 16, "float16"),
        KVLayout("llama-3-8b", 32, 8, 128, 16, "bfloat16", "layer_major"),
    ]
    assert len({v.fingerprint() for v in variants} | {LAYOUT.fingerprint()}) == len(variants) + 1


@pytest.mark.parametrize(
    ("other", "field"),
    [
        (KVLayout("llama-3-8b", 32, 8, 128, 32, "bfloat16"), "block_size"),
        (KVLayout("llama-3-8b", 32, 8, 128, 16, "float32"), "dtype"),
        (KVLayout("mistral", 32, 8, 128, 16, "bfloat16"), "model"),
        (KVLayout("llama-3-8b", 32, 4, 128, 16, "bfloat16"), "num_kv_heads"),
    ],
)
def test_check_compatible_names_the_differing_field(other, field):
    LAYOUT.check_compatible(LAYOUT)
    with pytest.raises(LayoutMismatchError) as info:
        LAYOUT.check_compatible(other)
    assert info.value.reason == "layout_mismatch"
    assert info.value.field == field
    assert field in str(info.value)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="dtype"):
        KVLayout("m", 2, 2, 16, 16, "int8")
    with pytest.raises(ValueError, match="block_size"):
        KVLayout("m", 2, 2, 16, 0, "float32")


def test_ticket_round_trips_through_bytes():
    ticket = make_ticket()
    back = Ticket.from_bytes(ticket.to_bytes())
    assert back == ticket
    assert back.layout_fingerprint == LAYOUT.fingerprint()
    assert back.num_bytes == 3 * LAYOUT.block_bytes


def test_malformed_tickets_are_bad_requests():
    with pytest.raises(HandoffError) as info:
        Ticket.from_bytes(b"\xff\xff not a ticket")
    assert info.value.reason == "bad_request"
    msg = make_ticket().to_proto()
    msg.layout_fingerprint = "0" * 16
    with pytest.raises(HandoffError, match="fingerprint"):
        Ticket.from_proto(msg)
    msg = make_ticket(num_tokens=100).to_proto()
    with pytest.raises(HandoffError, match="cannot hold"):
        Ticket.from_proto(msg)
    msg = make_ticket().to_proto()
    msg.transport = "carrier-pigeon"
    with pytest.raises(HandoffError, match="transport"):
        Ticket.from_proto(msg)


def test_first_token_round_trip_keeps_missing_logprobs_missing():
    assert FirstToken.from_proto(FirstToken(5).to_proto()) == FirstToken(5)
    full = FirstToken(5, -0.25, {5: -0.25, 9: -2.0})
    assert FirstToken.from_proto(full.to_proto()) == full


def test_handoff_errors_survive_pickling_and_reject_unknown_reasons():
    err = pickle.loads(pickle.dumps(HandoffError("timeout", "slow", from_peer=True)))
    assert (err.reason, err.message, err.from_peer) == ("timeout", "slow", True)
    mismatch = pickle.loads(pickle.dumps(LayoutMismatchError("dtype", "float32", "bfloat16")))
    assert mismatch.field == "dtype" and mismatch.reason == "layout_mismatch"
    with pytest.raises(ValueError):
        HandoffError("gremlins")


def test_importing_the_package_does_not_import_torch():
    import subprocess
    import sys

    code = "import baton.kvtransfer, sys; t = baton.kvtransfer.Ticket; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
