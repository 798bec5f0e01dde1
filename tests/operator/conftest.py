"""Shared fixtures for the operator tests: the CRD, an API server, a running operator.

`ApiServer` is KMock's KubernetesEmulator plus what a real API server does and the
operator relies on: uid, resourceVersion, generation and creationTimestamp; status
subresource semantics; the CRD's structural defaults; optimistic-concurrency failures of
JSON-patch `test` ops as 422; and garbage collection of dependents through
ownerReferences when their owner is deleted.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import pathlib
import sys
import threading
import uuid
from typing import Any

import jsonpatch
import kmock
import pytest
import yaml
from kmock._internal import apps, dicts, enums

from baton.operator import crd

# Test modules here share helpers (`from test_operator_kopf import service`).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
ROOT = pathlib.Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "baton.dev_inferenceservices.yaml"
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
# kopf needs the namespaces and CRD resources served to start (cluster-scoped: "!").
RESOURCES = {
    "v1/namespaces": ("Namespace!", {"status"}),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition!", {"status"}),
    "baton.dev/v1alpha1/inferenceservices": ("InferenceService", {"status"}),
    "apps/v1/deployments": ("Deployment", {"status", "scale"}),
    "v1/services": ("Service", {"status"}),
    "v1/configmaps": ("ConfigMap", set()),
    "v1/serviceaccounts": ("ServiceAccount", set()),
    "v1/persistentvolumeclaims": ("PersistentVolumeClaim", {"status"}),
    "v1/pods": ("Pod", {"status"}),
    "v1/events": ("Event", set()),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", {"status"}),
    "autoscaling/v2/horizontalpodautoscalers": ("HorizontalPodAutoscaler", {"status"}),
    "networking.k8s.io/v1/networkpolicies": ("NetworkPolicy", set()),
    "rbac.authorization.k8s.io/v1/roles": ("Role", set()),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", set()),
}
KEDA = {"keda.sh/v1alpha1/scaledobjects": ("ScaledObject", {"status"})}


class ApiServer(kmock.KubernetesEmulator):
    """A KMock Kubernetes emulator that behaves like an API server where it matters."""

    _counter = itertools.count(1000)

    def serve(self, resources: dict[str, tuple[str, set[str]]]) -> None:
        for key, (kind, subresources) in resources.items():
            self.resources[key] = kmock.ResourceInfo(
                kind=kind.rstrip("!"), singular=kind.rstrip("!").lower(),
                namespaced=not kind.endswith("!"), verbs=VERBS, subresources=subresources)

    async def _handle(self, request: Any) -> Any:
        if request.resource is None or request.action not in (
                enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE):
            return await super()._handle(request)
        async with self._lock:
            try:
                events = self._mutate(request)
            except kmock.KubernetesError as error:
                return await self._render_error(error)
            for resource, event in events:
                await self._buses[resource].put(event)
        # Serve the response from the stored state, skipping the emulator's own mutation.
        return await apps.RawHandler._handle(self, request)

    def install_keda(self) -> None:
        """Serve KEDA's ScaledObject, as installing KEDA's CRDs would."""
        self.serve(KEDA)

    # Test helpers: read the stored state, write through HTTP (so watchers see events).

    @staticmethod
    def _key(path: str) -> kmock.resource:
        parts = path.split("/")
        return kmock.resource("" if len(parts) == 2 else parts[0], *parts[-2:])

    def get_object(self, resource: str, namespace: str, name: str) -> dict | None:
        """The stored object ("apps/v1/deployments", ns, name), or None if absent."""
        key = (self._key(resource), namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            return None
        return copy.deepcopy(self._objects[key].raw)

    def names(self, resource: str, namespace: str) -> set[str]:
        kind = self._key(resource)
        return {name for (res, ns, name) in self._objects
                if res == kind and ns == namespace and not self._objects[res, ns, name].deleted}

    def writes(self, resource: str | None = None) -> list[Any]:
        """Requests that changed objects (create, patch, update, delete) so far."""
        kind = None if resource is None else self._key(resource)
        return [r for r in self._requests if r.action in (
            enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE)
            and (kind is None or r.resource == kind)]

    @staticmethod
    def path(resource: str, namespace: str, name: str | None = None,
             subresource: str | None = None) -> str:
        parts = resource.split("/")
        base = f"/api/{parts[0]}" if len(parts) == 2 else f"/apis/{parts[0]}/{parts[1]}"
        path = f"{base}/namespaces/{namespace}/{parts[-1]}"
        return path + (f"/{name}" if name else "") + (f"/{subresource}" if subresource else "")

    async def create(self, resource: str, obj: dict) -> dict:
        meta = obj["metadata"]
        response = await self.post(self.path(resource, meta["namespace"]), json=obj)
        assert response.status in (200, 201), await response.text()
        return await response.json()

    async def merge(self, resource: str, namespace: str, name: str, patch: dict,
                    subresource: str | None = None) -> dict:
        response = await self.patch(self.path(resource, namespace, name, subresource),
                                    json=patch,
                                    headers={"Content-Type": "application/merge-patch+json"})
        assert response.status == 200, await response.text()
        return await response.json()

    async def remove(self, resource: str, namespace: str, name: str) -> None:
        response = await self.delete(self.path(resource, namespace, name))
        assert response.status == 200, await response.text()

    async def _serve_list(self, request: Any) -> dict:
        # A real list carries its kind and apiVersion, and honours label selectors.
        result = dict(await super()._serve_list(request))
        resource = request.resource
        info = self.resources[resource]
        result["kind"] = f"{info.kind}List"
        result["apiVersion"] = f"{resource.group}/{resource.version}".lstrip("/")
        wanted = dict(term.split("=", 1) for term in
                      filter(None, (request.params.get("labelSelector") or "").split(",")))
        result["items"] = [item for item in result["items"] if wanted.items() <= (
            item.get("metadata", {}).get("labels") or {}).items()]
        return result

    def _next_version(self) -> str:
        return str(next(self._counter))

    def _mutate(self, request: Any) -> list[tuple[Any, dict]]:
        if request.action == enums.action.CREATE:
            return self._create(request)
        key = (request.resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        if request.action == enums.action.UPDATE:
            return self._update(request, key)
        obj = self._objects[key]
        if obj.get("metadata", {}).get("finalizers"):
            stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            obj.patch({"metadata": {"deletionTimestamp": stamp,
                                    "resourceVersion": self._next_version()}})
            return [(request.resource, {"type": "MODIFIED", "object": obj.raw})]
        return self._delete(key)

    def _create(self, request: Any) -> list[tuple[Any, dict]]:
        data = copy.deepcopy(request.data)
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            # The emulator's response lookup goes by the name in the request.
            request.data.setdefault("metadata", {})["name"] = meta["name"]
        meta.setdefault("namespace", request.namespace)
        key = (request.resource, meta.get("namespace"), meta["name"])
        if key in self._objects and not self._objects[key].deleted:
            raise kmock.KubernetesError(status=409, reason="AlreadyExists",
                                        message=f"{meta['name']} already exists")
        if request.resource.plural == crd.PLURAL:
            data = crd.apply_defaults(data, self.crd_schema)
            meta = data["metadata"]
        data.pop("status", None)  # status is written only through the status subresource
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next_version(), generation=1,
                    creationTimestamp=datetime.datetime.now(datetime.UTC).strftime(
                        "%Y-%m-%dT%H:%M:%SZ"))
        if key in self._objects:
            self._objects[key].create(data)
        else:
            self._objects[key] = data
        events = [(request.resource, {"type": "ADDED", "object": self._objects[key].raw})]
        # The garbage collector deletes dependents whose owner is gone, also those created
        # (by a slow controller) after their owner was deleted.
        owners = {ref.get("uid") for ref in meta.get("ownerReferences") or []}
        live = {obj.get("metadata", {}).get("uid") for obj in self._objects.values()
                if not obj.deleted}
        if owners and not owners & live:
            events += self._delete(key)
        return events

    def _update(self, request: Any, key: tuple) -> list[tuple[Any, dict]]:
        old = self._objects[key].raw
        try:
            if request.method == "PUT":
                new = copy.deepcopy(request.data)
            else:
                new = copy.deepcopy(dict(dicts.patch_dict(old, request.data)))
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(error)) from None
        if request.subresource == "status":
            new = {**copy.deepcopy(old), "status": new.get("status")}
        elif "status" in old:
            new["status"] = copy.deepcopy(old["status"])
        else:
            new.pop("status", None)
        if request.resource.plural == crd.PLURAL:
            new = crd.apply_defaults(new, self.crd_schema)
        meta = new.setdefault("metadata", {})
        for field in ("uid", "creationTimestamp", "generation", "resourceVersion"):
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
        if new == old:
            return []  # a no-op write changes nothing, as on a real API server
        if _spec_of(new) != _spec_of(old):
            meta["generation"] = old["metadata"].get("generation", 1) + 1
        meta["resourceVersion"] = self._next_version()
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._objects[key].patch(new)
            return self._delete(key)
        self._objects[key].history.append(new)
        return [(request.resource, {"type": "MODIFIED", "object": new})]

    def _delete(self, key: tuple) -> list[tuple[Any, dict]]:
        raw = self._objects[key].raw
        self._objects[key].delete()
        events = [(key[0], {"type": "DELETED", "object": raw})]
        uid = raw["metadata"].get("uid")
        for other in list(self._objects):  # garbage collection of dependents
            obj = self._objects[other]
            if obj.deleted:
                continue
            refs = obj.get("metadata", {}).get("ownerReferences") or []
            if any(ref.get("uid") == uid for ref in refs):
                events += self._delete(other)
        return events

    crd_schema: dict = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0][
        "schema"]["openAPIV3Schema"]


def _spec_of(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


@pytest.fixture
async def apiserver():
    """A running ApiServer serving the built-in kinds the operator uses (KEDA: not yet)."""
    async with ApiServer() as server, kmock.Server(server):
        server.serve(RESOURCES)
        yield server


@pytest.fixture
def kubeconfig(apiserver, tmp_path) -> pathlib.Path:
    """A kubeconfig file for the ApiServer."""
    url = str(apiserver.servers[0].url).rstrip("/")
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": url}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }))
    return path


@pytest.fixture
def wait():
    """`await wait(predicate, timeout)`: poll until predicate() is truthy, or fail."""
    return wait_for


async def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll `predicate` (sync) until it returns something truthy; fail after `timeout`.

    The timeout is generous because the suite runs on a loaded machine; a passing wait
    returns as soon as the predicate holds, so it costs nothing.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate.__doc__ or predicate}")
        await asyncio.sleep(interval)


class OperatorRunner:
    """Starts and stops the real operator: `baton.operator.main.run` in its own thread.

    A thread of its own, as in a real process: kopf cancels every task created after its
    start when it stops, which in the test's loop would include the test's own tasks.
    """

    def __init__(self, kubeconfig: str) -> None:
        self.kubeconfig = kubeconfig
        self.thread: threading.Thread | None = None
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None

    async def start(self, **settings: Any) -> None:
        from baton.operator.config import OperatorConfig
        from baton.operator.main import build, load_api_client, run

        config = OperatorConfig(health_port=0, kubeconfig=self.kubeconfig,
                                **{"resync_seconds": 30.0, **settings})
        registry, _ = build(config, load_api_client(config.kubeconfig))
        self.stop_flag, ready = threading.Event(), threading.Event()

        def main() -> None:
            try:
                asyncio.run(run(config, registry, stop_flag=self.stop_flag, ready_flag=ready))
            except BaseException as error:  # reported by stop()
                self.error = error

        self.thread = threading.Thread(target=main, name="operator", daemon=True)
        self.thread.start()
        await asyncio.to_thread(ready.wait, 30)
        assert ready.is_set(), f"the operator did not start: {self.error!r}"

    async def stop(self) -> None:
        if self.thread is None:
            return
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 60)  # a reconcile in flight finishes first
        assert not self.thread.is_alive(), "the operator did not stop"
        self.thread = None
        assert self.error is None, f"the operator failed: {self.error!r}"


@pytest.fixture
async def operator(kubeconfig):
    """The operator, started by `await operator.start(**settings)`; stopped at teardown."""
    runner = OperatorRunner(str(kubeconfig))
    yield runner
    await runner.stop()
