"""Engine errors reach the router as gRPC status codes chosen by the error's type."""

import grpc
import pytest

from baton.engine.errors import (
    DuplicateRequestError,
    EngineDeadError,
    InvalidRequestError,
    NoCapacityError,
)
from baton.worker.servicer import engine_status


@pytest.mark.parametrize("exc, code", [
    (NoCapacityError("8 KV blocks needed, 2 free"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DuplicateRequestError("r1"), grpc.StatusCode.ALREADY_EXISTS),
    # The message does not matter, only the type.
    (InvalidRequestError("request id 'x' is already in use"), grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError("top_p must be in (0, 1]"), grpc.StatusCode.INVALID_ARGUMENT),
    (EngineDeadError("the engine was shut down"), grpc.StatusCode.UNAVAILABLE),
    (RuntimeError("CUDA error: an illegal memory access"), grpc.StatusCode.UNAVAILABLE),
])
def test_engine_errors_map_to_status_codes_by_type(exc, code):
    assert engine_status(exc) == code
