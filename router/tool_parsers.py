"""Tool-call parsers: one output's text, fed as it streams, -> content and tool-call deltas.

A parser reads the text of one choice in whatever pieces the engine produces and returns
the `delta` messages an OpenAI stream sends for it, in order:

    {"content": "..."}                                                       plain text
    {"tool_calls": [{"index": i, "id": "call_...", "type": "function",
                     "function": {"name": "get_weather", "arguments": ""}}]}  a call begins
    {"tool_calls": [{"index": i, "function": {"arguments": "{\\"city\\": "}}]} its arguments, in fragments

The arguments fragments concatenate to the JSON text the model wrote for them. Text that may
still turn out to start a call (a partial `<tool_call>` tag, leading whitespace) is held back
until it is decided. `result()` is the whole message once the output ended: its content and
its calls, or None when what looked like calls does not parse (a non-streamed response then
answers the text as content).

Formats, picked by name (`--tool-call-parser`):
- `llama3_json`: Llama 3.1/3.2's JSON calls: an output that begins (after whitespace) with
  `{` or `<|python_tag|>` is `{"name": ..., "parameters": {...}}` objects separated by `;`;
  any other output is content.
- `hermes`: Hermes and Qwen 2.5/3: content with `<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>` blocks in it.
The router also uses two formats of its own, which its guided decoding forces
(router/tools.py): `required` (a JSON array of `{"name", "parameters"}` objects) and a named
function (the output is the arguments object itself).
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


class _ObjectScanner:
    """Scans one JSON object fed in pieces (the first piece starts at its `{`), tracking where
    each top-level member's value lies in `text`: `spans[key] = [start, end]`, end None while
    the value is still being read. Malformed JSON is not an error here: it shows as a value
    that never closes or text `json.loads` refuses."""

    def __init__(self) -> None:
        self.text = ""
        self.done = False  # the closing brace was read
        self.spans: dict[str, list[int | None]] = {}
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._expect = "key"  # at depth 1: key, key_string, colon, value, after
        self._key_start = 0
        self._key = ""
        self._open: str | None = None  # the member whose value is being read
        self._open_kind = ""  # string, container, scalar

    def feed(self, text: str) -> int:
        """Scan `text`; returns how many of its characters belong to the object (all of them
        until the closing brace)."""
        base = len(self.text)
        self.text += text
        for i in range(len(text)):
            self._char(text[i], base + i)
            if self.done:
                self.text = self.text[:base + i + 1]
                return i + 1
        return len(text)

    def _char(self, ch: str, pos: int) -> None:
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                if self._depth == 1 and self._expect == "key_string":
                    key = _loads(self.text[self._key_start:pos + 1])
                    self._key = key if isinstance(key, str) else ""
                    self._expect = "colon"
                elif self._depth == 1 and self._open_kind == "string":
                    self._close(pos + 1)
            return
        if ch == '"':
            self._in_string = True
            if self._depth == 1 and self._expect == "key":
                self._key_start = pos
                self._expect = "key_string"
            elif self._depth == 1 and self._expect == "value":
                self._start(pos, "string")
        elif ch in "{[":
            if self._depth == 1 and self._expect == "value":
                self._start(pos, "container")
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            if self._depth == 1 and self._open_kind == "container":
                self._close(pos + 1)
            elif self._depth <= 0:
                if self._open_kind == "scalar":
                    self._close(pos)
                self.done = True
        elif self._depth == 1:
            if ch == ",":
                if self._open_kind == "scalar":
                    self._close(pos)
                self._expect = "key"
            elif ch == ":" and self._expect == "colon":
                self._expect = "value"
            elif not ch.isspace() and self._expect == "value":
                self._start(pos, "scalar")

    def _start(self, pos: int, kind: str) -> None:
        self.spans[self._key] = [pos, None]
        self._open, self._open_kind, self._expect = self._key, kind, "after"

    def _close(self, end: int) -> None:
        span = self.spans[self._open]
        if self._open_kind == "scalar":
            end = span[0] + len(self.text[span[0]:end].rstrip())
        span[1] = end
        self._open, self._open_kind = None, ""


@dataclass
class _Call:
    index: int
    id: str
    name: str | None = None
    arguments: str = ""  # every fragment sent so far
    sent: int = 0  # characters of the arguments' raw JSON text sent
    complete: bool = False

    def as_message(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class _Deltas:
    """The delta messages of one `feed`, with consecutive content (or consecutive fragments
    of one call) merged into one."""

    def __init__(self) -> None:
        self.items: list[dict] = []

    def content(self, text: str) -> None:
        if not text:
            return
        if self.items and "content" in self.items[-1]:
            self.items[-1]["content"] += text
        else:
            self.items.append({"content": text})

    def begin(self, call: _Call) -> None:
        self.items.append({"tool_calls": [{"index": call.index, "id": call.id, "type": "function",
                                           "function": {"name": call.name, "arguments": ""}}]})

    def arguments(self, call: _Call, text: str) -> None:
        if not text:
            return
        call.arguments += text
        last = self.items[-1]["tool_calls"][0] if self.items and "tool_calls" in self.items[-1] else None
        if last is not None and last["index"] == call.index and "id" not in last:
            last["function"]["arguments"] += text
        else:
            self.items.append({"tool_calls": [{"index": call.index, "function": {"arguments": text}}]})


class ToolParser(ABC):
    """Parses one output. `feed` each new piece of text, then `finish` once; both return
    delta messages. Not thread-safe; one per choice."""

    name: ClassVar[str]

    def __init__(self, parallel_tool_calls: bool = True):
        self.parallel = parallel_tool_calls
        self.calls: list[_Call] = []
        self.content = ""
        self.malformed = False  # text in a call's place that is not one
        self._finished = False

    def feed(self, text: str) -> list[dict]:
        out = _Deltas()
        if text:
            self._feed(text, out)
        return self._sent(out)

    def finish(self) -> list[dict]:
        out = _Deltas()
        if not self._finished:
            self._finished = True
            self._finish(out)
        return self._sent(out)

    def _sent(self, out: _Deltas) -> list[dict]:
        for item in out.items:
            self.content += item.get("content", "")
        return out.items

    @abstractmethod
    def _feed(self, text: str, out: _Deltas) -> None: ...

    @abstractmethod
    def _finish(self, out: _Deltas) -> None:
        """Flush what was held back once the output ended; mark an unfinished call malformed."""

    @property
    def has_calls(self) -> bool:
        return bool(self.calls)

    @property
    def valid(self) -> bool:
        """Every call is whole, named, and its arguments are a JSON object."""
        return not self.malformed and all(
            c.complete and c.name and isinstance(_loads(c.arguments), dict) for c in self.calls)

    def result(self) -> tuple[str | None, list[dict]] | None:
        """After `finish`: (content or None, tool calls), or None when the calls do not parse."""
        if not self.valid:
            return None
        content = self.content.strip() if self.calls else self.content
        return content or None, [c.as_message() for c in self.calls]

    # -- shared by the JSON formats ------------------------------------------------------

    def _new_call(self, name: str | None = None) -> _Call:
        call = _Call(len(self.calls), new_call_id(), name)
        self.calls.append(call)
        return call

    def _read_call(self, call: _Call, scanner: _ObjectScanner, out: _Deltas) -> None:
        """Send what the scanner has read of `call` and not yet sent: its beginning once the
        name is known, then its arguments' text as it arrives."""
        if call.name is None:
            span = scanner.spans.get("name")
            if span is None or span[1] is None:
                return
            name = _loads(scanner.text[span[0]:span[1]])
            if not isinstance(name, str) or not name:
                self.malformed = True
                return
            call.name = name
            out.begin(call)
        span = scanner.spans.get("arguments") or scanner.spans.get("parameters")
        if span is None:
            if scanner.done and not call.arguments:
                out.arguments(call, "{}")  # a call without arguments
        elif scanner.text[span[0]] == '"':
            # Arguments written as a JSON string of JSON (OpenAI's own shape): sent once read.
            if span[1] is not None and not call.arguments:
                value = _loads(scanner.text[span[0]:span[1]])
                out.arguments(call, value if isinstance(value, str) else "")
        else:
            end = span[1] if span[1] is not None else len(scanner.text)
            start = span[0] + call.sent
            if end > start:
                out.arguments(call, scanner.text[start:end])
                call.sent = end - span[0]
        call.complete = scanner.done


