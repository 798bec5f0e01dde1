"""`SpeculativeConfig`: what to draft with and how many tokens, parsed from vLLM's spellings.

Accepted (as vLLM takes them):

- `EngineArgs(speculative_config={"method": "ngram", "num_speculative_tokens": k,
  "prompt_lookup_max": 4, "prompt_lookup_min": 2})`: drafts copied from the sequence's own
  tokens (prompt lookup). One of the two lookup bounds given sets both; neither: 2..4.
- `EngineArgs(speculative_config={"model": DRAFT_DIR, "num_speculative_tokens": k})`
  (`"method": "draft_model"` implied): a small model with the target's vocabulary drafts.
- The seed's spelling `EngineArgs(speculative_model="[ngram]" or DRAFT_DIR,
  num_speculative_tokens=k)`.
- A JSON string for `speculative_config` (the workers' `--speculative-config` flag).

The load-adaptive rule (measured by bench/spec_decode.py, bench/results/spec_decode-*.json;
the defaults' reasons: docs/decisions.md, "Speculative decoding"):
with `b` sequences decoding, a step drafts `k` tokens per sequence while
`b < shorten_by_batch_size`, `max(1, k // 2)` from there, and none from
`disable_by_batch_size` on (a verify step costs about `1 + k` decode rows per sequence, so
at large batches it costs more than the accepted tokens save). No torch here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

NGRAM = "ngram"
DRAFT_MODEL = "draft_model"
_KEYS = {"method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
         "disable_by_batch_size", "shorten_by_batch_size"}
# Defaults of the load-adaptive rule (docs/decisions.md, "Speculative decoding").
DEFAULT_SHORTEN_BY_BATCH_SIZE = 4
DEFAULT_DISABLE_BY_BATCH_SIZE = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str  # NGRAM or DRAFT_MODEL
    num_speculative_tokens: int
    model: str | None = None  # the draft model's directory (DRAFT_MODEL)
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    shorten_by_batch_size: int = DEFAULT_SHORTEN_BY_BATCH_SIZE
    disable_by_batch_size: int = DEFAULT_DISABLE_BY_BATCH_SIZE

    def num_drafts(self, batch_size: int) -> int:
        """Tokens to draft per sequence when `batch_size` sequences are decoding."""
        k = self.num_speculative_tokens
        if batch_size >= self.disable_by_batch_size:
            return 0
        if batch_size >= self.shorten_by_batch_size:
            return max(1, k // 2)
        return k

    @property
    def description(self) -> str:
        source = (f"n-gram lookup {self.prompt_lookup_min}..{self.prompt_lookup_max}"
                  if self.method == NGRAM else f"draft model {self.model}")
        return (f"{source}, {self.num_speculative_tokens} tokens (halved from {self.shorten_by_batch_size} "
                f"decoding sequences, off from {self.disable_by_batch_size})")


def parse_speculative(config: dict[str, Any] | str | None, speculative_model: str | None = None,
                      num_speculative_tokens: int | None = None) -> SpeculativeConfig | None:
    """The engine's speculative configuration from EngineArgs' three fields (None: off).

    Raises ValueError naming the field at fault."""
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as exc:
            raise ValueError(f"speculative_config is not JSON: {exc}") from None
    if config is not None and not isinstance(config, dict):
        raise ValueError("speculative_config must be a dict (or its JSON text)")
    if config is not None and speculative_model is not None:
        raise ValueError("give speculative_config or speculative_model, not both")
    if config is None:
        if speculative_model is None:
            if num_speculative_tokens is not None:
                raise ValueError("num_speculative_tokens needs speculative_model (or speculative_config)")
            return None
        config = {"model": speculative_model, "num_speculative_tokens": num_speculative_tokens}
    config = dict(config)
    unknown = set(config) - _KEYS
    if unknown:
        raise ValueError(f"speculative_config: unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}")
    method, model = config.get("method"), config.get("model")
    if model == "[ngram]":  # the seed's spelling of n-gram speculation
        method, model = method or NGRAM, None
    if method is None:
        method = DRAFT_MODEL if model else None
    if method not in (NGRAM, DRAFT_MODEL):
        raise ValueError(f"speculative_config: method must be {NGRAM!r} or {DRAFT_MODEL!r} (or give a draft "
                         f"'model'), got {method!r}")
    if method == DRAFT_MODEL and not model:
        raise ValueError("speculative_config: method 'draft_model' needs 'model' (the draft model's directory)")
    if method == NGRAM and model:
        raise ValueError("speculative_config: method 'ngram' takes no 'model'")
    k = config.get("num_speculative_tokens")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
        raise ValueError(f"num_speculative_tokens must be an integer in [1, 16], got {k!r}")
    lo, hi = config.get("prompt_lookup_min"), config.get("prompt_lookup_max")
    if method == DRAFT_MODEL and (lo is not None or hi is not None):
        raise ValueError("prompt_lookup_min/max apply to method 'ngram' only")
    lo, hi = (2, 4) if lo is None and hi is None else (lo if lo is not None else hi, hi if hi is not None else lo)
    for name, value in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"speculative_config: {name} must be an integer >= 1, got {value!r}")
    if lo > hi:
        raise ValueError(f"speculative_config: prompt_lookup_min ({lo}) exceeds prompt_lookup_max ({hi})")
    shorten = config.get("shorten_by_batch_size", DEFAULT_SHORTEN_BY_BATCH_SIZE)
    disable = config.get("disable_by_batch_size", DEFAULT_DISABLE_BY_BATCH_SIZE)
    for name, value in (("shorten_by_batch_size", shorten), ("disable_by_batch_size", disable)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"speculative_config: {name} must be an integer >= 1, got {value!r}")
    return SpeculativeConfig(method, k, model=str(model) if model else None, prompt_lookup_max=hi,
                             prompt_lookup_min=lo, shorten_by_batch_size=shorten, disable_by_batch_size=disable)
