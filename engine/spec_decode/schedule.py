"""The scheduler's side of speculative decoding: fit a sequence's drafts into the step."""

from __future__ import annotations

from baton.engine.block_manager import BlockManager
from baton.engine.sequence import Sequence


def fit_drafts(seq: Sequence, budget: int, bm: BlockManager) -> int:
    """Trim `seq.spec_token_ids` (a decoding sequence's drafts) to what the token budget and
    the free blocks hold, and return the tokens to schedule: its last token plus the drafts.
    Drafts are dropped before anything is preempted for them."""
    k = min(len(seq.spec_token_ids), budget - 1)
    while k > 0 and not bm.can_allocate(seq, 1 + k):
        k -= 1
    del seq.spec_token_ids[k:]
    return 1 + k
