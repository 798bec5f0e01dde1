"""Guided decoding: keep a sequence's tokens inside a grammar, with xgrammar.

A request with `SamplingParams(guided_decoding=GuidedDecodingParams(...))` gets a compiled
grammar (JSON Schema, regular expression, choice, EBNF, or any JSON object) and, per
sequence, an xgrammar `GrammarMatcher` kept in `seq.grammar_matcher`. Three engine hooks drive it:

- `prepare(seqs)` at `add_request` / `add_prefilled_request`: compile (cached by key) and
  attach a fresh matcher; a grammar that cannot compile raises `ValueError` there, so nothing
  is queued.
- `apply(logits, seqs)` is a sampler transform: it fills one vocabulary bitmask row per
  guided sequence on the CPU and applies the whole batch's mask at once on the device the
  logits live on. Free rows are untouched.
- `advance(seq, token_id)` whenever a token is appended to a sequence (sampled here, or the
  first token a prefill engine sampled under the same grammar): it moves the matcher and
  says whether the grammar has terminated (its stop token accepted), which ends the request
  with "stop".

Why the state survives preemption and chunked prefill: the matcher is advanced only when a
token is appended, never when KV is (re)computed. A preempted sequence keeps its generated
tokens and its matcher, so after recompute the next sampled token continues the grammar.

`grammar.py` turns the params into grammar text and the tokenizer into xgrammar's view of
the vocabulary. xgrammar (and the transformers import it pulls in) loads on the first
guided request.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from baton.engine.guided.grammar import grammar_key, grammar_text, tokenizer_info
from baton.engine.sequence import Sequence
from baton.sampling_params import GuidedDecodingParams

_XGR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")
# Threads xgrammar fills a batch's bitmasks with. One: with a real (BPE) vocabulary a fill on
# one thread is faster than on xgrammar's pool ("auto") and hides behind the GPU's forward
# pass (nothing syncs before it). The pool helps only when fills are slow (random-piece
# vocabularies). Figures: docs/performance.md, "Guided decoding".
FILL_THREADS = 1


class GuidedDecoder:
    """Compiles grammars for one model's vocabulary and drives per-sequence matchers.

    `vocab_size` is the model's logits width, which may exceed the tokenizer's vocabulary
    (padded lm_head): ids past the tokenizer's are never allowed. `stop_token_ids` end a
    grammar once it is complete (the model's end-of-sequence ids).
    """

    def __init__(
        self,
        tokenizer_dir: str | Path,
        vocab_size: int,
        stop_token_ids: list[int],
        cache_size: int = 256,
    ):
        self.tokenizer_dir = Path(tokenizer_dir)
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, Any] = OrderedDict()  # key -> CompiledGrammar (LRU)
        self._lock = threading.Lock()  # compile() may run off the engine thread (pre-compiling)
        self._compiler = None
        self._batch = None
        self._bitmask: torch.Tensor | None = None  # CPU int32 [rows, ceil(vocab / 32)], reused

    # -- compiling -----------------------------------------------------------------------

    def _xgr(self):
        import xgrammar

        return xgrammar

    def _get_compiler(self):
        if self._compiler is None:
            xgr = self._xgr()
            info = tokenizer_info(self.tokenizer_dir, self.vocab_size, self.stop_token_ids)
            # We cache compiled grammars ourselves (bounded); xgrammar's own cache is unbounded.
            self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
            self._batch = xgr.BatchGrammarMatcher(FILL_THREADS)
        return self._compiler

    def compile(self, guided: GuidedDecodingParams):
        """The compiled grammar for these params (cached); ValueError if it cannot compile."""
        key = grammar_key(guided)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
            compiler = self._get_compiler()
            kind, source = key
            try:
                compiled = compiler.compile_grammar(grammar_text(kind, source))
            except Exception as exc:  # xgrammar reports bad input as RuntimeError
                raise ValueError(
                    f"guided_decoding.{kind} cannot be compiled: {_first_line(exc)}"
                ) from None
            self._cache[key] = compiled
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return compiled

    # -- engine hooks --------------------------------------------------------------------

    def prepare(self, seqs: list[Sequence]) -> None:
        """Attach a fresh matcher to every guided sequence; ValueError leaves them untouched."""
        guided = [s for s in seqs if s.params.guided_decoding is not None]
        if not guided:
            return
        # Compile every grammar before touching any sequence (n > 1 shares one cached grammar).
        matchers = [self._xgr().GrammarMatcher(self.compile(s.params.guided_decoding)) for s in guided]
        for seq, matcher in zip(guided, matchers):
            seq.grammar_matcher = matcher

    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> dict[int, str]:
        """Sampler transform: mask every guided row of `logits` [N, V] in place."""
        rows = [i for i, s in enumerate(seqs) if s.grammar_matcher is not None]
        if not rows:
            return {}
        xgr = self._xgr()
        bitmask = self._bitmask_rows(len(seqs), logits.device)
        matchers = [seqs[i].grammar_matcher for i in rows]
        errors: dict[int, str] = {}
        try:
            self._batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)
        except Exception:  # find the sequence(s) at fault; fail only those
            for i, matcher in zip(rows, matchers):
                try:
                    matcher.fill_next_token_bitmask(bitmask, i)
                except Exception as exc:
                    errors[i] = f"guided decoding failed: {_first_line(exc)}"
            rows = [i for i in rows if i not in errors]
            if not rows:
                return errors
        mask = bitmask[: len(seqs)]
        indices = None if len(rows) == len(seqs) else rows
        if logits.device.type != "cpu":
            mask = mask.to(logits.device, non_blocking=True)
            if indices is not None:  # from pinned memory: a pageable copy may wait for the GPU
                indices = torch.tensor(rows, dtype=torch.int32).pin_memory().to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size, indices=indices)
        return errors

    def advance(self, seq: Sequence, token_id: int) -> bool:
        """Feed an appended token to the sequence's grammar; True once the grammar terminated.

        Raises ValueError if the grammar does not allow the token (the request must fail).
        A sequence without a grammar is never terminated by one.
        """
        matcher = seq.grammar_matcher
        if matcher is None:
            return False
        if not matcher.accept_token(token_id):
            raise ValueError(f"token {token_id} does not match the request's guided_decoding grammar")
        return matcher.is_terminated()

    def _bitmask_rows(self, rows: int, device: torch.device) -> torch.Tensor:
        words = (self.vocab_size + 31) // 32
        if self._bitmask is None or self._bitmask.shape[0] < rows:
            # Pinned on CUDA hosts so the copy to the device is asynchronous. The buffer is
            # reused: the previous step's copy finished when its sampled ids were read.
            pin = device.type == "cuda"
            self._bitmask = torch.full((max(rows, 8), words), -1, dtype=torch.int32, pin_memory=pin)
        return self._bitmask


def _first_line(exc: Exception) -> str:
    # xgrammar prefixes messages with "[time] /path/file.cc:123: "; keep what a user can act on.
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    return _XGR_PREFIX.sub("", lines[0])
