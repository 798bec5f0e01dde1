"""The handful of Kubernetes API calls the operator makes, on plain dicts.

A thin layer over the `kubernetes` client's DynamicClient (stable across client
versions, one code path for core, grouped and custom kinds). Objects go in and come out
as dicts; failures become `ApiError` with the HTTP status, or `KindNotServed` when the
cluster does not serve a kind at all (KEDA not installed).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from kubernetes import client as k8s_client
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import DynamicApiError, ResourceNotFoundError

MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    """The API server refused a call; `status` is the HTTP code (404, 409, 422, ...)."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


class KindNotServed(Exception):
    """The cluster serves no such apiVersion/kind (e.g. its CRD is not installed)."""


def _api_error(error: DynamicApiError) -> ApiError:
    message = error.summary() if hasattr(error, "summary") else str(error)
    return ApiError(int(error.status or 0), str(error.reason or ""), message)


class Kube:
    """Typed-by-convention access: every method takes apiVersion and kind.

    Thread-safe: kopf runs synchronous handlers on a thread pool, and API discovery,
    which the DynamicClient caches, is done under a lock.
    """

    def __init__(self, api_client: k8s_client.ApiClient, cache_file: str | None = None):
        self._api_client, self._cache_file = api_client, cache_file
        self._dynamic: DynamicClient | None = None
        self._resources: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    @property
    def _client(self) -> DynamicClient:
        # Created on first use: constructing it already talks to the API server, and
        # building the operator should not (it may run inside an event loop).
        with self._lock:
            if self._dynamic is None:
                self._dynamic = DynamicClient(self._api_client, cache_file=self._cache_file)
            return self._dynamic

    def _resource(self, api_version: str, kind: str) -> Any:
        key = (api_version, kind)
        client = self._client
        with self._lock:
            if key not in self._resources:
                try:
                    self._resources[key] = client.resources.get(
                        api_version=api_version, kind=kind)
                except ResourceNotFoundError:
                    raise KindNotServed(f"the cluster serves no {kind} in {api_version}") from None
            return self._resources[key]

    def served(self, api_version: str, kind: str) -> bool:
        """Whether the cluster serves this kind. Asks again after a negative answer."""
        try:
            self._resource(api_version, kind)
        except KindNotServed:
            return False
        return True

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        """The object, or None when it does not exist."""
        try:
            return self._client.get(self._resource(api_version, kind), name=name,
                                    namespace=namespace).to_dict()
        except DynamicApiError as error:
            if error.status == 404:
                return None
            raise _api_error(error) from None

    def list(self, api_version: str, kind: str, namespace: str | None,
             labels: Mapping[str, str] | None = None) -> list[dict]:
        """Objects in `namespace` (None: every namespace) carrying all `labels`."""
        selector = ",".join(f"{key}={value}" for key, value in (labels or {}).items()) or None
        try:
            result = self._client.get(self._resource(api_version, kind), namespace=namespace,
                                      label_selector=selector).to_dict()
        except DynamicApiError as error:
            raise _api_error(error) from None
        return list(result.get("items") or [])

    def create(self, obj: Mapping[str, Any]) -> dict:
        meta = obj["metadata"]
        try:
            return self._client.create(self._resource(obj["apiVersion"], obj["kind"]),
                                       body=dict(obj), namespace=meta.get("namespace")).to_dict()
        except DynamicApiError as error:
            raise _api_error(error) from None

    def patch(self, api_version: str, kind: str, namespace: str, name: str,
              patch: Mapping[str, Any], *, status: bool = False) -> dict:
        """JSON merge patch of the object, or of its status subresource."""
        resource = self._resource(api_version, kind)
        if status:
            resource = resource.subresources["status"]
        try:
            return self._client.patch(resource, body=dict(patch), name=name, namespace=namespace,
                                      content_type=MERGE_PATCH).to_dict()
        except DynamicApiError as error:
            raise _api_error(error) from None

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        """Delete in the background (dependents go too); absent objects are fine."""
        try:
            self._client.delete(self._resource(api_version, kind), name=name,
                                namespace=namespace, propagation_policy="Background")
        except DynamicApiError as error:
            if error.status != 404:
                raise _api_error(error) from None
