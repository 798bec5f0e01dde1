"""The router's HTTP edge on a real uvicorn server on loopback: an unexpected error is a 500
that keeps the keep-alive connection, a body over the limit is a 413 (declared or streamed),
and bodies parse as the router parses them."""

from __future__ import annotations

import http.client
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from baton.router import errors
from baton.router.edge import BodyLimit, ErrorBoundary, JSONRoute

LIMIT = 1024


class Body(BaseModel):
    text: str


def make_app() -> FastAPI:
    app = FastAPI()
    errors.install(app)
    app.router.route_class = JSONRoute

    @app.post("/echo")
    async def echo(body: Body) -> dict:
        return {"length": len(body.text)}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("a bug, not the client's fault")

    app.add_middleware(ErrorBoundary)
    app.add_middleware(BodyLimit, max_bytes=LIMIT)
    return app


@pytest.fixture(scope="module")
def server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(make_app(), host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield port
    srv.should_exit = True
    thread.join(timeout=10)


def test_a_500_keeps_the_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    conn.request("GET", "/boom")
    response = conn.getresponse()
    body = response.read()
    assert response.status == 500 and b'"internal_error"' in body and b"RuntimeError" not in body
    sock = conn.sock
    conn.request("POST", "/echo", body=b'{"text": "abc"}', headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b'{"length":3}'
    assert conn.sock is sock  # the same connection served both
    conn.close()


def test_declared_body_over_the_limit_is_413(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    conn.request("POST", "/echo", body=b'{"text": "' + b"x" * LIMIT + b'"}',
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    body = response.read()
    assert response.status == 413 and b'"request_too_large"' in body, body


def test_streamed_body_over_the_limit_is_413(server):
    """Without Content-Length (chunked), the limit applies to the bytes as they arrive."""
    chunks = [b'{"text": "', *([b"y" * 256] * 8), b'"}']
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    conn.request("POST", "/echo", body=iter(chunks), headers={"Content-Type": "application/json"},
                 encode_chunked=True)
    response = conn.getresponse()
    body = response.read()
    assert response.status == 413 and b"limit of 1024 bytes" in body, body


@pytest.mark.parametrize("raw,status", [
    (b'{"text": "\\ud83d\\ude00"}', 200),  # a surrogate pair is one character
    # pydantic-core's parser refuses a lone surrogate; json.loads takes it, so that validation
    # (router/protocol.py) can name the field. This model has no such check.
    (b'{"text": "\\ud800"}', 200),
    (b'{"text": 5}', 400),
    (b'{"text": ', 400),
])
def test_bodies_parse_like_json(server, raw, status):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    conn.request("POST", "/echo", body=raw, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    body = response.read()
    assert response.status == status, body
