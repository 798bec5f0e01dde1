"""The router's HTTP edge: body size limit, fast JSON, and no error that drops a connection.

- `BodyLimit`: a body over `--max-request-mb` is a 413 with OpenAI's error body, at once
  when `Content-Length` says so, else as soon as the bytes received pass the limit.
- `JSONRoute`: request bodies are read into one growing buffer and parsed by pydantic-core's
  JSON parser (several times faster than `json.loads`: a large body is parsed on the event
  loop, and nothing else runs meanwhile); a body
  it refuses is parsed again by `json.loads`, so that text `json` accepts and pydantic
  refuses (a lone surrogate escape) still reaches validation, which names the field.
- `ErrorBoundary`: an unexpected exception becomes a 500 with OpenAI's body and is not
  re-raised: re-raising (what Starlette's handler for `Exception` does) makes uvicorn
  close the keep-alive connection, and the client's next request on it fails with a reset.
"""

from __future__ import annotations

import json
import logging

import pydantic_core
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request

from baton.router.errors import APIError

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
            try:
                self._json = pydantic_core.from_json(body)
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
