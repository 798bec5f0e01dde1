"""The worker-to-worker gRPC service `baton.v1.KVTransfer`, served by every decode worker.

`Push` is the gRPC data plane (grpc_transport.py); `Abort` lets a sender of any transport
fail a reservation it cannot fill, so the decode side frees it at once instead of at expiry.
"""

from __future__ import annotations

from baton.kvtransfer.errors import REASONS, HandoffError
from baton.protos import kvtransfer_pb2 as pb
from baton.protos import kvtransfer_pb2_grpc as pb_grpc


class KVTransferServicer(pb_grpc.KVTransferServicer):
    def __init__(self, receiver, grpc_receiver):
        self.receiver = receiver
        self.grpc_receiver = grpc_receiver

    async def Push(self, request_iterator, context):
        await self.grpc_receiver.serve_push(context)

    async def Abort(self, request: pb.KVAbortRequest, context) -> pb.KVAbortReply:
        reason = request.error.reason if request.error.reason in REASONS else "aborted"
        message = request.error.message or "the prefill worker gave up"
        self.receiver.fail_ticket(
            request.ticket_id, HandoffError(reason, f"the prefill worker reported: {message}"))
        return pb.KVAbortReply()


def add_service(server, receiver, grpc_receiver) -> None:
    pb_grpc.add_KVTransferServicer_to_server(KVTransferServicer(receiver, grpc_receiver), server)
