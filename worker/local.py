"""The worker API inside one process: a client that calls a servicer beside the router.

An in-process `baton serve` (baton/inprocess.py) runs the router and one engine in one
process. Its router reaches the engine's servicer through `LocalStub`: the methods, calls
and errors of the gRPC stub (`baton.protos.worker_pb2_grpc.WorkerStub`), so the router's
dispatch, admission, polling and error mapping are one piece of code for both, and so are
the servicer's handlers (their metrics, draining, engine-error mapping). A call is a plain
call of the servicer's handler on the caller's event loop: the request message is handed
over as the object it is (nothing is serialized), no socket, no HTTP/2, no gRPC thread.
What a gRPC call gives its caller is kept:

- `context.abort(code, details)` in a handler raises `grpc.aio.AioRpcError` with that code
  and details, as a failed call does; any other exception escaping a handler is UNKNOWN.
- `timeout=` on a unary call: DEADLINE_EXCEEDED once it passes (the handler is cancelled).
- A streaming call runs its handler in the task that iterates it: cancelling that task
  (a client gone) cancels the handler where it waits, and its `finally` blocks close the
  engine stream, which aborts the request; `call.cancel()` closes a handler left suspended.

No torch and no engine import here: the servicer is duck-typed.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator

import grpc


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error a gRPC client would raise for a call that ended with `code`."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class LocalContext:
    """The part of `grpc.aio.ServicerContext` the servicers use."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        raise rpc_error(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def failed(self, exc: Exception) -> grpc.aio.AioRpcError:
        """The caller's error for an exception that escaped the handler."""
        if isinstance(exc, grpc.aio.AioRpcError):
            return exc
        if self.code is not None:  # set_code then raise: the generated UNIMPLEMENTED stubs do
            return rpc_error(self.code, self.details)
        return rpc_error(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")


class LocalStream:
    """A server-streaming call: iterate it for the handler's messages; `cancel()` as gRPC's."""

    def __init__(self, handler, request) -> None:
        self._context = LocalContext()
        self._messages = handler(request, self._context)
        self._closing: asyncio.Task | None = None

    def __aiter__(self) -> AsyncIterator:
        return self

    async def __anext__(self):
        try:
            return await self._messages.__anext__()
        except StopAsyncIteration:
            raise
        except Exception as exc:
            raise self._context.failed(exc) from None

    def cancel(self) -> bool:
        """End the call if the handler is suspended between messages (its `finally` blocks
        run); False if it had ended already. Never waits."""
        gen = self._messages
        if gen.ag_frame is None or gen.ag_running or self._closing is not None:
            return False
        self._closing = asyncio.get_running_loop().create_task(gen.aclose())
        self._closing.add_done_callback(lambda t: t.cancelled() or t.exception())
        return True


class LocalStub:
    """`WorkerStub`'s calls on `servicer` (an `EngineServicer`) in this process."""

    def __init__(self, servicer) -> None:
        self._servicer = servicer

    def __getattr__(self, method: str):
        handler = getattr(self._servicer, method)  # AttributeError: the worker API has no such call
        if inspect.isasyncgenfunction(handler):
            return lambda request: LocalStream(handler, request)

        async def unary(request, timeout: float | None = None):
            context = LocalContext()
            try:
                async with asyncio.timeout(timeout) as deadline:
                    return await handler(request, context)
            except TimeoutError:
                if deadline.expired():
                    raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
                raise context.failed(TimeoutError()) from None
            except Exception as exc:
                raise context.failed(exc) from None

        return unary
