"""The router's HTTP edge: body size limit, fast JSON, and no error that drops a connection.

- `BodyLimit`: a body over `--max-request-mb` is a 413 with OpenAI's error body, at once
  when `Content-Length` says so, else as soon as the bytes received pass the limit.
- `JSONRoute`: request bodies are read into one growing buffer and parsed by pydantic-core's
  JSON parser (several times faster than `json.loads`). A parse is one call that holds the
  GIL throughout, so a body over `LARGE_BODY_BYTES` is parsed on a thread by
  `parse_in_slices`, whose calls are short where the size is in long strings (a prompt):
  the event loop gets the GIL between them. A body it refuses is parsed again by
  `json.loads`, so that text `json` accepts and pydantic refuses (a lone surrogate escape)
  still reaches validation, which names the field; a body pydantic-core parsed skips that
  check (`protocol.PARSED_STRICTLY`).
- `ErrorBoundary`: an unexpected exception becomes a 500 with OpenAI's body and is not
  re-raised: re-raising (what Starlette's handler for `Exception` does) makes uvicorn
  close the keep-alive connection, and the client's next request on it fails with a reset.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import pydantic_core
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request

from baton.router.errors import APIError
from baton.router.protocol import PARSED_STRICTLY

log = logging.getLogger(__name__)


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {limit} bytes "
                         "(the router's --max-request-mb).", "invalid_request_error", None,
                    "request_too_large")


class BodyLimit:
    """ASGI middleware: 413 for an HTTP request body over `max_bytes`."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await too_large(self.max_bytes).response()(scope, receive, send)
                return
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException passes through FastAPI's body reading untouched and is
                    # answered by the handler in errors.install (OpenAI's body, status 413).
                    raise HTTPException(413, too_large(self.max_bytes).message)
            return message

        await self.app(scope, limited, send)


class ErrorBoundary:
    """ASGI middleware: an unexpected exception is a 500 that keeps the connection open."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception:
            log.exception("unexpected error serving %s", scope.get("path"))
            if started:
                raise  # half a response was sent: only closing the connection ends it
            error = APIError(500, "Internal error while serving the request.", "internal_error")
            await error.response()(scope, receive, send)


LARGE_BODY_BYTES = 1 << 20  # larger bodies are parsed on a thread, by parse_in_slices
LONG_STRING_BYTES = 1 << 16  # string literals longer than this are decoded slice by slice
SLICE_BYTES = 1 << 18
_BACKSLASH = 0x5C


class _Unsure(ValueError):
    """The pieces do not decide: parse the body whole (which gives the right error)."""


def parse_in_slices(body: bytes | bytearray) -> Any:
    """`body` parsed as `pydantic_core.from_json(body)` parses it, in calls that each hold
    the GIL briefly when the body's size is in long strings (a prompt): each long string
    literal is decoded in slices of `SLICE_BYTES`, the rest, with a marker in each one's
    place, in one call. Meant for a thread: the event loop gets the GIL between the calls.
    ValueError for anything but a valid body whose long strings are values (not keys); the
    caller then parses it whole, for the error or the value."""
    literals = _long_literals(body)
    if not literals:
        return pydantic_core.from_json(body)
    marker = f"\\u0000baton-{uuid.uuid4().hex}-"
    pieces, done = [], 0
    for i, (start, end) in enumerate(literals):
        pieces += [body[done:start], f'"{marker}{i}"'.encode()]
        done = end + 1
    pieces.append(body[done:])
    skeleton = pydantic_core.from_json(b"".join(pieces))
    values = [_decode_literal(body, start + 1, end) for start, end in literals]
    return _substitute(skeleton, marker.replace("\\u0000", "\x00"), values)


def _long_literals(body: bytes | bytearray) -> list[tuple[int, int]]:
    """(opening quote, closing quote) of each string literal longer than LONG_STRING_BYTES,
    found by quote parity (a quote after an odd run of backslashes is escaped)."""
    out, opening = [], -1
    q = _find_quote(body, 0)
    while q != -1:
        run = 0
        while q - run > 0 and body[q - run - 1] == _BACKSLASH:
            run += 1
        if opening >= 0 and run % 2:
            pass  # an escaped quote inside a string
        elif opening < 0:
            opening = q
        else:
            if q - opening > LONG_STRING_BYTES:
                out.append((opening, q))
            opening = -1
        q = _find_quote(body, q + 1)
    if opening >= 0:
        raise _Unsure("an unterminated string")
    return out


def _find_quote(body: bytes | bytearray, start: int) -> int:
    # A window at a time: one search through a 20 MB string would hold the GIL throughout.
    while start < len(body):
        q = body.find(b'"', start, start + SLICE_BYTES)
        if q != -1:
            return q
        start += SLICE_BYTES
    return -1


def _decode_literal(body: bytes | bytearray, start: int, end: int) -> str:
    """The string whose JSON spelling is body[start:end], decoded in slices. A slice cut in
    the middle of an escape (a surrogate pair's is 12 bytes) or of a UTF-8 sequence does not
    decode (jiter refuses a lone surrogate and a truncated escape or sequence): the cut moves
    back a byte at a time until it does."""
    parts, pos = [], start
    while pos < end:
        cut = min(pos + SLICE_BYTES, end)
        for back in range(16):
            try:
                parts.append(pydantic_core.from_json(b'"' + body[pos:cut - back] + b'"'))
            except ValueError:
                if cut == end:
                    raise _Unsure("an invalid string") from None
                continue
            pos = cut - back
            break
        else:
            raise _Unsure("an invalid string")
    return "".join(parts)


def _substitute(value: Any, marker: str, strings: list[str]) -> Any:
    if isinstance(value, str):
        return strings[int(value[len(marker):])] if value.startswith(marker) else value
    if isinstance(value, list):
        return [_substitute(item, marker, strings) for item in value]
    if isinstance(value, dict):
        if any(key.startswith(marker) for key in value):
            raise _Unsure("a long key")
        return {key: _substitute(item, marker, strings) for key, item in value.items()}
    return value


class _JSONRequest(Request):
    async def body(self) -> bytearray:
        # Grown chunk by chunk: joining a large body's chunks at the end (Starlette's way)
        # is one long copy on the event loop.
        if not hasattr(self, "_body"):
            buffer = bytearray()
            async for chunk in self.stream():
                buffer += chunk
            self._body = buffer
        return self._body

    async def json(self):
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) > LARGE_BODY_BYTES:
                try:
                    self._json = await asyncio.get_running_loop().run_in_executor(None, parse_in_slices, body)
                    PARSED_STRICTLY.set(True)
                    return self._json
                except ValueError:
                    pass  # parsed whole below, for the value or the error
            try:
                self._json = pydantic_core.from_json(body)
                PARSED_STRICTLY.set(True)
            except ValueError:
                self._json = json.loads(body)  # raises JSONDecodeError: FastAPI's 400 path
        return self._json


class JSONRoute(APIRoute):
    """An APIRoute whose request bodies are parsed as `_JSONRequest` describes."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            return await handler(_JSONRequest(request.scope, request.receive))

        return route
