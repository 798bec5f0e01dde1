"""The LoRA adapters a worker serves, by name (`--lora-modules`, LoadAdapter, UnloadAdapter).

A name maps to a `LoRARequest` whose id is given here (1, 2, ... in load order, never
reused, so an unloaded name loaded again from another path is another adapter to the
engine). Loading reads it at once (on a reading thread, matched against the model, then
put into the engine's host memory between steps), so a bad path is refused when it is
loaded, not when traffic arrives; a request naming it later finds it in host memory, or
waits while it is read again if the host LRU dropped it. Errors are the engine's error types
(ValueError: INVALID_ARGUMENT), so the servicer maps them as it maps every engine error.

Duck-typed on `AsyncLLMEngine`: no torch here.
"""

from __future__ import annotations

import asyncio
import itertools

from baton.engine.errors import InvalidRequestError
from baton.engine.lora.request import LoRARequest


class AdapterNotFound(InvalidRequestError):
    """A request or an unload named an adapter this worker does not serve."""


class AdapterInUse(Exception):
    """An unload named an adapter that running requests still use."""


class AdapterTable:
    def __init__(self, engine, enabled: bool):
        self.engine = engine
        self.enabled = enabled
        self.adapters: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)

    @property
    def names(self) -> list[str]:
        return sorted(self.adapters)

    def resolve(self, name: str) -> LoRARequest | None:
        """The adapter a request names ("" or the served model name: none)."""
        if not name or name == self.engine.config.served_model_name:
            return None
        adapter = self.adapters.get(name)
        if adapter is None:
            served = ", ".join(self.names) or "none"
            raise AdapterNotFound(f"LoRA adapter {name!r} is not loaded on this worker (loaded: {served})")
        return adapter

    async def load(self, name: str, path: str) -> None:
        """Serve the adapter at `path` as `name`; raises ValueError (nothing changed) for
        LoRA off, a taken name, or an adapter the engine cannot apply."""
        if not self.enabled:
            raise InvalidRequestError("this worker runs without LoRA (start it with --enable-lora)")
        if not name or name == self.engine.config.served_model_name:
            raise InvalidRequestError(f"an adapter cannot be named {name!r} (the base model's name or empty)")
        if name in self.adapters:
            raise InvalidRequestError(f"LoRA adapter {name!r} is already loaded "
                                      f"({self.adapters[name].lora_local_path}); unload it first")
        request = LoRARequest(name, next(self._ids), path)

        # Read it now, off the engine thread: a bad adapter is refused here, not per request.
        reading = await self.engine.run(lambda e: e.runner.lora.read_async(request))
        adapter = await asyncio.wrap_future(reading)
        await self.engine.run(lambda e: e.runner.lora.install(adapter))
        self.adapters[name] = request

    def prefetch(self, request: LoRARequest) -> None:
        """Start reading `request`'s adapter if the engine does not hold it in host memory,
        without waiting (a reservation: the read overlaps the prefill on another worker;
        a failure shows when the request is added)."""
        reading = asyncio.ensure_future(self.engine.run(lambda e: e.runner.lora.prefetch(request)))
        reading.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def unload(self, name: str) -> None:
        """Stop serving `name`; raises AdapterNotFound, or AdapterInUse while requests use it."""
        if name not in self.adapters:
            raise AdapterNotFound(f"LoRA adapter {name!r} is not loaded on this worker")
        if not await self.engine.run(lambda e: e.runner.lora.drop(name)):
            raise AdapterInUse(f"LoRA adapter {name!r} is in use by running requests; try again when they end")
        del self.adapters[name]
