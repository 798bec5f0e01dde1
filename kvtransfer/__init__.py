"""KV transfer: push a prompt's KV blocks from a prefill engine into reserved blocks of a
decode engine (decisions and failure reasons: docs/decisions.md, "KV transfer").

The contract, end to end:

1. Decode worker: `ticket = await receiver.reserve(request_id, num_prompt_tokens)` takes
   the blocks (contiguous runs preferred) and returns a `Ticket`; `ticket.to_bytes()` goes
   to the router, which passes it unread to a prefill worker. Raises HandoffError
   ("no_capacity": retry later or elsewhere; "bad_request": the prompt can never fit).
2. Prefill worker: prefill with `hold_kv=True`, then
   `await sender.push_held(Ticket.from_bytes(b), request_id, first_token_id, logprob, top)`
   (or `push(ticket, src_block_ids, ...)` for blocks the caller manages). It checks the
   layouts (a mismatch names the differing field), copies the blocks straight into the
   ticket's blocks and hands over the first token; it returns once the decode worker
   verified every byte, and raises HandoffError otherwise (after telling the decode worker).
3. Decode worker: `handoff = await receiver.wait(ticket.ticket_id)` returns the verified
   `Handoff` (block ids, first token and logprobs). From then on the caller owns the blocks:
   `engine.generate_prefilled(request_id, prompt_token_ids=..., params=...,
   **handoff.prefilled_kwargs())` admits the request (the engine owns the blocks from that
   call on, even if it raises), or `await receiver.release(handoff)` gives them back.
4. Failures: expiry (`ttl_s`), `receiver.cancel(ticket_id)` / `cancel_request(request_id)`,
   a sender's abort, a lost or silent peer, a corrupted chunk: `wait` raises HandoffError
   with the reason and the blocks return to the pool once no copy into them is in flight.
   Nothing is written into a reservation after it failed, and the decode engine never sees
   a request whose handoff did not complete.

`baton.kvtransfer` imports no torch until a sender, receiver or pool is used; the router
only needs `Ticket` (or nothing: it forwards bytes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from baton.kvtransfer.config import TransferConfig
from baton.kvtransfer.errors import REASONS, HandoffError, LayoutMismatchError
from baton.kvtransfer.layout import KVLayout
from baton.kvtransfer.ticket import TRANSPORTS, FirstToken, Handoff, Ticket

__all__ = [
    "REASONS",
    "TRANSPORTS",
    "EnginePool",
    "FirstToken",
    "Handoff",
    "HandoffError",
    "KVLayout",
    "KVPool",
    "KVReceiver",
    "KVSender",
    "LayoutMismatchError",
    "PushResult",
    "TensorPool",
    "Ticket",
    "TransferConfig",
]

_LAZY = {
    "KVReceiver": "baton.kvtransfer.receiver",
    "KVSender": "baton.kvtransfer.sender",
    "PushResult": "baton.kvtransfer.sender",
    "KVPool": "baton.kvtransfer.pool",
    "EnginePool": "baton.kvtransfer.pool",
    "TensorPool": "baton.kvtransfer.pool",
}

if TYPE_CHECKING:
    from baton.kvtransfer.pool import EnginePool, KVPool, TensorPool
    from baton.kvtransfer.receiver import KVReceiver
    from baton.kvtransfer.sender import KVSender, PushResult


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'baton.kvtransfer' has no attribute {name!r}")
