"""The router's HTTP edge on a real uvicorn server on loopback: an unexpected error is a 500
that keeps the keep-alive connection, a body over the limit is a 413 (declared or streamed),
and bodies parse as the router parses them."""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time

import pydantic_core
import pytest
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from baton.router import edge, errors
from baton.router.edge import BodyLimit, ErrorBoundary, JSONRoute
from baton.router.protocol import TextBody

LIMIT = 1024


class Body(BaseModel):
    text: str


class Text(TextBody):
    text: str


def make_app(max_bytes: int) -> FastAPI:
    app = FastAPI()
    errors.install(app)
    app.router.route_class = JSONRoute

    @app.post("/echo")
    async def echo(body: Body) -> dict:
        return {"length": len(body.text)}

    @app.post("/text")
    async def text(body: Text) -> dict:
        return {"length": len(body.text)}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("a bug, not the client's fault")

    app.add_middleware(ErrorBoundary)
    app.add_middleware(BodyLimit, max_bytes=max_bytes)
    return app


def serve(app: FastAPI):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield port
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server():
    yield from serve(make_app(LIMIT))


@pytest.fixture(scope="module")
def large_server():
    yield from serve(make_app(64 << 20))


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


def test_a_large_body_is_parsed_in_slices_as_it_would_be_whole(large_server):
    """Over LARGE_BODY_BYTES the body is parsed on a thread, its long strings slice by slice:
    the value is the same, cuts inside escapes and multi-byte characters included."""
    text = "é 日本 😀 \"quoted\" \\ back\n" * 100_000
    for body in (json.dumps({"text": text}).encode(), json.dumps({"text": text}, ensure_ascii=False).encode()):
        assert len(body) > edge.LARGE_BODY_BYTES
        conn = http.client.HTTPConnection("127.0.0.1", large_server, timeout=60)
        conn.request("POST", "/echo", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read()) == {"length": len(text)}


def _parsed(parse, body: bytes):
    try:
        return parse(body)
    except ValueError:
        return ValueError


def test_parse_in_slices_gives_the_value_and_the_refusals_of_a_whole_parse(monkeypatch):
    # Short strings count as long and slices are a few bytes, so that every kind of cut
    # (inside an escape, a surrogate pair, a UTF-8 sequence) happens many times.
    monkeypatch.setattr(edge, "LONG_STRING_BYTES", 40)
    monkeypatch.setattr(edge, "SLICE_BYTES", 23)
    rnd = random.Random(7)
    alphabet = ["a", " ", '"', "\\", "\n", "é", "日", "😀", "\x01", "/", "\u2028"]

    def text(n: int) -> str:
        return "".join(rnd.choice(alphabet) for _ in range(n))

    sliced = 0
    for _ in range(500):
        value = {"model": "m", "messages": [{"role": "user", "content": text(rnd.randint(0, 200))}
                                            for _ in range(rnd.randint(1, 3))], "n": [1, 2.5, None, True],
                 "nested": {"k": text(rnd.randint(0, 80))}}
        body = json.dumps(value, ensure_ascii=rnd.random() < 0.5).encode()
        sliced += bool(edge._long_literals(body))
        assert edge.parse_in_slices(body) == value
        broken = bytearray(body)
        broken[rnd.randrange(len(broken))] = rnd.choice(b'"\\\x01az{}\xc3')
        whole = _parsed(pydantic_core.from_json, bytes(broken))
        assert _parsed(edge.parse_in_slices, bytes(broken)) in (whole, ValueError)  # ValueError: parse whole
        lone = body.replace(b'"content": "', b'"content": "\\udc00', 1)
        assert _parsed(edge.parse_in_slices, lone) is ValueError  # the caller's json.loads path names it
    assert sliced > 400
    long_key = b'{"' + b"k" * 100 + b'": 1}'
    assert _parsed(edge.parse_in_slices, long_key) is ValueError


@pytest.mark.parametrize("size", [10, 400_000])  # a small body, and one parsed in slices
def test_text_utf8_cannot_encode_is_refused_by_name_whatever_the_size(large_server, size):
    """pydantic-core's parser refuses a lone surrogate, so a body it parsed skips the UTF-8
    check; one only json.loads takes still gets it, and its 400 names the field."""
    def post(raw: bytes) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", large_server, timeout=60)
        conn.request("POST", "/text", body=raw, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()

    text = "日本語 " * size
    assert post(json.dumps({"text": text}, ensure_ascii=False).encode()) == (200, b'{"length":%d}' % len(text))
    status, body = post(json.dumps({"text": text + "\ud800"}).encode())  # the escape "\\ud800"
    assert status == 400 and b"'text' contains text that cannot be encoded as UTF-8" in body, body
