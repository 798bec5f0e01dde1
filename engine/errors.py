"""What the engine raises, by kind, so callers map errors by type (never by message text).

Every class is a `ValueError` or a `RuntimeError` as well, so code written against vLLM's
API (`except ValueError`) keeps working. No torch here: the worker maps these to gRPC
status codes without loading the engine.

- `InvalidRequestError`: the prompt or parameters can never be served (empty or too long
  prompt, token ids outside the vocabulary, n > 1 for a KV handoff, ...). Nothing was queued.
- `DuplicateRequestError`: the request id is already in use in this engine. Nothing was queued.
- `NoCapacityError`: the KV pool has no room for a reservation right now; retry later or
  elsewhere.
- `EngineDeadError`: the engine thread stopped; no request can be served by this engine.
- `RankFailedError`: a tensor-parallel rank failed (an `EngineDeadError`): every rank was
  stopped; restart the engine.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of the engine's own errors."""


class InvalidRequestError(EngineError, ValueError):
    """The request (prompt or parameters) is invalid; the caller's fault."""


class DuplicateRequestError(InvalidRequestError):
    """The request id is already in use."""

    def __init__(self, request_id: str):
        super().__init__(f"request id {request_id!r} is already in use")
        self.request_id = request_id


class NoCapacityError(EngineError, ValueError):
    """The KV pool has no room for a reservation right now (retry later or elsewhere)."""


class EngineDeadError(EngineError, RuntimeError):
    """The engine thread stopped; no request can be served."""


class RankFailedError(EngineDeadError):
    """A tensor-parallel rank died or the ranks fell out of step; the engine cannot continue."""
