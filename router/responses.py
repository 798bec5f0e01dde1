"""OpenAI response bodies for completions and chat, streamed (SSE chunks) or whole.

`usage` is exact: prompt tokens counted once per prompt (not per n), completion tokens
summed over every choice. Logprobs are computed by the engine from the raw distribution;
token strings are each token decoded on its own.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import lru_cache

from baton.router.dispatch import Delta
from baton.tokenizer import Tokenizer
from baton.worker.messages import OutputState


@dataclass
class ResponseBuilder:
    chat: bool
    response_id: str
    model: str
    tokenizer: Tokenizer
    prompt_token_counts: list[int]  # one per prompt
    n: int
    logprobs: bool = False
    top_logprobs: int = 0
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    _role_sent: set[int] = field(default_factory=set)
    _text_offsets: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tokenizer = self.tokenizer

        @lru_cache(maxsize=65536)
        def token_text(token_id: int) -> str:
            return tokenizer.decode([token_id], skip_special_tokens=False)

        self._token_text = token_text

    @property
    def object_name(self) -> str:
        if self.chat:
            return "chat.completion"
        return "text_completion"

    def _head(self, object_name: str) -> dict:
        return {"id": self.response_id, "object": object_name, "created": self.created, "model": self.model}

    # -- logprobs ------------------------------------------------------------------------

    def _completion_logprobs(self, index: int, token_ids: list[int], entries: list[dict[int, float]]) -> dict:
        tokens, token_logprobs, tops, offsets = [], [], [], []
        offset = self._text_offsets.get(index, 0)
        for token_id, entry in zip(token_ids, entries):
            text = self._token_text(token_id)
            tokens.append(text)
            token_logprobs.append(entry.get(token_id))
            tops.append({self._token_text(t): lp for t, lp in _top(entry, self.top_logprobs)})
            offsets.append(offset)
            offset += len(text)
        self._text_offsets[index] = offset
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
                "text_offset": offsets}

    def _chat_logprobs(self, token_ids: list[int], entries: list[dict[int, float]]) -> dict:
        def item(token_id: int, logprob: float | None) -> dict:
            text = self._token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = []
        for token_id, entry in zip(token_ids, entries):
            content.append({**item(token_id, entry.get(token_id)),
                            "top_logprobs": [item(t, lp) for t, lp in _top(entry, self.top_logprobs)]})
        return {"content": content}

    def _logprobs(self, index: int, token_ids: list[int], entries: list[dict[int, float]]) -> dict | None:
        if not self.logprobs:
            return None
        if self.chat:
            return self._chat_logprobs(token_ids, entries)
        return self._completion_logprobs(index, token_ids, entries)

    # -- streaming -----------------------------------------------------------------------

    def stream_chunks(self, index: int, delta: Delta) -> list[dict]:
        """The SSE chunks for one delta of choice `index`."""
        state = delta.state
        finish = _finish(state) if delta.finished else None
        logprobs = self._logprobs(index, delta.token_ids, delta.logprobs) if delta.token_ids else None
        usage_null = {"usage": None} if self.include_usage else {}
        if not self.chat:
            choice = {"index": index, "text": delta.text, "logprobs": logprobs, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = state.stop_reason
            return [{**self._head("text_completion"), "choices": [choice], **usage_null}]
        chunks = []
        if index not in self._role_sent:
            self._role_sent.add(index)
            chunks.append({**self._head("chat.completion.chunk"), "choices": [{
                "index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}], **usage_null})
        if delta.text or delta.token_ids or finish is not None:
            body = {"content": delta.text} if delta.text else {}
            choice = {"index": index, "delta": body, "logprobs": logprobs, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = state.stop_reason
            chunks.append({**self._head("chat.completion.chunk"), "choices": [choice], **usage_null})
        return chunks

    def usage_chunk(self, states: dict[int, OutputState]) -> dict:
        name = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(name), "choices": [], "usage": self.usage(states)}

    # -- whole responses -----------------------------------------------------------------

    def usage(self, states: dict[int, OutputState]) -> dict:
        prompt = sum(self.prompt_token_counts)
        completion = sum(len(s.token_ids) for s in states.values())
        cached = sum(states[i * self.n].num_cached_tokens for i in range(len(self.prompt_token_counts))
                     if i * self.n in states)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def response(self, states: dict[int, OutputState]) -> dict:
        choices = []
        for index in sorted(states):
            state = states[index]
            self._text_offsets.pop(index, None)
            logprobs = self._logprobs(index, state.token_ids, state.logprobs)
            if self.chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": state.text},
                                "logprobs": logprobs, "finish_reason": _finish(state),
                                "stop_reason": state.stop_reason})
            else:
                choices.append({"index": index, "text": state.text, "logprobs": logprobs,
                                "finish_reason": _finish(state), "stop_reason": state.stop_reason})
        return {**self._head(self.object_name), "choices": choices, "usage": self.usage(states)}


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def _finish(state: OutputState) -> str:
    # The engine says "stop" for stop tokens and strings, "length" for max_tokens and the
    # context limit; anything else never reaches a successful response.
    return state.finish_reason if state.finish_reason in ("stop", "length") else "stop"


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
