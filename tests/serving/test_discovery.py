"""Worker discovery from Kubernetes EndpointSlices: the parsing rules, the watch against
KMock's Kubernetes emulator, and (marked `cluster`) against a real API server."""

from __future__ import annotations

import asyncio
import json
import os
import uuid

import kmock
import pytest
import yaml
from kubernetes import client as k8s

from baton.router.discovery import KubernetesDiscovery, service_addresses, slice_addresses
from baton.router.workers import WorkerPool

SERVICE_LABEL = "kubernetes.io/service-name"


def endpoint_slice(name: str, service: str, endpoints: list[tuple[str, dict]], ports=None,
                   address_type: str = "IPv4", namespace: str = "baton") -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace, "labels": {SERVICE_LABEL: service}},
        "addressType": address_type,
        "ports": ports if ports is not None else [{"name": "grpc", "port": 50051, "protocol": "TCP"},
                                                  {"name": "metrics", "port": 9090, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": cond} for ip, cond in endpoints],
    }


def test_ready_endpoints_on_the_grpc_port():
    s = endpoint_slice("a", "svc", [("10.0.0.1", {"ready": True}), ("10.0.0.2", {"ready": False}),
                                    ("10.0.0.3", {}), ("10.0.0.4", {"ready": True, "terminating": True})])
    # Unset `ready` counts as ready (Kubernetes' rule); terminating pods get no new work.
    assert slice_addresses(s) == {"10.0.0.1:50051", "10.0.0.3:50051"}


def test_port_choice_and_address_families():
    single = endpoint_slice("a", "svc", [("10.0.0.1", {"ready": True})], ports=[{"port": 7000}])
    assert slice_addresses(single) == {"10.0.0.1:7000"}
    no_grpc = endpoint_slice("a", "svc", [("10.0.0.1", {"ready": True})],
                             ports=[{"name": "http", "port": 80}, {"name": "metrics", "port": 9090}])
    assert slice_addresses(no_grpc) == set()
    v6 = endpoint_slice("a", "svc", [("fd00::5", {"ready": True})], address_type="IPv6")
    assert slice_addresses(v6) == {"[fd00::5]:50051"}


def test_a_cell_endpoint_is_one_worker_per_engine_port():
    # A cell's Service names one port per engine (`grpc-<k>`); its metrics ports are no workers.
    ports = [{"name": "grpc-0", "port": 50100}, {"name": "grpc-1", "port": 50101},
             {"name": "metrics-0", "port": 9100}, {"name": "grpc-x", "port": 1}]
    cell = endpoint_slice("a", "svc", [("10.0.0.1", {"ready": True}), ("10.0.0.2", {"ready": False})], ports=ports)
    assert slice_addresses(cell) == {"10.0.0.1:50100", "10.0.0.1:50101"}


def test_client_models_parse_like_dicts():
    api = k8s.ApiClient()
    raw = endpoint_slice("a", "svc", [("10.0.0.1", {"ready": True}), ("10.0.0.2", {"ready": False})])
    model = api.deserialize(json.dumps(raw), "V1EndpointSlice", "application/json")
    assert isinstance(model, k8s.V1EndpointSlice)
    assert slice_addresses(model) == slice_addresses(raw) == {"10.0.0.1:50051"}


def test_a_service_is_the_union_of_its_slices():
    a = endpoint_slice("a", "svc", [("10.0.0.1", {"ready": True})])
    b = endpoint_slice("b", "svc", [("10.0.0.2", {"ready": True})])
    assert service_addresses([a, b]) == {"10.0.0.1:50051", "10.0.0.2:50051"}


async def _until(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.05)


async def test_watch_follows_endpointslices_on_an_emulated_api_server(tmp_path):
    async with kmock.KubernetesEmulator() as server, kmock.Server(server):
        server.resources["discovery.k8s.io/v1/endpointslices"] = kmock.ResourceInfo(
            kind="EndpointSlice", singular="endpointslice", namespaced=True,
            verbs=["create", "delete", "get", "list", "patch", "update", "watch"])
        url = str(server.servers[0].url).rstrip("/")
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "t",
            "clusters": [{"name": "t", "cluster": {"server": url}}],
            "users": [{"name": "t", "user": {"token": "t"}}],
            "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}]}))
        path = "/apis/discovery.k8s.io/v1/namespaces/baton/endpointslices"
        await server.post(path, json=endpoint_slice("p-1", "svc-prefill", [("10.0.0.1", {"ready": True})]))
        await server.post(path, json=endpoint_slice("other", "unrelated", [("10.9.9.9", {"ready": True})]))

        pool = WorkerPool(("prefill", "decode"))
        # Decode workers come from two Services: a fleet's and a cell's (one port per engine).
        discovery = KubernetesDiscovery("baton", {"prefill": ["svc-prefill"], "decode": ["svc-decode", "svc-cell"]},
                                        kubeconfig=str(kubeconfig), watch_seconds=1)
        await discovery.start(pool)
        try:
            await _until(lambda: set(pool.workers["prefill"]) == {"10.0.0.1:50051"})
            assert set(pool.workers["decode"]) == set()
            # A new pod, a second slice, a pod going not-ready, a slice deleted: each is seen.
            await server.post(path, json=endpoint_slice("d-1", "svc-decode", [("10.0.1.1", {"ready": True})]))
            await _until(lambda: set(pool.workers["decode"]) == {"10.0.1.1:50051"})
            cell_ports = [{"name": "grpc-1", "port": 50101}, {"name": "grpc-2", "port": 50102}]
            await server.post(path, json=endpoint_slice("c-1", "svc-cell", [("10.0.2.1", {"ready": True})],
                                                        ports=cell_ports))
            await _until(lambda: set(pool.workers["decode"]) == {"10.0.1.1:50051", "10.0.2.1:50101",
                                                                 "10.0.2.1:50102"})
            await server.delete(f"{path}/c-1")
            await _until(lambda: set(pool.workers["decode"]) == {"10.0.1.1:50051"})
            await server.post(path, json=endpoint_slice("p-2", "svc-prefill", [("10.0.0.2", {"ready": True})]))
            await _until(lambda: set(pool.workers["prefill"]) == {"10.0.0.1:50051", "10.0.0.2:50051"})
            await server.patch(f"{path}/p-1", json={"endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": False}}]},
                headers={"Content-Type": "application/merge-patch+json"})
            await _until(lambda: set(pool.workers["prefill"]) == {"10.0.0.2:50051"})
            await server.delete(f"{path}/p-2")
            await _until(lambda: set(pool.workers["prefill"]) == set())
        finally:
            await discovery.stop()
            await pool.stop()