class JsonCallsParser(ToolParser):
    """JSON call objects one after another: `opening`, objects separated by `separator`,
    `closing`. With `content_unless_call`, an output that does not begin like a call is
    content (auto); otherwise every output is calls (forced)."""

    prefixes: ClassVar[tuple[str, ...]] = ()  # markers that may precede the first call
    opening: ClassVar[str] = ""
    separator: ClassVar[str] = ";"
    closing: ClassVar[str] = ""
    content_unless_call: ClassVar[bool] = True

    def __init__(self, parallel_tool_calls: bool = True):
        super().__init__(parallel_tool_calls)
        self._state = "start"  # start, content, between, call, end, ignore
        self._held = ""
        self._scanner: _ObjectScanner | None = None

    def _feed(self, text: str, out: _Deltas) -> None:
        if self._state == "start":
            text = self._decide(self._held + text, out)
        while text:
            if self._state == "content":
                out.content(text)
                return
            if self._state == "ignore":  # after the one call parallel_tool_calls=false allows
                return
            if self._state == "call":
                used = self._scanner.feed(text)
                text = text[used:]
                self._read_call(self.calls[-1], self._scanner, out)
                if self._scanner.done:
                    self._state = "between" if self.parallel else "ignore"
                continue
            ch, text = text[0], text[1:]
            if ch.isspace():
                continue
            if self._state == "between" and ch == "{":
                self._scanner = _ObjectScanner()
                self._scanner.feed("{")
                self._new_call()
                self._state = "call"
            elif self._state == "between" and ch == self.separator and self.calls:
                continue
            elif self._state == "between" and self.closing and ch == self.closing:
                self._state = "end"
            else:  # anything else where a call (or the end) should be
                self.malformed = True
                self._state = "ignore"

    def _decide(self, text: str, out: _Deltas) -> str:
        """In the start state: hold `text` while undecided; else switch state and return the
        text left for it."""
        stripped = text.lstrip()
        for marker in (*self.prefixes, self.opening):
            if marker and stripped.startswith(marker):
                self._state = "between"
                return stripped[len(marker):]
            if marker and marker.startswith(stripped):
                self._held = text
                return ""
        if not stripped:
            self._held = text
            return ""
        if stripped.startswith("{") and not self.opening:
            self._state = "between"
            return stripped
        self._state = "content" if self.content_unless_call else "between"
        return text if self.content_unless_call else stripped

    def _finish(self, out: _Deltas) -> None:
        if self._state == "start" and self._held:
            out.content(self._held)
        if self._state == "call" or (self.closing and self._state == "between"):
            self.malformed = True


