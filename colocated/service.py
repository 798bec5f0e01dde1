"""The colocated worker's servicer: `Generate` runs a whole request in this worker's engine
and streams it as `GenerateChunk`s (Info, Stats and Abort come from `EngineServicer`)."""

from __future__ import annotations

import time

import grpc

from baton.protos import worker_pb2_grpc
from baton.worker.servicer import EngineServicer


class ColocatedServicer(EngineServicer):
    def register(self, server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_WorkerServicer_to_server(self, server)

    async def Generate(self, request, context):
        await self.runtime.refuse_if_draining(context)
        with self.runtime.work():
            arrival = time.time()
            params = await self.parse_params(request.params, context)
            prompt = {"prompt_token_ids": list(request.prompt_token_ids)}
            outputs = self.engine.generate(prompt, params, request.request_id)
            async for chunk in self.stream_outputs(outputs, context, arrival, len(prompt["prompt_token_ids"])):
                yield chunk
