"""The colocated worker's servicer: `Generate` runs a whole request in this worker's engine
and streams it as `GenerateChunk`s (Info, Stats and Abort come from `EngineServicer`)."""

from __future__ import annotations

import grpc

from baton.protos import worker_pb2_grpc
from baton.worker.servicer import EngineServicer


class ColocatedServicer(EngineServicer):
    def register(self, server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_WorkerServicer_to_server(self, server)

    async def Generate(self, request, context):
        async for chunk in self.serve_generate(request, context):
            yield chunk