@pytest.mark.cluster
async def test_watch_follows_endpointslices_on_a_real_cluster():
    """Needs KUBECONFIG: creates and deletes an EndpointSlice in the default namespace."""
    from kubernetes import config

    kubeconfig = os.environ.get("KUBECONFIG")
    api = k8s.DiscoveryV1Api(config.new_client_from_config(config_file=kubeconfig))
    service = f"baton-test-{uuid.uuid4().hex[:8]}"
    body = endpoint_slice(service, service, [("10.42.0.7", {"ready": True})], namespace="default")
    api.create_namespaced_endpoint_slice("default", body)
    pool = WorkerPool(("colocated",))
    discovery = KubernetesDiscovery("default", {"colocated": [service]}, kubeconfig=kubeconfig)
    try:
        await discovery.start(pool)
        await _until(lambda: set(pool.workers["colocated"]) == {"10.42.0.7:50051"}, timeout=30)
        api.delete_namespaced_endpoint_slice(service, "default")
        await _until(lambda: set(pool.workers["colocated"]) == set(), timeout=30)
    finally:
        await discovery.stop()
        await pool.stop()


def test_slices_of_other_services_are_ignored():
    mine = endpoint_slice("a", "svc", [("10.0.0.1", {"ready": True})])
    other = endpoint_slice("b", "other", [("10.0.0.2", {"ready": True})])
    assert service_addresses([mine, other], "svc") == {"10.0.0.1:50051"}
