"""OpenAI response bodies for completions and chat, streamed (SSE chunks) or whole.

`usage` is exact: prompt tokens counted once per prompt (not per n), completion tokens
summed over every output generated (best_of candidates that are not shown included, as
OpenAI counts them). Logprobs are computed by the engine from the raw distribution; token
strings are each token decoded on its own.

Completions' `echo` puts the prompt before each choice's text (and, with `logprobs`, its
tokens before the generated ones, the first with a null logprob, as OpenAI does); vLLM's
`prompt_logprobs` is a list per choice (completions) or per response (chat): null for the
first position, then `{token_id: {"logprob", "rank", "decoded_token"}}` with the prompt's
token and the top `prompt_logprobs` (rank: 1-based order in the distribution; null for the
prompt's token when it is not among the top ones, where the engine does not rank it). A
stream sends both in each choice's first chunk.

Chat's `echo` (vLLM's) puts the last message's content before each choice's content (in a
stream: a chunk of its own after the role's), when that message's role is the response's:
"assistant" after a generation prompt, else the last message's own (`router/params.py:chat_role`).

vLLM's `return_tokens_as_token_ids` writes each logprobs `token` (and top-logprobs key) as
`token_id:N`; text offsets and `bytes` stay those of the token's text.

vLLM's `return_token_ids` adds `token_ids` (the generated ids) to each choice and to each
streamed chunk's choice, and `prompt_token_ids` to each completions choice (for chat, to the
response, or the first chunk).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import lru_cache

from baton.router.dispatch import Delta
from baton.router.params import Prompt
from baton.router.tool_parsers import ToolParser
from baton.router.tools import ToolPlan
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
    prompts: list[Prompt] = field(default_factory=list)  # for echo: one per prompt
    echo: bool = False
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs as asked
    computed_prompt_logprobs: int = 0  # the top N the workers computed (echo may ask more)
    tools: ToolPlan | None = None  # chat with tools: each choice's text goes through a parser
    return_token_ids: bool = False
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids
    role: str = "assistant"  # chat: the response message's role
    chat_echo: str = ""  # chat: text before each choice's content (vLLM's echo)
    created: int = field(default_factory=lambda: int(time.time()))
    _role_sent: set[int] = field(default_factory=set)
    _prompt_sent: set[int] = field(default_factory=set)
    _text_offsets: dict[int, int] = field(default_factory=dict)
    _parsers: dict[int, ToolParser | None] = field(default_factory=dict)

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

    def _token_label(self, token_id: int) -> str:
        """A token as logprobs name it: its text, or `token_id:N`."""
        return f"token_id:{token_id}" if self.tokens_as_ids else self._token_text(token_id)

    def _head(self, object_name: str) -> dict:
        return {"id": self.response_id, "object": object_name, "created": self.created, "model": self.model}

    # -- logprobs ------------------------------------------------------------------------

    def _completion_logprobs(self, index: int, token_ids: list[int],
                             entries: list[dict[int, float] | None]) -> dict:
        """OpenAI's completions logprobs; a None entry (an echoed prompt's first token) has
        null logprobs."""
        tokens, token_logprobs, tops, offsets = [], [], [], []
        offset = self._text_offsets.get(index, 0)
        for token_id, entry in zip(token_ids, entries):
            text = self._token_text(token_id)
            tokens.append(self._token_label(token_id))
            token_logprobs.append(entry.get(token_id) if entry is not None else None)
            tops.append({self._token_label(t): lp for t, lp in _top(entry, self.top_logprobs)}
                        if entry is not None else None)
            offsets.append(offset)
            offset += len(text)
        self._text_offsets[index] = offset
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
                "text_offset": offsets}

    # -- echo and prompt logprobs --------------------------------------------------------

    def _prompt(self, index: int) -> Prompt:
        return self.prompts[index // self.n]

    def _echo_text(self, index: int) -> str:
        prompt = self._prompt(index)
        if prompt.text is not None:
            return prompt.text
        return self.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)

    def _prompt_entries(self, index: int, state: OutputState) -> list[dict[int, float] | None]:
        """One entry per prompt token (the first None); None entries too where the workers
        sent none (a one-token prompt)."""
        entries = state.prompt_logprobs or [None]
        return entries + [None] * (len(self._prompt(index).token_ids) - len(entries))

    def _prompt_logprobs_body(self, index: int, state: OutputState) -> list[dict | None]:
        k = self.prompt_logprobs or 0
        body: list[dict | None] = []
        for token_id, entry in zip(self._prompt(index).token_ids, self._prompt_entries(index, state)):
            if entry is None:
                body.append(None)
                continue
            ranked = _top(entry, len(entry))
            item = {str(t): {"logprob": lp, "rank": rank, "decoded_token": self._token_text(t)}
                    for rank, (t, lp) in enumerate(ranked[:k], 1)}
            if str(token_id) not in item:
                # The engine sends its top `computed_prompt_logprobs` and the prompt's token:
                # one more entry means the token is not among them, and its rank is unknown.
                rank = next(r for r, (t, _) in enumerate(ranked, 1) if t == token_id)
                item[str(token_id)] = {"logprob": entry[token_id],
                                       "rank": rank if len(entry) <= self.computed_prompt_logprobs else None,
                                       "decoded_token": self._token_text(token_id)}
            body.append(item)
        return body

    def _chat_logprobs(self, token_ids: list[int], entries: list[dict[int, float]]) -> dict:
        def item(token_id: int, logprob: float | None) -> dict:
            text = self._token_text(token_id)
            return {"token": self._token_label(token_id), "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = []
        for token_id, entry in zip(token_ids, entries):
            content.append({**item(token_id, entry.get(token_id)),
                            "top_logprobs": [item(t, lp) for t, lp in _top(entry, self.top_logprobs)]})
        return {"content": content}

    def _logprobs(self, index: int, token_ids: list[int], entries: list[dict[int, float]],
                  echo_state: OutputState | None = None) -> dict | None:
        """The logprobs of `token_ids`; with `echo_state` (echo, the choice's first part),
        preceded by the prompt's."""
        if not self.logprobs:
            return None
        if self.chat:
            return self._chat_logprobs(token_ids, entries)
        if echo_state is not None:
            token_ids = self._prompt(index).token_ids + list(token_ids)
            entries = self._prompt_entries(index, echo_state) + list(entries)
        return self._completion_logprobs(index, token_ids, entries)

    # -- streaming -----------------------------------------------------------------------

    def stream_chunks(self, index: int, delta: Delta) -> list[dict]:
        """The SSE chunks for one delta of choice `index`."""
        state = delta.state
        finish = _finish(state) if delta.finished else None
        first = index not in self._prompt_sent
        self._prompt_sent.add(index)
        echo = self.echo and first
        logprobs = (self._logprobs(index, delta.token_ids, delta.logprobs, state if echo else None)
                    if delta.token_ids or echo else None)
        usage_null = {"usage": None} if self.include_usage else {}
        extra = {"prompt_logprobs": self._prompt_logprobs_body(index, state)} \
            if first and self.prompt_logprobs is not None else {}
        if first and self.return_token_ids:
            extra["prompt_token_ids"] = self._prompt(index).token_ids
        ids = {"token_ids": list(delta.token_ids)} if self.return_token_ids else {}
        if not self.chat:
            text = self._echo_text(index) + delta.text if echo else delta.text
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish, **extra, **ids}
            if finish is not None:
                choice["stop_reason"] = state.stop_reason
            return [{**self._head("text_completion"), "choices": [choice], **usage_null}]
        chunks = []
        if index not in self._role_sent:
            self._role_sent.add(index)
            chunks.append({**self._head("chat.completion.chunk"), "choices": [{
                "index": index, "delta": {"role": self.role, "content": ""}, "logprobs": None,
                "finish_reason": None}], **usage_null, **extra})
            if self.chat_echo:
                chunks.append({**self._head("chat.completion.chunk"), "choices": [{
                    "index": index, "delta": {"content": self.chat_echo}, "logprobs": None,
                    "finish_reason": None}], **usage_null})
        parser = self._parser(index)
        if parser is None:
            bodies = [{"content": delta.text}] if delta.text else []
        else:
            bodies = parser.feed(delta.text) + (parser.finish() if finish is not None else [])
            if finish is not None and parser.has_calls and parser.valid:
                finish = "tool_calls"
        if not bodies and (finish is not None or (logprobs is not None if parser else delta.token_ids)):
            # A chunk that only carries these tokens' logprobs, or the finish (a parser that
            # holds text back sends no empty chunks)
            bodies = [{}]
        for i, body in enumerate(bodies):
            last = i == len(bodies) - 1
            choice = {"index": index, "delta": body, "logprobs": logprobs if last else None,
                      "finish_reason": finish if last else None}
            if self.return_token_ids:
                choice["token_ids"] = list(delta.token_ids) if last else []
            if last and finish is not None:
                choice["stop_reason"] = state.stop_reason
            chunks.append({**self._head("chat.completion.chunk"), "choices": [choice], **usage_null})
        return chunks

    def _parser(self, index: int) -> ToolParser | None:
        if index not in self._parsers:
            self._parsers[index] = self.tools.parser() if self.tools is not None else None
        return self._parsers[index]

    def _message(self, state: OutputState) -> tuple[dict, str]:
        """A whole chat choice's message and finish_reason: tool calls when its text parses
        as calls, otherwise the text as content."""
        finish = _finish(state)
        parser = self.tools.parser() if self.tools is not None else None
        if parser is not None:
            parser.feed(state.text)
            parser.finish()
            parsed = parser.result()
            if parsed is not None and parsed[1]:
                content, calls = parsed
                return {"role": self.role, "content": self.chat_echo + (content or "") or content,
                        "tool_calls": calls}, "tool_calls"
        return {"role": self.role, "content": self.chat_echo + state.text}, finish

    def usage_chunk(self, states: dict[int, OutputState]) -> dict:
        name = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(name), "choices": [], "usage": self.usage(states)}

    # -- whole responses -----------------------------------------------------------------

    def usage(self, states: dict[int, OutputState], generated: list[OutputState] | None = None) -> dict:
        """`generated`: every output that ran (best_of candidates), if not just `states`."""
        prompt = sum(self.prompt_token_counts)
        completion = sum(len(s.token_ids) for s in (generated if generated is not None else states.values()))
        cached = sum(states[i * self.n].num_cached_tokens for i in range(len(self.prompt_token_counts))
                     if i * self.n in states)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def response(self, states: dict[int, OutputState], generated: list[OutputState] | None = None) -> dict:
        """The whole response over `states` (choice index -> output); `generated` as `usage`."""
        choices = []
        for index in sorted(states):
            state = states[index]
            self._text_offsets.pop(index, None)
            logprobs = self._logprobs(index, state.token_ids, state.logprobs, state if self.echo else None)
            if self.chat:
                message, finish = self._message(state)
                choice = {"index": index, "message": message, "logprobs": logprobs,
                          "finish_reason": finish, "stop_reason": state.stop_reason}
            else:
                text = self._echo_text(index) + state.text if self.echo else state.text
                choice = {"index": index, "text": text, "logprobs": logprobs,
                          "finish_reason": _finish(state), "stop_reason": state.stop_reason}
                if self.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = self._prompt_logprobs_body(index, state)
                if self.return_token_ids:
                    choice["prompt_token_ids"] = self._prompt(index).token_ids
            if self.return_token_ids:
                choice["token_ids"] = list(state.token_ids)
            choices.append(choice)
        body = {**self._head(self.object_name), "choices": choices, "usage": self.usage(states, generated)}
        if self.chat and self.prompt_logprobs is not None and states:
            body["prompt_logprobs"] = self._prompt_logprobs_body(0, states[min(states)])
        if self.chat and self.return_token_ids:
            body["prompt_token_ids"] = self.prompts[0].token_ids
        return body


def best_of(states: dict[int, OutputState], num_prompts: int, candidates: int, n: int) -> dict[int, OutputState]:
    """For each prompt, the `n` of its `candidates` outputs (choice indexes prompt *
    candidates + i) with the highest cumulative logprob, best first, as choices prompt * n
    + rank. Each output carries its tokens' logprobs (the router asks for them)."""
    chosen: dict[int, OutputState] = {}
    for p in range(num_prompts):
        outputs = [states[p * candidates + i] for i in range(candidates) if p * candidates + i in states]
        outputs.sort(key=cumulative_logprob, reverse=True)
        for rank, state in enumerate(outputs[:n]):
            chosen[p * n + rank] = state
    return chosen


def cumulative_logprob(state: OutputState) -> float:
    return sum(entry.get(t, 0.0) for t, entry in zip(state.token_ids, state.logprobs))


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def _finish(state: OutputState) -> str:
    # The engine says "stop" for stop tokens and strings, "length" for max_tokens and the
    # context limit; anything else never reaches a successful response.
    return state.finish_reason if state.finish_reason in ("stop", "length") else "stop"


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
