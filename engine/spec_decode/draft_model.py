"""Draft-model speculation: a small model with the target's vocabulary drafts greedily.

The draft model has its own weights, attention backend and KV pool, with the target's block
size and block count: a sequence's draft KV lives in the draft pool at the same block ids as
its target KV, so the target's block tables (and their allocation, rollback and freeing)
serve both. `Sequence.num_draft_computed` counts the tokens with draft KV.

Per step, for the sequences the scheduler gave drafts (`DRAFT_PENDING` placeholders,
already trimmed to what fits, their blocks allocated) or a catch-up chunk (schedule.py: the
draft KV too far behind to draft within the step's token budget):

1. one forward over every token without draft KV yet (the prompt at a sequence's first
   speculative step, after a preemption or a KV handoff; otherwise the tokens emitted by
   the last step) samples draft 1; a catching-up sequence's chunk rides along (its token
   unused);
2. `k - 1` one-token forwards sample drafts 2..k (argmax: point-mass drafts, see verify.py).

The drafts' own KV stays; after verification `SpecDecoder.accepted` cuts
`num_draft_computed` back to the accepted tokens. A decode worker that receives a prompt's
KV from a prefill worker has no draft KV for it: step 1 computes it there (the draft model
prefills the prompt locally, from the request's first speculative step on, in chunks while
the catch-up does not fit the step's token budget).

Owned by the model runner (the one object that allocates on the device): it loads the
draft before sizing the target's KV pool, so both pools fit in the memory budget. At
`tensor_parallel_size > 1` the draft model is not sharded: it runs whole on rank 0 (the
engine process), beside rank 0's shard of the target, and its KV pool is rank 0's alone;
the other ranks only ever see the target's verify forward.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch

from baton.engine.attention.base import create_backend
from baton.engine.config import EngineConfig
from baton.engine.input_prep import prepare
from baton.engine.kv_cache import KVCacheSpec
from baton.engine.quantization import parse_quantization
from baton.engine.scheduler import ScheduledBatch
from baton.engine.sequence import Sequence


def draft_engine_config(target: EngineConfig) -> EngineConfig:
    """The draft model's config: the target's, with the draft's checkpoint. Raises ValueError
    if the draft cannot draft for this target (another vocabulary)."""
    model_dir = Path(target.speculative.model)
    if not (model_dir / "config.json").exists():
        raise ValueError(f"speculative_config.model: {model_dir} has no config.json")
    hf_config = json.loads((model_dir / "config.json").read_text())
    if int(hf_config.get("vocab_size", -1)) != target.vocab_size:
        raise ValueError(f"the draft model's vocab_size ({hf_config.get('vocab_size')}) differs from the target's "
                         f"({target.vocab_size}): draft and target must share a tokenizer")
    for name in ("tokenizer.json",):
        ours, theirs = target.tokenizer_dir / name, model_dir / name
        if ours.exists() and theirs.exists() and _vocab(ours) != _vocab(theirs):
            raise ValueError(f"the draft model's {name} has another vocabulary than the target's")
    return dataclasses.replace(
        target, model_dir=model_dir, hf_config=hf_config, served_model_name=model_dir.name,
        quantization=parse_quantization(hf_config, None), kv_cache_dtype=target.dtype, speculative=None,
        tensor_parallel_size=1, lora=None)


def _vocab(tokenizer_json: Path) -> dict:
    return json.loads(tokenizer_json.read_text()).get("model", {}).get("vocab", {})


class DraftModel:
    def __init__(self, config: EngineConfig, backend_name: str):
        from baton.engine.loader import load_model

        self.config = config
        self.model = load_model(config)  # its torch forward: no fast path, no CUDA graphs
        self.kv_spec = KVCacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, config.block_size,
                                   config.dtype)
        self.backend = create_backend(backend_name, config.device, num_heads=config.num_heads,
                                      num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                                      scale=config.head_dim**-0.5)
        self.kv: torch.Tensor | None = None
        # Lifetime counters: tokens the draft model computed, and the most tokens (the
        # target's and the draft model's) of one step it took part in.
        self.num_tokens = 0
        self.max_step_tokens = 0

    def allocate(self, num_blocks: int) -> None:
        """The draft KV pool, as many blocks as the target's."""
        self.kv = self.kv_spec.allocate(num_blocks, self.config.device)

    @torch.inference_mode()
    def propose(self, batch: ScheduledBatch) -> None:
        """Replace the placeholders in each sequence's `spec_token_ids` with greedy drafts, and
        compute the draft KV catch-up chunks the scheduler gave (`seq.draft_catch_up`)."""
        seqs = [s for s in batch.seqs if s.spec_token_ids]
        catching = [s for s in batch.seqs if s.draft_catch_up and not s.spec_token_ids]
        if not seqs and not catching:
            return
        drafts: list[list[int]] = [[] for _ in seqs]
        # Forward 1: catch the draft KV up to every known token (a drafting sequence) or by
        # its chunk (a sequence catching up, whose sampled token is not used).
        views = ([_view(s, s.num_draft_computed, s.token_ids) for s in seqs]
                 + [_view(s, s.num_draft_computed, s.token_ids[: s.num_draft_computed + s.draft_catch_up])
                    for s in catching])
        counts = [v.num_tokens - v.num_computed_tokens for v in views]
        self._sample(views, counts, drafts, range(len(seqs)))
        num_tokens = sum(counts)
        for seq in catching:
            seq.num_draft_computed += seq.draft_catch_up
            seq.draft_catch_up = 0
        for j in range(1, max((len(s.spec_token_ids) for s in seqs), default=0)):
            active = [i for i, s in enumerate(seqs) if len(s.spec_token_ids) > j]
            views = [_view(seqs[i], seqs[i].num_tokens + j - 1, seqs[i].token_ids + drafts[i]) for i in active]
            self._sample(views, [1] * len(active), drafts, active)
            num_tokens += len(active)
        for seq, d in zip(seqs, drafts):
            seq.spec_token_ids = d
            # KV of the known tokens and of every draft fed back (all but the last).
            seq.num_draft_computed = seq.num_tokens + len(d) - 1
        self.num_tokens += num_tokens
        self.max_step_tokens = max(self.max_step_tokens, batch.total_tokens + num_tokens)

    def _sample(self, views: list[Sequence], counts: list[int], drafts: list[list[int]], which) -> None:
        """One forward over `views`; the greedy token of the i-th view goes to
        `drafts[which[i]]` (views past `which` are computed for their KV only)."""
        inputs = prepare(ScheduledBatch(views, counts), self.config.block_size, self.config.device)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv, inputs.meta, self.backend)
        rows = hidden if inputs.sample_rows is None else hidden[inputs.sample_rows]
        for i, token in zip(which, self.model.compute_logits(rows).argmax(dim=-1).tolist()):
            drafts[i].append(token)


def _view(seq: Sequence, num_computed: int, token_ids: list[int]) -> Sequence:
    """`seq` as the draft model's input preparation sees it: `token_ids` known, the first
    `num_computed` with draft KV."""
    view = copy.copy(seq)
    view.num_computed_tokens = num_computed
    view.token_ids = token_ids
    view.spec_token_ids = []
    return view
