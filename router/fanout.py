"""One API request -> several output streams (prompts x n), run concurrently and merged.

Each stream is a task feeding one queue; `events()` yields `(choice_index, Delta)` in
arrival order. `close()` cancels whatever still runs: that closes the dispatcher's
generators, which cancel the worker calls and abort the requests on the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from baton.router.admission import AdmissionTicket
from baton.router.dispatch import Delta, Dispatcher
from baton.router.errors import APIError
from baton.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client disconnected; the streams were cancelled."""


@dataclass(frozen=True)
class Job:
    index: int  # the choice index: prompt_index * n + i
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    lora_name: str = ""  # the LoRA adapter the request's `model` names; "": the base model


class FanOut:
    def __init__(self, dispatcher: Dispatcher, jobs: list[Job], ticket: AdmissionTicket):
        self.jobs = jobs
        self._dispatcher = dispatcher
        self._ticket = ticket  # each stream leaves the admission queue at its first output
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._pending: list[tuple[int, Delta | BaseException | None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(job)) for job in self.jobs]

    async def _run(self, job: Job) -> None:
        try:
            async for delta in self._dispatcher.generate(job.request_id, job.prompt_token_ids, job.params,
                                                         job.lora_name):
                self._ticket.started(job.index)
                self._queue.put_nowait((job.index, delta))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # delivered to the consumer, which raises it
            self._queue.put_nowait((job.index, exc))
            return
        finally:
            self._ticket.started(job.index)
        self._queue.put_nowait((job.index, None))

    async def first(self) -> None:
        """Wait for the first event; raise its APIError if it is one (nothing sent yet)."""
        item = await self._queue.get()
        self._pending.append(item)
        if isinstance(item[1], BaseException):
            await self.close()
            raise item[1]

    async def events(self) -> AsyncIterator[tuple[int, Delta]]:
        """Deltas until every stream has ended; raises the first stream error."""
        remaining = len(self.jobs)
        while remaining:
            index, item = self._pending.pop(0) if self._pending else await self._queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                await self.close()
                if isinstance(item, (APIError, ClientGone)):
                    raise item
                log.error("output stream failed", exc_info=item)
                raise APIError(500, "Internal error while serving the request.", "internal_error") from item
            else:
                yield index, item

    def client_gone(self) -> None:
        """Called when the client disconnects: stop everything, end `events()`."""
        for task in self._tasks:
            task.cancel()
        self._queue.put_nowait((-1, ClientGone()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._ticket.close()