class Llama3JsonParser(JsonCallsParser):
    name = "llama3_json"
    prefixes = ("<|python_tag|>",)


class RequiredCallsParser(JsonCallsParser):
    """What `tool_choice: "required"` forces: `[{"name": ..., "parameters": {...}}, ...]`."""

    name = "required"
    opening, separator, closing = "[", ",", "]"
    content_unless_call = False


class NamedCallParser(ToolParser):
    """What a named `tool_choice` forces: the output is that function's arguments object."""

    name = "named"

    def __init__(self, function: str, parallel_tool_calls: bool = True):
        super().__init__(parallel_tool_calls)
        self.function = function

    def _feed(self, text: str, out: _Deltas) -> None:
        if not self.calls:
            out.begin(self._new_call(self.function))
        out.arguments(self.calls[0], text)

    def _finish(self, out: _Deltas) -> None:
        if not self.calls:
            out.begin(self._new_call(self.function))
        self.calls[0].complete = True


class HermesParser(ToolParser):
    """Content with `<tool_call>{...}</tool_call>` blocks (Hermes 2 Pro, Qwen 2.5 and 3)."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, parallel_tool_calls: bool = True):
        super().__init__(parallel_tool_calls)
        self._state = "content"  # content, call, close, ignore
        self._held = ""  # trailing whitespace, or text that may be the start of a tag
        self._scanner: _ObjectScanner | None = None

    def _feed(self, text: str, out: _Deltas) -> None:
        while text:
            if self._state == "ignore":
                return
            if self._state == "content":
                text = self._content(self._held + text, out)
            elif self._state == "call":
                if self._scanner is None:
                    stripped = text.lstrip()
                    if not stripped:
                        return
                    if stripped[0] != "{":
                        self.malformed = True
                        self._state, self._held, text = "close", "", stripped
                        continue
                    self._scanner, text = _ObjectScanner(), stripped
                    self._new_call()
                used = self._scanner.feed(text)
                text = text[used:]
                self._read_call(self.calls[-1], self._scanner, out)
                if self._scanner.done:
                    self._state, self._held = "close", ""
            else:  # close: the rest of the block, up to its closing tag
                held = self._held + text
                at = held.find(self.CLOSE)
                if at < 0:
                    self._held = held[-len(self.CLOSE):]
                    if held[:-len(self.CLOSE)].strip():
                        self.malformed = True
                    return
                if held[:at].strip():
                    self.malformed = True
                self._scanner, self._held = None, ""
                self._state = "content" if self.parallel else "ignore"
                text = held[at + len(self.CLOSE):]

    def _content(self, text: str, out: _Deltas) -> str:
        """Send content up to a `<tool_call>` (then return what follows it). Trailing
        whitespace and what may still become a tag are held: whitespace next to a call is
        not content."""
        at = text.find(self.OPEN)
        if at >= 0:
            if text[:at].strip():
                out.content(text[:at])
            self._held, self._state = "", "call"
            return text[at + len(self.OPEN):]
        keep = next((k for k in range(min(len(self.OPEN) - 1, len(text)), 0, -1)
                     if self.OPEN.startswith(text[-k:])), 0)
        body = text[:len(text) - keep].rstrip()
        out.content(body)
        self._held = text[len(body):]
        return ""

    def _finish(self, out: _Deltas) -> None:
        if self._state == "content":
            if self._held.strip() or not self.calls:
                out.content(self._held)
        elif self._state == "call":
            self.malformed = True
        elif self._state == "close" and self._scanner is None:
            self.malformed = True  # a block that never held an object
        # A whole object whose closing tag never came (the model stopped at it) is a call.


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (Llama3JsonParser, HermesParser)}
