"""`SpecDecoder`: the engine's hooks for speculative decoding (CPU bookkeeping only).

Per `LLMEngine.step`:

1. `propose(running)` before scheduling: each decoding sequence gets up to k drafts in
   `seq.spec_token_ids` (k from the load-adaptive rule; n-gram drafts here, a draft model's
   are written by the model runner once the step's blocks exist). The scheduler trims them
   to the step's budget and free blocks (`schedule.fit_drafts`).
2. The model runner computes the last token and the drafts in one forward (their KV goes
   into the sequence's blocks) and verifies them (`verify.py`).
3. `accepted(seq, out)` after the engine appended the emitted tokens: the computed count
   goes back to the accepted tokens, blocks that held only rejected drafts are freed
   (`BlockManager.trim`); the prefix cache registers blocks from the computed count, so
   only accepted tokens are ever hashed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from baton.engine.block_manager import BlockManager
from baton.engine.sequence import Sequence
from baton.engine.spec_decode.config import NGRAM, SpeculativeConfig
from baton.engine.spec_decode.ngram import ngram_draft

# Stands for a draft the draft model has not written yet (between `propose` and the model
# runner); never a token id.
DRAFT_PENDING = -1


@dataclass
class SpecDecodeStats:
    """Lifetime counters: verify rounds (one per sequence and step that had drafts), drafted
    tokens, and accepted drafts."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verify round emits on average: the accepted drafts plus the target's own."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class SpecDecoder:
    def __init__(self, config: SpeculativeConfig, block_manager: BlockManager, max_model_len: int):
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.stats = SpecDecodeStats()
        # (sequence, n) -> up to n drafts; replaceable (bench/spec_decode.py drafts a known
        # continuation to control the acceptance rate).
        self.drafter: Callable[[Sequence, int], list[int]] = (
            self._ngram if config.method == NGRAM else lambda seq, n: [DRAFT_PENDING] * n)

    def propose(self, running: list[Sequence]) -> None:
        """Draft for every running sequence that is decoding (or about to: one prompt token
        left); clear the others' drafts. Pooled sequences (embeddings) sample nothing."""
        decoding = [s for s in running if s.num_uncomputed_tokens == 1 and not s.pooled]
        k = self.config.num_drafts(len(decoding))
        for seq in running:
            seq.spec_token_ids = []
            seq.draft_catch_up = 0
        if k == 0:
            return
        for seq in decoding:
            n = min(k, self._room(seq))
            if n > 0:
                seq.spec_token_ids = self.drafter(seq, n)

    def _ngram(self, seq: Sequence, n: int) -> list[int]:
        c = self.config
        return ngram_draft(seq.token_ids, n, c.prompt_lookup_min, c.prompt_lookup_max)

    def _room(self, seq: Sequence) -> int:
        """Drafts worth verifying: the step emits at most one token past the drafts, and
        never more than `max_tokens` or the context allows."""
        room = self.max_model_len - seq.num_tokens
        if seq.params.max_tokens is not None:
            room = min(room, seq.params.max_tokens - seq.num_output_tokens - 1)
        return room

    def accepted(self, seq: Sequence, num_drafts: int, num_accepted: int) -> None:
        """Account a verify round whose emitted tokens are appended; roll back the rest."""
        self.stats.num_drafts += 1
        self.stats.num_draft_tokens += num_drafts
        self.stats.num_accepted_tokens += num_accepted
        seq.spec_token_ids = []
        if seq.is_finished:  # its blocks are freed (or held) already
            return
        seq.num_computed_tokens = seq.num_tokens - 1
        seq.num_draft_computed = min(seq.num_draft_computed, seq.num_computed_tokens)
        self.block_manager.trim(seq, seq.num_computed_tokens)
