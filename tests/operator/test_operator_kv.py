"""Prefill/decode compatibility before any pod starts, and live KV handoff health.

The handoff metrics come from real handoffs (`KVSender` to `KVReceiver` over gRPC on
loopback, one of them between mismatched layouts) served on real /metrics endpoints; the
operator reads them as it reads worker pods in a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from test_operator_crd import service as crd_service
from test_operator_crd import violations
from test_operator_kopf import (
    CHILDREN,
    DEPLOY,
    IS,
    NS,
    condition,
    events,
    make_ready,
    models_claim,
    service,
)

from baton.kvtransfer import HandoffError, KVLayout, KVReceiver, KVSender, TensorPool
from baton.operator import compat, kvhealth, spec, status
from baton.rpc import server_options

LAYOUT = KVLayout("llama", 2, 2, 16, 4, "float32")


def parsed(**fields) -> spec.InferenceService:
    body = crd_service(**fields)
    body["metadata"].update(namespace="default", uid="u")
    return spec.parse(body)


# --- checked when applied: CEL, and the operator for what CEL cannot read -----------------


@pytest.mark.parametrize("fields, message", [
    ({"prefill": {"engine": {"blockSize": 16}}, "decode": {"engine": {"blockSize": 64}}},
     "blockSize must be equal"),
    ({"decode": {"engine": {"blockSize": 32}}}, "blockSize must be equal"),
    ({"prefill": {"engine": {"extraArgs": ["--block-size", "32"]}}},
     "must not set a flag the operator sets"),
    ({"decode": {"engine": {"extraArgs": ["--dtype=float16"]}}},
     "must not set a flag the operator sets"),
    ({"mode": "colocated", "colocated": {"engine": {"extraArgs": ["--model", "/x"]}}},
     "must not set a flag the operator sets"),
    ({"decode": {"engine": {"extraArgs": ["--enforce-eager", "--kv-tcp-port", "1"]}}},
     "must not set a flag the operator sets"),
    ({"prefill": {"engine": {"extraArgs": ["--kv-cache-dtype", "fp8"]}}},
     "must not set a flag the operator sets"),
    ({"decode": {"engine": {"extraArgs": ["--quantization=fp8"]}}},
     "must not set a flag the operator sets"),
    ({"decode": {"engine": {"extraArgs": ["--otlp-traces-endpoint", "c:4317"]}}},
     "must not set a flag the operator sets"),
])
def test_cel_refuses_roles_that_cannot_exchange_kv(fields, message):
    assert any(message in text for text in violations(crd_service(**fields)))


def test_cel_accepts_matching_roles_and_other_flags():
    assert violations(crd_service(prefill={"engine": {"blockSize": 64}},
                                  decode={"engine": {"blockSize": 64,
                                                     "extraArgs": ["--enforce-eager",
                                                                   "--block-sizes-note"]}})) == []


def test_the_operator_checks_what_cel_cannot_read():
    """The KV cache dtype and quantization are typed fields shared by both roles: a role's
    extraArgs may not set them (in either spelling), and fp8 and fp8_e4m3 are one dtype."""
    assert compat.problems(parsed(model={"source": {"pvc": {"claimName": "m"}},
                                         "kvCacheDtype": "fp8_e4m3", "quantization": "fp8"})) == []
    assert parsed(model={"source": {"pvc": {"claimName": "m"}}, "kvCacheDtype": "fp8_e4m3"}
                  ).model == parsed(model={"source": {"pvc": {"claimName": "m"}},
                                           "kvCacheDtype": "fp8"}).model
    for role, args in (("prefill", ["--kv-cache-dtype", "fp8"]),
                       ("decode", ["--kv-cache-dtype=fp8_e4m3"]),
                       ("decode", ["--quantization", "awq"]),
                       ("prefill", ["--otlp-traces-endpoint=c:4317"])):
        [problem] = compat.problems(parsed(**{role: {"engine": {"extraArgs": args}}}))
        assert problem.reason == "IncompatibleRoles"
        flag = args[0].split("=")[0]
        assert f"spec.{role}.engine.extraArgs sets {flag}, which the operator sets" \
            in problem.message
    [problem] = compat.problems(parsed(mode="colocated", colocated={
        "engine": {"extraArgs": ["--kv-cache-dtype", "fp8"]}}))
    assert "model.kvCacheDtype" in problem.message
    # What CEL refuses, the operator refuses too (a cluster without CEL, an old CRD).
    [problem] = compat.problems(parsed(prefill={"engine": {"blockSize": 16}},
                                       decode={"engine": {"blockSize": 64}}))
    assert "set both to the same value" in problem.message
    [problem] = compat.problems(parsed(decode={"engine": {"extraArgs": ["--port=1"]}}))
    assert "sets --port" in problem.message
    assert compat.problems(parsed(mode="colocated", colocated={"engine": {"blockSize": 64}})) == []


async def test_an_incompatible_spec_starts_no_worker_and_says_what_to_change(
        apiserver, operator, wait):
    """The issue's example: prefill blockSize 16, decode 64 (here without CEL, as on a
    cluster whose CRD predates the rule)."""
    await models_claim(apiserver)
    await operator.start(resync_seconds=0.3)
    await apiserver.create(IS, service(prefill={"engine": {"blockSize": 16}},
                                       decode={"engine": {"blockSize": 64}}))
    ready = await wait(lambda: condition(apiserver).get("reason") == "IncompatibleRoles"
                       and condition(apiserver))
    assert ready["status"] == "False"
    assert "spec.prefill.engine.blockSize (16) differs from spec.decode.engine.blockSize (64)" \
        in ready["message"]
    await asyncio.sleep(1.0)  # a few resyncs: still nothing
    assert apiserver.names(DEPLOY, NS) == set()

    await apiserver.merge(IS, NS, "llama", {"spec": {"decode": {"engine": {"blockSize": 16}}}})
    await wait(lambda: apiserver.names(DEPLOY, NS) == CHILDREN[DEPLOY])
    await wait(lambda: condition(apiserver).get("reason") == "PrefillNotReady")


# --- live handoff health ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def handoffs(ok: int, mismatched: int, transport: str = "grpc",
                   sender_transports: tuple[str, ...] = ("grpc", "ucx")):
    """Run real handoffs into one receiver of `transport`: `ok` from a sender with the same
    layout and `mismatched` from one whose blocks are half as long; the senders may use
    `sender_transports`. Yields the (prefill, decode) registries the two sides recorded
    their metrics in."""
    prefill, decode = CollectorRegistry(), CollectorRegistry()
    src, dst = TensorPool(LAYOUT, 16), TensorPool(LAYOUT, 16)
    other = TensorPool(dataclasses.replace(LAYOUT, block_size=2), 16)
    server = grpc.aio.server(options=server_options())
    receiver = KVReceiver(dst, transport, default_ttl_s=5.0, registry=decode)
    receiver.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await receiver.start(port)
    good, bad = (KVSender(pool, registry=prefill, transports=sender_transports)
                 for pool in (src, other))
    try:
        for i in range(ok):
            ticket = await receiver.reserve(f"ok{i}", 4)
            waiter = asyncio.ensure_future(receiver.wait(ticket.ticket_id))
            await good.push(ticket.to_bytes(), [i], 7)
            await receiver.release(await waiter)
        for i in range(mismatched):
            ticket = await receiver.reserve(f"bad{i}", 4)
            with pytest.raises(HandoffError, match="layout_mismatch"):
                await bad.push(ticket.to_bytes(), [i], 7)
        yield prefill, decode
    finally:
        await good.close()
        await bad.close()
        await receiver.stop()
        await server.stop(None)


async def test_counts_read_from_real_handoff_metrics():
    async with handoffs(ok=3, mismatched=2) as (prefill, decode):
        sent = kvhealth.parse(generate_latest(prefill).decode())
        received = kvhealth.parse(generate_latest(decode).decode())
    assert sent.prefill == kvhealth.Side(3, {"layout_mismatch": 2})
    assert received.decode.completed == 3
    assert received.handoffs == 3 + sum(received.decode.failures.values())
    both = kvhealth.window({"p": sent, "d": received}, None)
    assert both.handoffs == 5  # started by the prefill side, each counted once
    assert both.failures == {"layout_mismatch": 2}  # both ends saw them: counted once
    state, report = kvhealth.condition(both, both, "auto", 2, None)
    assert (state.status, state.reason) == (False, "LayoutMismatch")
    assert "engine.blockSize" in state.message
    assert report == {"transport": "grpc", "handoffs": 5, "failures": 2,
                      "layoutMismatches": 2}  # the transport label of the completed ones


def side(completed, **failures) -> kvhealth.Counts:
    return kvhealth.Counts(prefill=kvhealth.Side(completed, failures))


def test_windows_count_only_new_handoffs_and_survive_restarts():
    before = {"p": side(9, timeout=1)}
    same = kvhealth.window({"p": side(9, timeout=1)}, before)
    assert (same.handoffs, same.failures) == (0, {})
    idle, _ = kvhealth.condition(same, before["p"], "ucx", 1, 60)
    assert (idle.status, idle.reason) == (True, "Idle")
    failed = status.Condition("KVTransferReady", False, "HandoffFailures", "...")
    assert kvhealth.condition(same, before["p"], "ucx", 1, 60, failed)[0] == failed
    failing = kvhealth.window({"p": side(24, timeout=6)}, before)
    assert (failing.handoffs, failing.failures) == (20, {"timeout": 5})
    state, report = kvhealth.condition(failing, failing, "ucx", 1, 60)
    assert (state.status, state.reason) == (False, "HandoffFailures")
    assert "5 of 20 handoffs in the last 60s failed (timeout 5) over ucx" in state.message
    restarted = kvhealth.window({"p": side(2)}, before)
    assert restarted.handoffs == 2  # counters went down: the pod restarted, count it whole
    client_gone = side(99, cancelled=1)
    state, _ = kvhealth.condition(client_gone, client_gone, "grpc", 1, None)
    assert (state.status, state.reason) == (True, "Healthy")
    state, _ = kvhealth.condition(kvhealth.Counts(), kvhealth.Counts(), "grpc", 0, None)
    assert (state.status, state.reason) == (None, "NoMetrics")
    state, _ = kvhealth.condition(client_gone, client_gone, "grpc", 1, None, pods=3)
    assert state.message.endswith("(read from 1 of 3 worker pods; the others did not answer "
                                  "on their metrics port)")


def test_a_worker_without_these_metrics_or_not_answering_adds_nothing():
    assert kvhealth.parse("# an exporter with other families\nup 1\n") == kvhealth.Counts()
    assert kvhealth.scrape("http://127.0.0.1:9/metrics", timeout=1.0) is None


def test_transport_label_reported_by_workers_wins():
    text = ('# TYPE baton:kv_transfer_seconds histogram\n'
            'baton:kv_transfer_seconds_count{model_name="m",role="prefill",transport="tcp"} 4\n'
            'baton:kv_transfer_seconds_sum{model_name="m",role="prefill",transport="tcp"} 0.1\n'
            '# TYPE baton:kv_transfer_failures counter\n'
            'baton:kv_transfer_failures_total{model_name="m",role="decode",transport="none",'
            'reason="expired"} 1\n')
    counts = kvhealth.parse(text)
    assert counts.transports == {"tcp"} and counts.handoffs == 4  # "none": no transport
    assert counts.failures == {"expired": 1}
    _, report = kvhealth.condition(counts, counts, "auto", 1, None)
    assert report["transport"] == "tcp"


async def worker_pod(apiserver, name: str, role: str, port: int) -> None:
    labels = {"app.kubernetes.io/name": "baton", "app.kubernetes.io/instance": "llama",
              "app.kubernetes.io/component": role}
    await apiserver.create("v1/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS,
                                                        "labels": labels},
        "spec": {"containers": [{"name": role, "ports": [
            {"name": "grpc", "containerPort": 50051},
            {"name": "metrics", "containerPort": port}]}]}})
    await apiserver.merge("v1/pods", NS, name, {"status": {"phase": "Running",
                                                          "podIP": "127.0.0.1"}},
                          subresource="status")


async def test_kv_transfer_ready_reflects_the_workers_handoffs(apiserver, operator, wait):
    """Serving fleets whose handoffs fail on a layout mismatch: KVTransferReady and Ready
    go False and say what to change."""
    await models_claim(apiserver)
    await operator.start(resync_seconds=0.3)
    await apiserver.create(IS, service())  # kvTransfer.transport: auto, the default
    await wait(lambda: apiserver.names(DEPLOY, NS) == CHILDREN[DEPLOY])
    for name in CHILDREN[DEPLOY]:
        await make_ready(apiserver, name, 1)
    await wait(lambda: condition(apiserver).get("reason") == "Serving")
    assert condition(apiserver, "KVTransferReady")["status"] == "Unknown"  # no pods to read

    # The pair's choice: a prefill worker that may use tcp or grpc, a decode worker
    # offering both (auto): tcp.
    async with handoffs(ok=2, mismatched=3, transport="auto",
                        sender_transports=("grpc", "tcp")) as (prefill, decode):
        servers = [start_http_server(0, "127.0.0.1", registry)[0]
                   for registry in (prefill, decode)]
        try:
            await worker_pod(apiserver, "llama-prefill-0", "prefill", servers[0].server_port)
            await worker_pod(apiserver, "llama-decode-0", "decode", servers[1].server_port)
            kv = await wait(lambda: condition(apiserver, "KVTransferReady").get(
                "reason") == "LayoutMismatch" and condition(apiserver, "KVTransferReady"))
            assert kv["status"] == "False"
            assert "prefill and decode KV layouts differ" in kv["message"]
            ready = condition(apiserver)
            assert (ready["status"], ready["reason"]) == ("False", "KVTransferNotReady")
            # Posted by the resync that saw it (a resync's Event names the object's uid).
            warning = await wait(lambda: events(apiserver, "KVTransferNotReady"))
            assert warning[0]["type"] == "Warning" and "LayoutMismatch" in warning[0]["message"]
            # What the pair chose, from the workers' metrics, not the spec's "auto".
            assert apiserver.get_object(IS, NS, "llama")["status"]["kvTransfer"]["transport"] \
                == "tcp"
            await asyncio.sleep(1.0)  # resyncs that see no new handoff keep the verdict
            assert condition(apiserver, "KVTransferReady")["reason"] == "LayoutMismatch"
        finally:
            for server in servers:
                server.shutdown()
                server.server_close()
    # The resync goes on after posting: workers no longer answering is seen, Ready recovers.
    await wait(lambda: condition(apiserver, "KVTransferReady").get("reason") == "NoMetrics")
    await wait(lambda: condition(apiserver).get("reason") == "Serving")
