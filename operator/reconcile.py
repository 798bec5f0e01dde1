"""Bring an InferenceService's children in line with its spec, and report in its status.

`Reconciler.reconcile` is the one routine behind create, update, resume and the periodic
resync: parse the spec, check that prefill and decode can exchange KV (`compat`) and what
the cluster must provide, create or patch each child (only changed fields), delete
children the spec no longer asks for, read the workers' handoff health (`kvhealth`), then
write status. `Reconciler.refresh_status` recomputes status alone when a child Deployment
changes (keeping the last handoff health read).

Both read the object fresh and run under a per-object lock, so status is always written
from the latest state. A spec the operator cannot serve ends as `Ready=False` with a
reason (and an Event, posted by the caller from the returned outcome), never as an
exception; only transient API failures (5xx, timeouts) raise, for kopf to retry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from baton.operator import builders, compat, crd, diff, kvhealth, spec, status
from baton.operator.builders import common
from baton.operator.config import OperatorConfig
from baton.operator.kube import ApiError, KindNotServed, Kube
from baton.operator.status import Problem

# Kinds a spec change can make unnecessary, so they are swept after each apply. The
# router's ServiceAccount, Role and RoleBinding always exist while the service does.
PRUNABLE = (
    ("apps/v1", "Deployment"), ("v1", "Service"), ("policy/v1", "PodDisruptionBudget"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"), ("keda.sh/v1alpha1", "ScaledObject"),
    ("networking.k8s.io/v1", "NetworkPolicy"), ("v1", "ConfigMap"),
)


@dataclass
class Outcome:
    """What a reconcile found: problems (empty when serving) and whether Ready changed."""

    problems: list[Problem] = field(default_factory=list)
    ready: dict | None = None  # the Ready condition written, None if the object is gone
    ready_changed: bool = False
    uid: str = ""  # of the object reconciled: Events name it


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parsed(body: Mapping[str, Any]) -> spec.InferenceService | None:
    try:
        return spec.parse(body)
    except spec.SpecError:
        return None


def _owned(obj: Mapping[str, Any], uid: str) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


class Reconciler:
    """Holds the API access and settings; safe to call from several threads."""

    def __init__(self, kube: Kube, config: OperatorConfig, now: Callable[[], str] = _now):
        self.kube, self.config, self._now = kube, config, now
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()
        # (namespace, name) -> (monotonic time, per-pod handoff counts) of the last read.
        self._kv_reads: dict[tuple[str, str], tuple[float, dict[str, kvhealth.Counts]]] = {}

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def forget(self, namespace: str, name: str) -> None:
        """Drop the lock of a deleted object."""
        with self._guard:
            self._locks.pop((namespace, name), None)
            self._kv_reads.pop((namespace, name), None)

    def services(self) -> list[tuple[str, str]]:
        """(namespace, name) of every InferenceService the operator watches."""
        scopes = self.config.namespaces or (None,)
        return [(item["metadata"]["namespace"], item["metadata"]["name"])
                for scope in scopes for item in self.kube.list(crd.API_VERSION, crd.KIND, scope)]

    def _live(self, namespace: str, name: str) -> dict | None:
        """The InferenceService as stored now; None once it is gone or being deleted."""
        body = self.kube.get(crd.API_VERSION, crd.KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        return body

    def reconcile(self, namespace: str, name: str) -> Outcome:
        """Apply the spec to the children, sweep what it no longer asks for, write status."""
        with self._lock(namespace, name):
            body = self._live(namespace, name)
            if body is None:
                return Outcome()
            try:
                svc = spec.parse(body)
            except spec.SpecError as error:
                return self._write(body, None, [Problem("InvalidSpec", str(error))], True)
            problems = compat.problems(svc) or self._preflight(svc)
            if not problems:
                desired = builders.build_all(svc, self.config)
                problems = self._apply(svc, desired)
                if not problems:
                    self._prune(svc, desired)
            recorded = status.recorded_kv(body.get("status"))
            kv = recorded if problems else self._kv_health(svc, recorded)
            return self._write(body, svc, problems, True, kv)

    def refresh_status(self, namespace: str, name: str) -> Outcome:
        """Recompute status after a child changed; keeps the last reconcile's problems.

        A spec that does not parse is left alone: the reconcile has reported it.
        """
        with self._lock(namespace, name):
            body = self._live(namespace, name)
            svc = None if body is None else _parsed(body)
            if svc is None:
                return Outcome()
            problems = status.recorded_problems(body.get("status"))
            return self._write(body, svc, problems, False, status.recorded_kv(body.get("status")))

    def _preflight(self, svc: spec.InferenceService) -> list[Problem]:
        """What the cluster must provide before children are worth creating."""
        problems = []
        autoscaled = [role.name for role in svc.roles if role.autoscaling]
        if autoscaled and svc.autoscaling_engine == "keda" and not self.kube.served(
                "keda.sh/v1alpha1", "ScaledObject"):
            problems.append(Problem(
                "KedaNotInstalled",
                f"spec.autoscaling.engine is keda ({', '.join(autoscaled)} autoscale) but the "
                "cluster serves no keda.sh/v1alpha1 ScaledObject: install KEDA, or set "
                "spec.autoscaling.engine to hpa"))
        source = svc.model.source
        if source.kind == "pvc" and self.kube.get(
                "v1", "PersistentVolumeClaim", svc.namespace, source.claim_name) is None:
            problems.append(Problem(
                "ModelClaimNotFound",
                f"PersistentVolumeClaim {source.claim_name} (spec.model.source.pvc.claimName) "
                f"does not exist in namespace {svc.namespace}: create it with the model, or fix "
                "the name"))
        return problems

    def _apply(self, svc: spec.InferenceService, desired: list[dict]) -> list[Problem]:
        problems = []
        for obj in desired:
            try:
                problem = self._apply_one(svc, obj)
            except ApiError as error:
                if error.status >= 500 or error.status in (409, 429):
                    raise  # transient: kopf retries the handler
                problem = Problem("ApplyFailed", f"{obj['kind']} {obj['metadata']['name']} was "
                                  f"refused ({error.status} {error.reason}): {error.message}")
            except KindNotServed as error:
                problem = Problem("ApplyFailed", f"{obj['kind']} {obj['metadata']['name']}: "
                                  f"{error}")
            if problem:
                problems.append(problem)
        return problems

    def _apply_one(self, svc: spec.InferenceService, obj: dict) -> Problem | None:
        """Create `obj`, or patch the fields of the live object that differ from it."""
        meta = obj["metadata"]
        live = self.kube.get(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        if live is None:
            self.kube.create(diff.with_record(obj))
            return None
        if not _owned(live, svc.uid):
            return Problem("NameConflict", f"{obj['kind']} {meta['name']} already exists and "
                           f"is not controlled by InferenceService {svc.name}: delete or rename "
                           "it (or wait while a deleted InferenceService is cleaned up)")
        patch = diff.merge_patch(diff.with_record(obj), live, diff.recorded(live))
        if patch:
            self.kube.patch(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"],
                            patch)
        return None

    def _prune(self, svc: spec.InferenceService, desired: list[dict]) -> None:
        """Delete children of `svc` that the current spec no longer produces."""
        wanted = {(obj["apiVersion"], obj["kind"], obj["metadata"]["name"]) for obj in desired}
        labels = {"app.kubernetes.io/instance": svc.name,
                  "app.kubernetes.io/managed-by": common.MANAGED_BY}
        for api_version, kind in PRUNABLE:
            try:
                items = self.kube.list(api_version, kind, svc.namespace, labels)
            except KindNotServed:
                continue
            for item in items:
                name = item["metadata"]["name"]
                if (api_version, kind, name) not in wanted and _owned(item, svc.uid):
                    self.kube.delete(api_version, kind, svc.namespace, name)

    def _kv_health(self, svc: spec.InferenceService,
                   recorded: tuple[status.Condition, dict] | None
                   ) -> tuple[status.Condition, dict] | None:
        """`KVTransferReady` and the `kvTransfer` report from the prefill and decode pods'
        /metrics, over the time since the last read (None for colocated services);
        `recorded` is what the status holds now."""
        if svc.mode != "disaggregated":
            return None
        pods = []
        for component in svc.scaled:
            try:
                pods += self.kube.list("v1", "Pod", svc.namespace,
                                       common.selector(svc, component))
            except (ApiError, KindNotServed) as error:
                if isinstance(error, ApiError) and error.status >= 500:
                    raise
                return (status.Condition(status.KV_CONDITION, None, "NoMetrics",
                                         f"cannot list the worker pods: {error}"),
                        {"transport": svc.transport})
        urls = kvhealth.metrics_urls(pods)
        with ThreadPoolExecutor(max_workers=min(16, len(urls) or 1)) as pool:
            read = dict(zip(urls, pool.map(kvhealth.scrape, urls.values()), strict=True))
        counts = {pod: c for pod, c in read.items() if c is not None}
        key, now = (svc.namespace, svc.name), time.monotonic()
        with self._guard:
            before = self._kv_reads.get(key)
            self._kv_reads[key] = (now, counts)
        ever = kvhealth.window(counts, None)
        recent = kvhealth.window(counts, before[1] if before else None)
        return kvhealth.condition(recent, ever, svc.transport, len(counts),
                                  now - before[0] if before else None,
                                  recorded[0] if recorded else None, len(urls))

    def _write(self, body: dict, svc: spec.InferenceService | None,
               problems: list[Problem], reconciled: bool,
               kv: tuple[status.Condition, dict] | None = None) -> Outcome:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        components = self._components(body, svc)
        names = {c: f"{name}-{c}" for c in components}
        deployments = {c: self._deployment(namespace, names[c], meta.get("uid", ""))
                       for c in components}
        url = (f"http://{name}-router.{namespace}.svc.{self.config.cluster_domain}:"
               f"{common.ROUTER_PORT}")
        previous = body.get("status") or {}
        new = status.compute(
            components=components, names=names, deployments=deployments, problems=problems,
            url=url, previous=previous, now=self._now(),
            generation=meta.get("generation") if reconciled else None, kv=kv)
        patch = diff.merge_patch(new, previous, previous)
        if patch:
            try:
                self.kube.patch(crd.API_VERSION, crd.KIND, namespace, name,
                                {"status": patch}, status=True)
            except ApiError as error:
                if error.status == 404:
                    return Outcome()  # deleted meanwhile; its children go with it
                raise
        ready = new["conditions"][0]
        before = next((c for c in previous.get("conditions") or [] if c["type"] == "Ready"), {})
        changed = (before.get("status"), before.get("reason")) != (ready["status"],
                                                                    ready["reason"])
        return Outcome(problems=list(problems), ready=ready, ready_changed=changed,
                       uid=meta.get("uid", ""))

    @staticmethod
    def _components(body: Mapping[str, Any], svc: spec.InferenceService | None) -> list[str]:
        if svc is not None:
            return [*svc.scaled, "router"]
        mode = (body.get("spec") or {}).get("mode", "disaggregated")
        return [*spec.ROLES_BY_MODE.get(mode, ("prefill", "decode")), "router"]

    def _deployment(self, namespace: str, name: str, uid: str) -> dict | None:
        live = self.kube.get("apps/v1", "Deployment", namespace, name)
        return live if live is not None and _owned(live, uid) else None
