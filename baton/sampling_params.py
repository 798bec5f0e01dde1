"""Sampling parameters, shared by the engine and the router (no torch here).

Names and defaults follow vLLM's `SamplingParams` so that users can switch. Every invalid
value raises `ValueError` naming the field and the allowed range; the router turns that into
an HTTP 400.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# A logits processor sees the tokens generated so far and the logits row for the next token
# (a 1-D float tensor) and returns the logits to sample from.
LogitsProcessor = Callable[[list[int], Any], Any]

_MAX_LOGPROBS = 20


@dataclass(frozen=True)
class GuidedDecodingParams:
    """Constrain the output: exactly one of json, regex, choice, grammar (or json_object)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [
            name
            for name in ("json", "regex", "choice", "grammar")
            if getattr(self, name) is not None
        ] + (["json_object"] if self.json_object else [])
        if len(given) != 1:
            raise ValueError(
                "guided_decoding: give exactly one of json, regex, choice, grammar, "
                f"json_object (got {given or 'none'})"
            )
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("guided_decoding.choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", list(self.choice))

    @property
    def kind(self) -> str:
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"


@dataclass
class SamplingParams:
    """How to sample one request's output (vLLM's names and semantics).

    temperature 0 means greedy. `best_of` (vLLM's, and OpenAI's completions): generate that
    many outputs and return the `n` whose cumulative log-probability (the sum of each sampled
    token's raw logprob) is highest, best first; such a request shows only its final output.
    `logit_bias` ({token id: bias in [-100, 100]}, OpenAI's) is added to those tokens' logits
    before penalties and sampling; logprobs do not see it. `allowed_token_ids` (vLLM's): only
    these tokens may be sampled. `bad_words` (vLLM's): words never generated; the engine
    sets `bad_words_token_ids` from its tokenizer (`Tokenizer.bad_words_token_ids`), and the
    sampler bans a word's last token wherever the output ends with the tokens before it.
    `logprobs=N` returns the top N log-probabilities of each
    generated position (always including the sampled token), computed from the model's raw
    distribution before temperature, penalties and filtering, as vLLM does.
    """

    n: int = 1
    best_of: int | None = None  # candidates generated; the n with the highest cumulative logprob are returned
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # False: adjacent special tokens' text without a space between
    include_stop_str_in_output: bool = False
    guided_decoding: GuidedDecodingParams | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)
    logits_processors: list[LogitsProcessor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias) if self.logit_bias else None
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        self.bad_words = list(self.bad_words) if self.bad_words else None
        if self.top_k == -1:
            self.top_k = 0
        self._verify()

    def _verify(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "an integer >= 1")
        if self.best_of is not None and (not isinstance(self.best_of, int) or self.best_of < self.n):
            raise bad("best_of", f"an integer >= n ({self.n})")
        for name in ("detokenize", "skip_special_tokens", "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a boolean")
        if not self.detokenize and self.stop:
            raise ValueError("stop strings need detokenize=True (the text is what they are found in); "
                             "use stop_token_ids with detokenize=False")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "in [-2, 2]")
        if not self.repetition_penalty > 0.0:
            raise bad("repetition_penalty", "> 0")
        if not self.temperature >= 0.0:
            raise bad("temperature", ">= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "-1, 0 (all tokens) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "in [0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise bad("seed", "an integer in [0, 2**63)")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= _MAX_LOGPROBS):
                raise bad(name, f"an integer in [0, {_MAX_LOGPROBS}]")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop must be a string or a list of non-empty strings")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be a list of non-negative integers")
        if self.logit_bias is not None and not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0
            and isinstance(b, (int, float)) and -100.0 <= b <= 100.0 for t, b in self.logit_bias.items()
        ):
            raise ValueError("logit_bias must map token ids (>= 0) to biases in [-100, 100]")
        if self.allowed_token_ids is not None and not (self.allowed_token_ids and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.allowed_token_ids
        )):
            raise ValueError("allowed_token_ids must be a non-empty list of token ids (>= 0)")
        if self.bad_words is not None and not all(isinstance(w, str) and w.strip() for w in self.bad_words):
            raise ValueError("bad_words must be a list of words, each with text besides spaces")
        if self.guided_decoding is not None and not isinstance(
            self.guided_decoding, GuidedDecodingParams
        ):
            raise ValueError("guided_decoding must be a GuidedDecodingParams")

    @property
    def num_candidates(self) -> int:
        """Sequences a request runs: `best_of` if given, else `n`."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def clone(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    def all_stop_token_ids(self, eos_token_ids: Sequence[int]) -> set[int]:
        ids = set(self.stop_token_ids)
        if not self.ignore_eos:
            ids.update(eos_token_ids)
        return ids


@dataclass(frozen=True)
class PoolingParams:
    """An embedding request (vLLM's `PoolingParams`), for an engine run with task "embed".

    `normalize`: L2-normalise the vector (None: as the model's pooling config says).
    `dimensions` (Matryoshka truncation) is refused: no supported model is trained for it.
    """

    dimensions: int | None = None
    normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.dimensions is not None:
            raise ValueError("dimensions is not supported: the model is not a Matryoshka embedding model, "
                             "so a truncated vector would be meaningless; leave it unset")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a boolean, got {self.normalize!r}")
