"""Speculative decoding: draft a few tokens cheaply, verify them in one target forward.

- `config.py`: `SpeculativeConfig` (vLLM's spellings) and the load-adaptive rule.
- `ngram.py`: drafts by prompt lookup; `draft_model.py`: drafts by a small model with the
  target's vocabulary and a KV pool of its own (owned by the model runner).
- `schedule.py`: the scheduler fits drafts into a step's token budget and free blocks.
- `verify.py`: the target's k + 1 rows sampled as plain steps would, drafts accepted while
  they agree (exact for greedy and sampling, seeds reproducible).
- `decoder.py`: `SpecDecoder`, the engine's hooks: propose before scheduling, roll back the
  rejected drafts' KV after the step, count drafted and accepted tokens.

The design and its choices: docs/decisions.md, "Speculative decoding".
"""
