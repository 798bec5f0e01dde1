"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

A malformed body, a wrong type or an out-of-range value is a 400 (FastAPI's 422 is turned
into OpenAI's 400); an unknown route 404; a body over the limit 413; anything unexpected a
500 whose message names no internals (router/edge.py). Nothing a client sends may produce
a 500.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from baton.router.protocol import UnencodableText

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered to the client with an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> Response:
        # ASCII JSON: a message may quote the client's text, lone surrogates included, which
        # UTF-8 (JSONResponse's encoding) cannot carry.
        return Response(json.dumps(self.body()), status_code=self.status, headers=self.headers,
                        media_type="application/json")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def unauthorized() -> APIError:
    return APIError(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                    "authentication_error", None, "invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def model_not_found(name: str, served: list[str]) -> APIError:
    return APIError(404, f"The model '{name}' does not exist. Served models: {', '.join(served)}.",
                    "invalid_request_error", "model", "model_not_found")


def overloaded(retry_after: int = 1) -> APIError:
    return APIError(429, "Every decode worker is saturated; retry after a moment.",
                    "rate_limit_error", None, "overloaded", headers={"Retry-After": str(retry_after)})


def no_worker(role: str) -> APIError:
    return APIError(503, f"No healthy {role} worker is available; retry later.",
                    "service_unavailable_error", None, "no_healthy_worker",
                    headers={"Retry-After": "1"})


def worker_failed(message: str) -> APIError:
    return APIError(502, f"A worker failed while serving the request: {message}",
                    "worker_error", None, "worker_failed")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request body.", None
    first = errors[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, UnencodableText):
        return str(cause), cause.param
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return f"The body is not valid JSON: {msg}.", None
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    where = f"'{param}': " if param else ""
    return f"Invalid request: {where}{msg}{more}.", param


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return bad_request(message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        error = APIError(exc.status_code, str(exc.detail), kind, None, None,
                         headers=dict(exc.headers or {}))
        return error.response()
    # Anything else is a 500 from router/edge.py's ErrorBoundary, which keeps the connection.
