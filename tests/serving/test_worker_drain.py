"""A worker on SIGTERM: stops taking work, finishes what it serves, exits 0 (gRPC directly)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_harness import ENGINE_FLAGS, free_port, wait_until

from baton.protos import worker_pb2, worker_pb2_grpc
from baton.sampling_params import SamplingParams
from baton.worker.messages import OutputState, params_to_proto


def _start_worker(*extra: str) -> tuple[subprocess.Popen, str]:
    port, metrics = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton.cli", "serve-colocated", "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", str(metrics), *ENGINE_FLAGS, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"127.0.0.1:{port}"
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))

    def serving() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read())
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
        except grpc.RpcError:
            return False
        return status == health_pb2.HealthCheckResponse.SERVING

    wait_until(serving, timeout=120, interval=0.2, what="the worker to serve")
    return proc, address


def _generate(stub, rid: str, max_tokens: int):
    params = params_to_proto(SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0))
    return stub.Generate(worker_pb2.GenerateRequest(request_id=rid, prompt_token_ids=list(range(5, 40)),
                                                    params=params))


def test_sigterm_drains_in_flight_work_and_exits_0(_tiny_model_cache):
    proc, address = _start_worker("--shutdown-grace-seconds", "30")
    channel = grpc.insecure_channel(address)
    stub = worker_pb2_grpc.WorkerStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    state = OutputState()
    chunks = _generate(stub, "long", 900)
    state.apply(next(chunks))  # the request is running
    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: health.Check(health_pb2.HealthCheckRequest()).status
               == health_pb2.HealthCheckResponse.NOT_SERVING, what="NOT_SERVING")
    assert stub.Stats(worker_pb2.StatsRequest()).draining
    with pytest.raises(grpc.RpcError) as refused:
        next(_generate(stub, "late", 5))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    for chunk in chunks:  # the in-flight request runs to its end
        state.apply(chunk)
    assert state.finish_reason == "length" and len(state.token_ids) == 900
    assert proc.wait(timeout=30) == 0
    channel.close()


def test_grace_period_bounds_the_drain(_tiny_model_cache):
    proc, address = _start_worker("--shutdown-grace-seconds", "1", "--max-num-seqs", "1")
    channel = grpc.insecure_channel(address)
    stub = worker_pb2_grpc.WorkerStub(channel)
    # Four long requests one after the other (one sequence at a time): several seconds of
    # work, well past the 1 s grace period even on a fast, idle machine.
    calls = [_generate(stub, f"r{i}", 980) for i in range(4)]
    errors: list[grpc.StatusCode] = []

    def drain(call) -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError as exc:
            errors.append(exc.code())

    threads = [threading.Thread(target=drain, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    time.sleep(0.3)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - start < 10
    for t in threads:
        t.join(timeout=10)
    assert errors, "the grace period should have cut a request off"
    channel.close()
