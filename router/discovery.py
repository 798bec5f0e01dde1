"""Where the workers are: static lists (flags) or Kubernetes EndpointSlices.

`kubernetes` discovery watches the EndpointSlices labelled
`kubernetes.io/service-name=<service>` for each worker Service in the namespace and keeps
the pool's address set equal to the ready endpoints on the port named `grpc` (the
operator's worker Services name it so; a slice with one port is taken as is), or on every
port named `grpc-<k>` (a cell's Service: one port per engine of the pod). The watch
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
    """The `host:port` of every ready endpoint of one EndpointSlice (dict or client model),
    on its `grpc` port, or on each `grpc-<k>` port (a cell's engines: several workers per
    endpoint).

    Ready means `conditions.ready` is not false (Kubernetes: unset counts as ready);
    terminating endpoints are left out, so a draining worker gets no new work.
    """
    ports = _get(endpoint_slice, "ports") or []
    named = [_get(p, "port") for p in ports if _is_grpc_port(_get(p, "name") or "")]
    if not named and len(ports) == 1:
        named = [_get(ports[0], "port")]
    if not named:
        return set()
    family = _get(endpoint_slice, "addressType", "IPv4")
    found = set()
    for endpoint in _get(endpoint_slice, "endpoints") or []:
        conditions = _get(endpoint, "conditions") or {}
        if _get(conditions, "ready") is False or _get(conditions, "terminating") is True:
            continue
        for address in _get(endpoint, "addresses") or []:
            host = f"[{address}]" if family == "IPv6" else address
            found |= {f"{host}:{port}" for port in named}
    return found


def _is_grpc_port(name: str) -> bool:
    return name == PORT_NAME or (name.startswith(PORT_NAME + "-") and name[len(PORT_NAME) + 1:].isdigit())


def service_addresses(slices: Iterable, service: str | None = None) -> set[str]:
    """Union of the ready addresses of a Service's slices (only the slices labelled with
    `service`, when given: the label selector is checked here too)."""
    result: set[str] = set()
    for endpoint_slice in slices:
        labels = _get(_get(endpoint_slice, "metadata"), "labels") or {}
        if service is None or labels.get(SERVICE_NAME_LABEL) == service:
            result |= slice_addresses(endpoint_slice)
    return result


class KubernetesDiscovery(Discovery):
    """Watches the EndpointSlices of each role's Services (role -> Service names); a role's
    workers are the union over its Services (a fleet's and a cell's)."""

    def __init__(self, namespace: str, services: Mapping[str, Iterable[str]], kubeconfig: str | None = None,
                 watch_seconds: int = 60):
        self.namespace = namespace
        self.services = {role: tuple(names) for role, names in services.items()}
        self._found: dict[str, dict[str, set[str]]] = {role: {} for role in self.services}
        self._found_lock = threading.Lock()
        self.kubeconfig = kubeconfig  # None: in-cluster, else $KUBECONFIG or ~/.kube/config
        # Each watch call ends after this long (then the slices are listed again); it also
        # bounds how long stop() waits for a quiet watch to notice.
        self.watch_seconds = watch_seconds
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _api(self):
        from kubernetes import client, config

        if self.kubeconfig is None:
            try:
                configuration = client.Configuration()
                config.load_incluster_config(client_configuration=configuration)
                return client.DiscoveryV1Api(client.ApiClient(configuration))
            except config.ConfigException:
                pass
        return client.DiscoveryV1Api(config.new_client_from_config(config_file=self.kubeconfig))

    async def start(self, pool: WorkerPool) -> None:
        api = self._api()
        loop = asyncio.get_running_loop()
        for role, services in self.services.items():
            for service in services:
                thread = threading.Thread(target=self._watch, args=(api, loop, pool, role, service),
                                          name=f"watch-{service}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _watch(self, api, loop, pool: WorkerPool, role: str, service: str) -> None:
        from kubernetes import watch

        selector = f"{SERVICE_NAME_LABEL}={service}"
        slices: dict[str, object] = {}

        def publish() -> None:
            with self._found_lock:
                self._found[role][service] = service_addresses(slices.values(), service)
                addresses = set().union(*self._found[role].values())
            loop.call_soon_threadsafe(pool.set_addresses, role, addresses)

        while not self._stop.is_set():
            try:
                listing = api.list_namespaced_endpoint_slice(self.namespace, label_selector=selector)
                slices = {s.metadata.name: s for s in listing.items}
                publish()
                stream = watch.Watch().stream(
                    api.list_namespaced_endpoint_slice, self.namespace, label_selector=selector,
                    resource_version=listing.metadata.resource_version,
                    timeout_seconds=self.watch_seconds, _request_timeout=(10, self.watch_seconds + 5))
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
                if self._stop.is_set():
                    return
                log.warning("watching EndpointSlices of %s/%s failed: %s", self.namespace, service, exc)
                self._stop.wait(2.0)

    async def stop(self) -> None:
        """Stop watching. A watch blocked on a quiet stream ends at its timeout; the threads
        are daemons, so a router shutting down waits for them only briefly."""
        self._stop.set()
        for thread in self._threads:
            await asyncio.to_thread(thread.join, 2.0)
