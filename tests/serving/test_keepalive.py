"""Keepalive: the router's channels ping the workers' servers, and those servers accept it
(baton/rpc.py). Real gRPC on loopback, with pings every fraction of a second (gRPC sends at
most one a second) instead of every 10 s."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from baton.router.workers import Worker
from baton.rpc import Keepalive, server_options

FAST = Keepalive(time_s=0.2, timeout_s=5.0)
QUIET_S = 5.0  # several pings, more than a default server's two strikes


async def _serve(options):
    server = grpc.aio.server(options=options)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, health, f"127.0.0.1:{port}"


async def _quiet_stream(server_opts) -> str:
    """Open a Watch stream, let it carry nothing for QUIET_S, then change the status; the
    status the stream delivers, or the error that ended it."""
    server, health, address = await _serve(server_opts)
    worker = Worker(address, "decode", FAST)  # the router's channel, as it builds it
    try:
        call = health_pb2_grpc.HealthStub(worker.channel).Watch(health_pb2.HealthCheckRequest())
        assert (await call.read()).status == health_pb2.HealthCheckResponse.SERVING
        await asyncio.sleep(QUIET_S)
        await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            return health_pb2.HealthCheckResponse.ServingStatus.Name((await call.read()).status)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    finally:
        await worker.channel.close()
        await server.stop(0)


def test_a_call_quiet_for_many_keepalive_intervals_survives():
    assert asyncio.run(_quiet_stream(server_options(FAST))) == "NOT_SERVING"


def test_a_server_with_grpc_default_ping_policy_would_drop_it():
    # What server_options prevents: gRPC's default server takes these pings for abuse.
    outcome = asyncio.run(_quiet_stream([]))
    assert outcome.startswith("UNAVAILABLE") and "ping" in outcome.lower(), outcome


def test_an_idle_channel_stays_connected_and_answers():
    async def main():
        server, _, address = await _serve(server_options(FAST))
        worker = Worker(address, "decode", FAST)
        try:
            stub = health_pb2_grpc.HealthStub(worker.channel)
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            await asyncio.sleep(QUIET_S)  # no call at all; pings only
            # A GOAWAY would have sent the channel back to IDLE (or failing) meanwhile.
            assert worker.channel.get_state() == grpc.ChannelConnectivity.READY
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await worker.channel.close()
            await server.stop(0)

    asyncio.run(main())


def test_keepalive_refuses_nonsense():
    with pytest.raises(ValueError):
        Keepalive(time_s=0)
