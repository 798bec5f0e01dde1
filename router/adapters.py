"""LoRA adapters through the router: vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`.

A load goes to every worker of every role the router knows (prefill and decode must both
hold an adapter for a disaggregated request to use it) and succeeds only if every
available one loaded it; a worker that refused it gets an unload, so a failed load leaves
no worker serving the name. An unload goes to every worker; it is refused (409) while some
worker still runs requests with the adapter (those that had no request drop it). The
routes sit under `/v1`, so the API key guards them like every other `/v1` route.

Which adapters exist is not stored here: workers report the names they serve in every
`Stats` poll (`LoadStats.lora_adapters`), and `/v1/models` and the request's `model`
field read them from there (`WorkerPool.adapters`). A worker that joins later serves only
what its own `--lora-modules` (or the operator's `spec.loraAdapters`) gave it.
"""

from __future__ import annotations

import asyncio

import grpc
from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from baton.protos import worker_pb2
from baton.router.errors import APIError, bad_request, no_worker
from baton.router.workers import Worker, WorkerPool

ADAPTER_TIMEOUT_S = 120.0  # reading an adapter from disk on a busy engine thread


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None  # vLLM's; ids are each worker's own, so the name decides


def _workers(pool: WorkerPool, roles: tuple[str, ...]) -> list[Worker]:
    missing = [role for role in roles if not pool.available(role)]
    if missing:
        raise no_worker(missing[0])
    return [w for role in roles for w in pool.available(role)]


async def _call(worker: Worker, method: str, request) -> grpc.aio.AioRpcError | None:
    try:
        await getattr(worker.stub, method)(request, timeout=ADAPTER_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        return exc
    return None


def adapter_routes(pool: WorkerPool, roles: tuple[str, ...], served_model_names: tuple[str, ...]) -> APIRouter:
    router = APIRouter(tags=["lora"])

    @router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load(body: LoadLoRAAdapterRequest) -> str:
        if body.lora_name in served_model_names:
            raise bad_request(f"'{body.lora_name}' is the base model's name", "lora_name")
        if body.lora_name in pool.adapters(roles):
            raise bad_request(f"The LoRA adapter '{body.lora_name}' is already loaded; unload it first.",
                              "lora_name")
        workers = _workers(pool, roles)
        request = worker_pb2.LoadAdapterRequest(lora_name=body.lora_name, lora_path=body.lora_path)
        errors = await asyncio.gather(*(_call(w, "LoadAdapter", request) for w in workers))
        failed = [(w, e) for w, e in zip(workers, errors) if e is not None]
        if failed:
            undo = worker_pb2.UnloadAdapterRequest(lora_name=body.lora_name)
            await asyncio.gather(*(_call(w, "UnloadAdapter", undo) for w, e in zip(workers, errors) if e is None))
            worker, exc = failed[0]
            raise bad_request(f"Loading LoRA adapter '{body.lora_name}' failed on the {worker.role} worker "
                              f"{worker.address}: {exc.details()}", "lora_path")
        await pool.poll_all()  # the next request sees the adapter
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    @router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload(body: UnloadLoRAAdapterRequest) -> str:
        workers = _workers(pool, roles)
        request = worker_pb2.UnloadAdapterRequest(lora_name=body.lora_name)
        errors = await asyncio.gather(*(_call(w, "UnloadAdapter", request) for w in workers))
        codes = [e.code() for e in errors if e is not None]
        await pool.poll_all()
        if grpc.StatusCode.FAILED_PRECONDITION in codes:
            raise APIError(409, f"The LoRA adapter '{body.lora_name}' is in use by running requests; retry when "
                                "they end.", "invalid_request_error", "lora_name", "adapter_in_use")
        if codes and all(c == grpc.StatusCode.NOT_FOUND for c in codes) and len(codes) == len(workers):
            raise APIError(404, f"The LoRA adapter '{body.lora_name}' is not loaded.", "invalid_request_error",
                           "lora_name", "model_not_found")
        other = [e for e in errors if e is not None and e.code() != grpc.StatusCode.NOT_FOUND]
        if other:
            raise bad_request(f"Unloading LoRA adapter '{body.lora_name}' failed: {other[0].details()}", "lora_name")
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    return router
