"""Continuous batching under a token budget, with chunked prefill and preemption.

Every step the scheduler hands each chosen sequence a number of tokens to compute: one for a
sequence that is decoding, up to the rest of the prompt for one in prefill. Running
sequences go first (highest priority first), then waiting ones, until the token budget
(`max_num_batched_tokens`) or the sequence cap (`max_num_seqs`) is reached. With LoRA,
a waiting sequence whose adapter would make more than `max_loras` distinct adapters
running waits (later ones of running adapters go ahead of it), and so does one whose
adapter is still being read from disk (`adapter_ready`). When the KV pool
runs out, the lowest-priority running sequence is preempted: its blocks are freed and it
goes back to the waiting queue to be recomputed later (its generated tokens are kept).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from baton.engine.block_manager import BlockManager
from baton.engine.sequence import Sequence, SequenceStatus
from baton.engine.spec_decode.schedule import catch_up_chunks, fit_drafts


@dataclass
class ScheduledBatch:
    """One step's work: each sequence with the number of tokens to compute for it."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Tokens the draft model computes this step (speculative decoding with a draft model):
    # counted in the token budget with `total_tokens`.
    num_draft_tokens: int = 0

    @property
    def decode_only(self) -> bool:
        """Every sequence computes exactly its one newest token (and so is sampled); a step
        that verifies drafts is not decode-only."""
        return all(n == 1 and seq.num_computed_tokens + 1 == seq.num_tokens
                   for seq, n in zip(self.seqs, self.num_new_tokens))

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        max_loras: int | None = None,
        adapter_ready: Callable[[int], bool] | None = None,
        draft_model: bool = False,
    ):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.max_loras = max_loras  # None: LoRA off
        self.adapter_ready = adapter_ready  # adapter id -> in host memory (LoRAManager.ready)
        self.draft_model = draft_model  # a draft model drafts: its tokens count in the budget
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        self.running.sort(key=lambda s: s.sort_key)
        catching_up: list[Sequence] = []  # drafting was due, the draft KV is too far behind
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            num_draft = 0
            if seq.spec_token_ids:  # speculative decoding: verify drafts too, as far as they fit
                num_new, num_draft = fit_drafts(seq, budget, bm, self.draft_model)
                if self.draft_model and not seq.spec_token_ids:
                    catching_up.append(seq)
            while not bm.can_allocate(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                bm.allocate(seq, num_new)
                batch.seqs.append(seq)
                batch.num_new_tokens.append(num_new)
                batch.num_draft_tokens += num_draft
                budget -= num_new + num_draft
                i += 1
        # What the running sequences left: their draft catch-up first, then waiting prefills.
        catching_up = [s for s in catching_up if s.status is SequenceStatus.RUNNING]  # not preempted
        given = catch_up_chunks(catching_up, budget)
        batch.num_draft_tokens += given
        budget -= given

        if batch.preempted:
            # The pool is full: admitting new work now would only preempt it again.
            return batch

        self.waiting.sort(key=lambda s: s.sort_key)
        loras = {s.lora_int_id for s in self.running} - {0}
        w = 0
        while w < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[w]
            if seq.lora_int_id and self.adapter_ready is not None and not self.adapter_ready(seq.lora_int_id):
                w += 1  # its adapter is still being read: others go ahead
                continue
            if self.max_loras and seq.lora_int_id not in loras | {0} and len(loras) >= self.max_loras:
                w += 1  # every slot is taken by running adapters: let others go ahead
                continue
            cached = [] if seq.block_table else bm.lookup_prefix(seq)
            remaining = seq.num_uncomputed_tokens - len(cached) * bm.block_size
            num_new = min(remaining, budget)
            if num_new < remaining and not self.enable_chunked_prefill:
                break
            if not bm.can_allocate(seq, num_new, cached):
                break
            bm.allocate(seq, num_new, cached)
            self.waiting.pop(w)
            if seq.lora_int_id:
                loras.add(seq.lora_int_id)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_seq(seq)
        seq.reset_for_recompute()
        self.waiting.append(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, status: SequenceStatus, free_blocks: bool = True) -> None:
        """Take a sequence out of the queues; free its blocks unless the caller keeps them."""
        seq.status = status
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if free_blocks:
            self.block_manager.free_seq(seq)
