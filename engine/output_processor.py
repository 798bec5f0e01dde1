"""Per-sequence text and stopping: detokenise incrementally, check stop conditions.

A sequence stops on (in this order) a stop token (EOS unless `ignore_eos`, or one of
`stop_token_ids`), a stop string in its text, `max_tokens`, or the model's length limit.
Stop tokens and strings count only once `min_tokens` are generated. While a request runs,
the last `len(longest stop string) - 1` characters are held back from the visible text, so a
streamed delta never shows the beginning of a stop string that is cut off later.
"""

from __future__ import annotations

from baton.engine.outputs import CompletionOutput
from baton.engine.sequence import Sequence, SequenceStatus
from baton.tokenizer import IncrementalDetokenizer, Tokenizer


class SequenceOutput:
    """Text and stop state of one sequence."""

    def __init__(self, seq: Sequence, tokenizer: Tokenizer, eos_token_ids: list[int], max_model_len: int):
        p = seq.params
        self.seq = seq
        self.detok = (
            IncrementalDetokenizer(tokenizer, seq.prompt_token_ids, p.skip_special_tokens,
                                   p.spaces_between_special_tokens)
            if p.detokenize
            else None
        )
        self.stop_ids = p.all_stop_token_ids(eos_token_ids)
        self.stop_strings = p.stop
        self.hold_back = max((len(s) for s in self.stop_strings), default=1) - 1
        self.max_model_len = max_model_len
        self.text = ""  # full text so far (after a stop string: cut there)
        # A resumed sequence (LLMEngine.add_request's `resume_token_ids`) starts with outputs
        # that were streamed already: their text is rebuilt, their logprobs are not known here
        # (empty entries keep positions aligned; the router already has the real ones).
        for token_id in seq.output_token_ids:
            self._add_text(token_id)
        if seq.logprobs is not None and seq.num_output_tokens:
            seq.logprobs = [{} for _ in range(seq.num_output_tokens)]

    def on_token(self, token_id: int, grammar_done: bool = False) -> SequenceStatus | None:
        """Account for a token just appended to the sequence; return a finish status or None.

        `grammar_done`: the request's guided-decoding grammar accepted its stop token, which
        ends the sequence like a stop token does, whatever `min_tokens` and `ignore_eos` say.
        """
        seq, p = self.seq, self.seq.params
        may_stop = seq.num_output_tokens >= p.min_tokens
        if (may_stop and token_id in self.stop_ids) or grammar_done:
            seq.stop_reason = token_id if token_id in p.stop_token_ids else None
            if p.include_stop_str_in_output:
                self._add_text(token_id)
            self._flush()
            return SequenceStatus.FINISHED_STOPPED
        delta_len = self._add_text(token_id)
        if may_stop and self.stop_strings and delta_len:
            if self._check_stop_strings(delta_len):
                return SequenceStatus.FINISHED_STOPPED
        if (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or (
            seq.num_tokens >= self.max_model_len
        ):
            self._flush()
            return SequenceStatus.FINISHED_LENGTH
        return None

    def _add_text(self, token_id: int) -> int:
        if self.detok is None:
            return 0
        delta = self.detok.add(token_id)
        self.text += delta
        return len(delta)

    def _flush(self) -> None:
        if self.detok is not None:
            self.text += self.detok.flush()

    def _check_stop_strings(self, delta_len: int) -> bool:
        # Only a stop string that ends inside the new delta can be new.
        window_start = max(0, len(self.text) - delta_len - self.hold_back)
        best: tuple[int, str] | None = None
        for stop in self.stop_strings:
            at = self.text.find(stop, window_start)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return False
        at, stop = best
        self.seq.stop_reason = stop
        self.text = self.text[: at + len(stop)] if self.seq.params.include_stop_str_in_output else self.text[:at]
        return True

    def visible_text(self) -> str:
        """The text so far; while the output may still grow (running, or handed off to
        another engine), without the last `hold_back` characters."""
        final = self.seq.is_finished and self.seq.status is not SequenceStatus.FINISHED_HANDOFF
        if final or not self.hold_back:
            return self.text
        return self.text[: max(0, len(self.text) - self.hold_back)]

    def completion(self) -> CompletionOutput:
        seq = self.seq
        finish = seq.status.value if seq.is_finished else None
        return CompletionOutput(
            index=seq.index,
            text=self.visible_text(),
            token_ids=list(seq.output_token_ids),
            cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
            logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
            finish_reason=finish,
            stop_reason=seq.stop_reason,
        )
