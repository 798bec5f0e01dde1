"""Where the workers are: static lists (flags) or Kubernetes EndpointSlices.

`kubernetes` discovery watches the EndpointSlices labelled
`kubernetes.io/service-name=<service>` for each worker Service in the namespace and keeps
the pool's address set equal to the ready endpoints on the port named `grpc` (the
operator's worker Services name it so; a slice with one port is taken as is). The watch
runs the synchronous `kubernetes` client on a thread and hands updates to the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping

from baton.router.workers import WorkerPool

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PORT_NAME = "grpc"


class Discovery(ABC):
    """Keeps a WorkerPool's addresses current. `start` runs on the event loop."""

    @abstractmethod
    async def start(self, pool: WorkerPool) -> None: ...

    async def stop(self) -> None:
        return None


class StaticDiscovery(Discovery):
    def __init__(self, addresses: Mapping[str, list[str]]):
        self.addresses = {role: list(a) for role, a in addresses.items()}

    async def start(self, pool: WorkerPool) -> None:
        for role, addresses in self.addresses.items():
            pool.set_addresses(role, addresses)


def _get(obj, name: str, default=None):
    """Read a field from a dict (camelCase) or a kubernetes client model (snake_case)."""
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    snake = "".join("_" + c.lower() if c.isupper() else c for c in name)
    return getattr(obj, snake, default)


def slice_addresses(endpoint_slice) -> set[str]:
    """The `host:port` of every ready endpoint of one EndpointSlice (dict or client model).

    Ready means `conditions.ready` is not false (Kubernetes: unset counts as ready);
    terminating endpoints are left out, so a draining worker gets no new work.
    """
    ports = _get(endpoint_slice, "ports") or []
    port = None
    for p in ports:
        if _get(p, "name") == PORT_NAME:
            port = _get(p, "port")
    if port is None and len(ports) == 1:
        port = _get(ports[0], "port")
    if port is None:
        return set()
    family = _get(endpoint_slice, "addressType", "IPv4")
    found = set()
    for endpoint in _get(endpoint_slice, "endpoints") or []:
        conditions = _get(endpoint, "conditions") or {}
        if _get(conditions, "ready") is False or _get(conditions, "terminating") is True:
            continue
        for address in _get(endpoint, "addresses") or []:
            host = f"[{address}]" if family == "IPv6" else address
            found.add(f"{host}:{port}")
    return found


def service_addresses(slices: Iterable) -> set[str]:
    """Union of the ready addresses of a Service's slices."""
    result: set[str] = set()
    for endpoint_slice in slices:
        result |= slice_addresses(endpoint_slice)
    return result


class KubernetesDiscovery(Discovery):
    """Watches EndpointSlices of one Service per role (role -> Service name)."""

    def __init__(self, namespace: str, services: Mapping[str, str]):
        self.namespace = namespace
        self.services = dict(services)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    async def start(self, pool: WorkerPool) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api = client.DiscoveryV1Api()
        loop = asyncio.get_running_loop()
        for role, service in self.services.items():
            thread = threading.Thread(target=self._watch, args=(api, loop, pool, role, service),
                                      name=f"watch-{role}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _watch(self, api, loop, pool: WorkerPool, role: str, service: str) -> None:
        from kubernetes import watch

        selector = f"{SERVICE_NAME_LABEL}={service}"
        slices: dict[str, object] = {}

        def publish() -> None:
            addresses = service_addresses(slices.values())
            loop.call_soon_threadsafe(pool.set_addresses, role, addresses)

        while not self._stop.is_set():
            try:
                listing = api.list_namespaced_endpoint_slice(self.namespace, label_selector=selector)
                slices = {s.metadata.name: s for s in listing.items}
                publish()
                stream = watch.Watch().stream(
                    api.list_namespaced_endpoint_slice, self.namespace, label_selector=selector,
                    resource_version=listing.metadata.resource_version, timeout_seconds=60)
                for event in stream:
                    if self._stop.is_set():
                        return
                    obj = event["object"]
                    if event["type"] == "DELETED":
                        slices.pop(obj.metadata.name, None)
                    else:
                        slices[obj.metadata.name] = obj
                    publish()
            except Exception as exc:  # API hiccup or an expired resourceVersion: list again
                log.warning("watching EndpointSlices of %s/%s failed: %s", self.namespace, service, exc)
                self._stop.wait(2.0)

    async def stop(self) -> None:
        self._stop.set()
