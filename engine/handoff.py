"""The engine's side of a KV handoff between a prefill engine and a decode engine.

Prefill engine: `add_request(..., hold_kv=True)` computes the prompt, samples the first
token with the client's parameters and ends the request there (status "handoff", unless the
output really ends on that token); its blocks stay referenced (`held_blocks`) until
`release_held`. The first token's text is what the decode engine will show for it.

Decode engine: `reserve_blocks` takes the blocks a prompt needs, the transfer layer writes
the prompt's KV into them (through `kv_cache`), and `add_prefilled_request` admits the
request from its first token on; `release_blocks` gives back a reservation never admitted.

`HandoffHooks` is mixed into `LLMEngine`; it uses the engine's block manager, scheduler,
request table and token path and keeps no state of its own besides `held`.
"""

from __future__ import annotations

import logging
import time

import torch

from baton.engine.errors import DuplicateRequestError, InvalidRequestError, NoCapacityError
from baton.engine.sequence import Sequence
from baton.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class HandoffHooks:
    """Disaggregation hooks of `LLMEngine` (not thread-safe, like the engine)."""

    held: dict[str, list[int]]  # request id -> blocks kept for a KV handoff

    @property
    def kv_cache(self) -> torch.Tensor:
        """The engine's KV pool, `[num_blocks, num_layers, 2, block_size, kv_heads, head_dim]`
        (`baton.engine.kv_cache`). The transfer layer copies a handoff's blocks out of it
        (held blocks) or into it (reserved blocks, before `add_prefilled_request`) and
        touches no other block. Its layout is the whole model's (every KV head) at any
        tensor_parallel_size: above 1 it is a host copy (`ModelRunner.handoff_kv`) that held
        blocks are gathered into when their request finishes and reserved blocks are spread
        from when `add_prefilled_request` admits them."""
        return self.runner.handoff_kv

    def held_blocks(self, request_id: str) -> list[int] | None:
        """Blocks of a finished `hold_kv` request, in prompt order (None if not held)."""
        return self.held.get(request_id)

    def release_held(self, request_id: str) -> None:
        """Drop a finished `hold_kv` request's blocks (a no-op if none are held)."""
        blocks = self.held.pop(request_id, None)
        if blocks is not None:
            self.block_manager.release(reversed(blocks))
            log.debug("%s released its %d held blocks", request_id, len(blocks))

    def reserve_blocks(self, num_tokens: int) -> list[int]:
        """Reserve the blocks a prompt of `num_tokens` needs.

        Raises NoCapacityError when they don't fit now, InvalidRequestError when the prompt
        can never be served."""
        self.check_prompt_length(num_tokens)
        needed = self.block_manager.blocks_for(num_tokens)
        if not self.block_manager.can_reserve(needed):
            raise NoCapacityError(f"{needed} KV blocks needed, {self.block_manager.num_free_blocks} free")
        return self.block_manager.reserve(needed)

    def release_blocks(self, blocks: list[int]) -> None:
        """Give back reserved blocks that were never admitted (failed or expired handoff)."""
        self.block_manager.release(reversed(blocks))

    def add_prefilled_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        block_ids: list[int],
        first_token_id: int,
        first_logprob: float | None = None,
        first_top_logprobs: dict[int, float] | None = None,
        prompt: str | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        resume_token_ids: list[int] | None = None,
        lora_request=None,
    ) -> None:
        """Admit a request whose prompt KV is already in `block_ids` (from `reserve_blocks`).

        The engine takes over the blocks' references, also when this raises (it releases
        them then), so a caller never has to guess who owns them after a bad request. The
        request continues from its first token exactly as if this engine had computed the
        prompt. `resume_token_ids`: outputs streamed before a failover, prefilled with the
        prompt (`add_request(..., hold_kv=True, resume_token_ids=...)`): the blocks hold
        prompt and resumed tokens, which become the first outputs as in `add_request`, and
        `first_token_id` follows them. `lora_request`: the adapter the prefill engine
        computed the KV with. Raises DuplicateRequestError or InvalidRequestError (LoRAError
        for an adapter this engine cannot use).
        """
        resume = list(resume_token_ids or ())
        num_tokens = len(prompt_token_ids) + len(resume)
        try:
            if request_id in self.requests:
                raise DuplicateRequestError(request_id)
            if params.n != 1:
                raise InvalidRequestError("a prefilled request must have n=1")
            if len(block_ids) != self.block_manager.blocks_for(num_tokens):
                raise InvalidRequestError(
                    f"{len(block_ids)} blocks do not match a prompt of {len(prompt_token_ids)} tokens"
                    + (f" and {len(resume)} resumed ones" if resume else "")
                )
            params = self.with_bad_words(params)
            arrival = time.time() if arrival_time is None else arrival_time
            seq = Sequence(request_id, 0, list(prompt_token_ids), params, arrival, priority,
                           token_ids=list(prompt_token_ids) + resume, lora_request=lora_request)
            request = self._new_request(request_id, prompt, list(prompt_token_ids), [seq], arrival,
                                        lora_request=lora_request)
        except BaseException:
            self.release_blocks(list(block_ids))
            raise
        self.runner.import_kv(list(block_ids))  # to the tensor-parallel ranks' pools (TP > 1)
        seq.block_table = list(block_ids)
        seq.num_computed_tokens = num_tokens
        self.block_manager.cache_computed_blocks(seq)
        self.requests[request_id] = request
        now = time.time()
        request.metrics.first_scheduled_time = now
        request.metrics.time_in_queue = now - arrival
        self._changed[request_id] = request
        self._append(request, seq, first_token_id, first_logprob, first_top_logprobs, now)
        if not seq.is_finished:
            self.scheduler.add(seq)
