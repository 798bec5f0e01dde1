"""Asynchronous scheduling: launch the next decode step before reading this one's tokens.

With `EngineArgs.async_scheduling`, a decode step whose sequences need nothing from the host
at sampling time is launched without waiting for its tokens; the next `LLMEngine.step()`
launches the following step with those tokens still on the device (each sequence holds
`PLACEHOLDER` for its unknown token until the call reads it), then reads the first step's
tokens and processes them while the device computes. Between calls a launched step's
sequences count its token as computed (`num_computed_tokens` runs one ahead of what the host
has read). Sequences that finished in the first step ride along in the second for nothing:
their rows are dropped, and the blocks they free are reused only by work queued after it.
Anything else (a waiting request that could be admitted, prefill, guided decoding,
penalties, logprobs, logits processors, a held KV handoff, a full pool) ends the chain: the
launched step is finished and the next step() schedules normally.

With speculative decoding, a step that verifies drafts is never launched ahead: how many
drafts it accepts (so the next step's positions, slots, blocks and n-gram drafts) is known
only once the host has read its tokens. Draft-free decode steps chain as above while the
load-adaptive rule drafts nothing for the batch (`SpeculativeConfig.num_drafts`: large
batches); once it would draft again, the chain ends and the next step() proposes, schedules
and verifies synchronously. Outputs are those of synchronous speculation either way
(docs/decisions.md, "Speculative decoding").

`AsyncSteps` owns the launched step; `LLMEngine.step` asks it whether a batch may overlap,
launches it, and later trades it for the step after it plus the host's copy of its tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from baton.engine.block_manager import BlockManager
from baton.engine.model_runner import ModelRunner, StepOutput
from baton.engine.scheduler import ScheduledBatch, Scheduler
from baton.engine.sequence import Sequence

# A token the device has sampled and the host has not read yet holds its place in
# `Sequence.token_ids` while the next step is launched, within one step() call. Never a
# valid id, so a step that fed it to the model would fail loudly.
PLACEHOLDER = -1


@dataclass
class Inflight:
    """A launched decode step whose tokens the host has not read."""

    batch: ScheduledBatch
    ids: torch.Tensor  # [N] sampled token ids on the device
    host: torch.Tensor  # their copy in host memory (pinned on CUDA), valid once `event` passed
    event: Any  # torch.cuda.Event, or None on the CPU (nothing to wait for)


class AsyncSteps:
    """The launched-but-unread decode step of one engine (at most one at a time)."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, block_manager: BlockManager,
                 drafts: Callable[[int], bool] = lambda batch_size: False):
        """`drafts(batch_size)`: whether a step of that many decoding sequences would draft
        (speculative decoding, `LLMEngine._drafts`); such a step is never launched ahead."""
        self.runner = runner
        self.scheduler = scheduler
        self.block_manager = block_manager
        self.drafts = drafts
        self.inflight: Inflight | None = None
        self.num_launched_ahead = 0  # steps launched before the previous step's tokens were read

    @staticmethod
    def overlappable(batch: ScheduledBatch, holds_kv) -> bool:
        """True when no sequence of `batch` needs the host at sampling time.

        `holds_kv(request_id)` says whether a request keeps its KV for a handoff."""
        if not batch.decode_only or batch.num_draft_tokens:  # the draft model's catch-up runs in sync
            return False
        for seq in batch.seqs:
            p = seq.params
            if seq.pooled or (p.guided_decoding is not None or p.logits_processors or p.logprobs is not None
                    or p.prompt_logprobs is not None or p.has_penalties or p.bad_words_token_ids
                    or holds_kv(seq.request_id)):
                return False
        return True

    def launch(self, batch: ScheduledBatch, input_ids: torch.Tensor | None = None) -> None:
        """Launch `batch` (a decode-only step) without waiting for its tokens."""
        self.inflight = self._launch(batch, input_ids)

    def advance(self) -> tuple[ScheduledBatch, list[StepOutput]]:
        """Launch the step after the in-flight one if it can go (else none is in flight
        afterwards), then read the in-flight step's tokens. Returns that step's batch and
        outputs, whose tokens are already counted as computed."""
        done, self.inflight = self.inflight, None
        self.inflight = self._launch_next(done)
        if done.event is not None:
            done.event.synchronize()
        token_ids = done.host.tolist()
        for seq in done.batch.seqs:
            _drop_placeholder(seq)  # the engine appends the token it stood for
        return done.batch, [StepOutput(token_id=t) for t in token_ids]

    def _launch(self, batch: ScheduledBatch, input_ids) -> Inflight:
        ids = self.runner.launch_decode(batch, input_ids)
        for seq in batch.seqs:
            seq.num_computed_tokens += 1  # the device computes it in stream order
        host = ids
        event = None
        if ids.is_cuda:
            host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            host.copy_(ids, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return Inflight(batch, ids, host, event)

    def _launch_next(self, done: Inflight) -> Inflight | None:
        """The step after `done`, launched before `done`'s tokens are read; None if it can't."""
        sched = self.scheduler
        keep = [i for i, seq in enumerate(done.batch.seqs) if not seq.is_finished]
        seqs = [done.batch.seqs[i] for i in keep]
        if not seqs or len(seqs) != len(sched.running) or (sched.waiting and len(sched.running) < sched.max_num_seqs):
            return None
        if self.drafts(len(seqs)):
            return None  # the next step drafts: it waits for these tokens
        for seq in seqs:
            seq.token_ids.append(PLACEHOLDER)
        if not self.block_manager.can_allocate_all(seqs, 1):
            for seq in seqs:
                seq.token_ids.pop()
            return None
        for seq in seqs:
            self.block_manager.allocate(seq, 1)
        index = done.ids if len(keep) == len(done.batch.seqs) else done.ids[torch.tensor(keep, device=done.ids.device)]
        self.num_launched_ahead += 1
        return self._launch(ScheduledBatch(seqs, [1] * len(seqs)), index)


def _drop_placeholder(seq: Sequence) -> None:
    if seq.token_ids and seq.token_ids[-1] == PLACEHOLDER:
        seq.token_ids.pop()
