"""`POST /v1/embeddings` (OpenAI's shape): each input is pooled by a worker's engine.

Workers serve embeddings when run with `--task embed` (`WorkerInfo.task`); disaggregated,
the prefill workers take them (an embedding is a prefill and nothing more), colocated the
colocated ones. Each input is one `Embed` call to the least loaded such worker, all inputs
at once (the engine batches them); a worker that cannot be reached is replaced once. A model
whose workers are not run for embeddings is a 400, as vLLM answers; `dimensions` is a 400
(no supported model is a Matryoshka one). `encoding_format` "base64" is the little-endian
float32 bytes, as OpenAI sends them.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
import uuid
from typing import Literal

import grpc
from fastapi import APIRouter
from pydantic import Field

from baton.protos import worker_pb2
from baton.router.edge import JSONRoute
from baton.router.errors import bad_request, model_not_found, no_worker
from baton.router.protocol import TextBody, TokenId
from baton.router.workers import Worker

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
EMBED_TIMEOUT_S = 300.0


class EmbeddingRequest(TextBody):
    """POST /v1/embeddings"""

    model: str = Field(max_length=512)
    input: str | list[str] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def embedding_routes(serving) -> APIRouter:
    """The route, over `serving` (router/api.py:OpenAIServing: tokenizer, pool, dispatcher)."""
    router = APIRouter(tags=["openai"], route_class=JSONRoute)

    @router.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict:
        if body.model not in serving.served:
            raise model_not_found(body.model, list(serving.served))
        if body.dimensions is not None:
            raise bad_request("dimensions is not supported: this model is not a Matryoshka embedding model, "
                              "so a truncated vector would be meaningless", "dimensions")
        role = serving.dispatcher.roles[0]
        workers = _embedding_workers(serving, role, body.model)
        max_model_len, vocab_size = serving.limits()
        prompts = await _inputs(serving, body, max_model_len, vocab_size)
        request_id = f"embd-{uuid.uuid4().hex}"
        vectors = await asyncio.gather(*(_embed(serving, workers, f"{request_id}-{i}", ids)
                                         for i, ids in enumerate(prompts)))
        data = [{"object": "embedding", "index": i, "embedding": _encode(vec, body.encoding_format)}
                for i, vec in enumerate(vectors)]
        tokens = sum(len(ids) for ids in prompts)
        return {"id": request_id, "object": "list", "created": int(time.time()), "model": body.model,
                "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return router


def _embedding_workers(serving, role: str, model: str) -> list[Worker]:
    available = serving.pool.available(role)
    if not available:
        raise no_worker(role)
    workers = [w for w in available if w.info is not None and w.info.task == "embed"]
    if not workers:
        raise bad_request(f"The model '{model}' is not served for embeddings: its {role} workers run for "
                          "generation (start them with --task embed).", "model")
    return workers


async def _inputs(serving, body: EmbeddingRequest, max_model_len: int, vocab_size: int) -> list[list[int]]:
    """Token ids of every input; 400 for an empty, too long or out-of-vocabulary one."""
    given = body.input
    if isinstance(given, str) or (given and all(isinstance(x, int) for x in given)):
        given = [given]
    if not given:
        raise bad_request("input is an empty list", "input")
    if len(given) > MAX_INPUTS:
        raise bad_request(f"at most {MAX_INPUTS} inputs per request", "input")
    prompts = []
    for i, item in enumerate(given):
        param = "input" if len(given) == 1 else f"input.{i}"
        if isinstance(item, str):
            ids = await serving.encode(item, param, max_model_len)
        else:
            ids = list(item)
            bad = next((t for t in ids if t >= vocab_size), None)
            if bad is not None:
                raise bad_request(f"{param}: token id {bad} is out of range: the vocabulary has {vocab_size} "
                                  "tokens", param)
        if not ids:
            raise bad_request(f"{param} is empty", param)
        # No output follows an embedding's prompt: it may fill the whole context.
        if len(ids) > max_model_len:
            raise bad_request(f"This model's maximum context length is {max_model_len} tokens. However, "
                              f"{param} has {len(ids)} tokens. Reduce it.", param, "context_length_exceeded")
        prompts.append(ids)
    return prompts


async def _embed(serving, workers: list[Worker], request_id: str, ids: list[int]) -> list[float]:
    dispatcher = serving.dispatcher
    tried: list[Worker] = []
    while True:
        candidates = [w for w in workers if w not in tried and w.available]
        if not candidates:
            raise no_worker(dispatcher.roles[0])
        worker = dispatcher.policy.order_decode(candidates)[0]
        tried.append(worker)
        worker.outstanding += 1
        try:
            reply = await worker.stub.Embed(worker_pb2.EmbedRequest(request_id=request_id, prompt_token_ids=ids),
                                            timeout=EMBED_TIMEOUT_S)
            return list(reply.embedding)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and len(tried) < 2:
                serving.pool.check(worker)
                continue
            raise dispatcher.rpc_error(exc, worker) from None
        finally:
            worker.outstanding -= 1


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector
