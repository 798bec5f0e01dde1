"""The scheduler's side of speculative decoding: fit a sequence's drafts into the step.

With a draft model the step's token budget (`max_num_batched_tokens`) covers the draft
model's tokens too: a verify round of k drafts costs the target 1 + k tokens and the draft
model its catch-up (every token without draft KV: one or two after a verify round, the
whole prompt at a request's first speculative step, after a preemption or a KV handoff)
plus k - 1 one-token forwards. A sequence whose catch-up leaves no room for a draft decodes
without drafts, exactly, while its draft KV catches up in chunks of what the step's budget
leaves once every running sequence has its tokens (`catch_up_chunks`).
"""

from __future__ import annotations

from baton.engine.block_manager import BlockManager
from baton.engine.sequence import Sequence


def catch_up(seq: Sequence) -> int:
    """Tokens of `seq` without draft-model KV (all of them known, so computable now)."""
    return seq.num_tokens - seq.num_draft_computed


def fit_drafts(seq: Sequence, budget: int, bm: BlockManager, draft_model: bool = False) -> tuple[int, int]:
    """Trim `seq.spec_token_ids` (a decoding sequence's drafts) to what the token budget and
    the free blocks hold. Returns (target tokens to schedule: its last token plus the drafts,
    draft-model tokens this counts: 0 for n-gram drafts or no draft). Drafts are dropped
    before anything is preempted for them."""
    if draft_model:
        k = min(len(seq.spec_token_ids), (budget - catch_up(seq)) // 2)  # costs catch-up + 2k
    else:
        k = min(len(seq.spec_token_ids), budget - 1)
    k = max(k, 0)
    while k > 0 and not bm.can_allocate(seq, 1 + k):
        k -= 1
    del seq.spec_token_ids[k:]
    return 1 + k, (catch_up(seq) + k - 1 if draft_model and k else 0)


def catch_up_chunks(seqs: list[Sequence], budget: int) -> int:
    """Give each of `seqs` (scheduled without drafts although drafting was due) a chunk of
    its draft catch-up (`seq.draft_catch_up`), in order, within `budget`; return the tokens
    given."""
    given = 0
    for seq in seqs:
        seq.draft_catch_up = min(catch_up(seq), budget - given)
        given += seq.draft_catch_up
    return given
