"""kopf handlers: thin wiring from events to the Reconciler, and Events from its outcome.

`register` puts every handler on a registry (not kopf's global one), so an operator can be
built, run, stopped and built again in one process, as the tests do.

Events are created through the operator's own API client, not `kopf.event`: kopf can post
only from inside its handlers, and the periodic resync, which sees most changes of a
running service (a fleet going down, handoffs failing), runs outside them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from baton.operator import crd
from baton.operator.builders.common import MANAGED_BY
from baton.operator.config import OperatorConfig
from baton.operator.kube import ApiError, Kube
from baton.operator.reconcile import Outcome, Reconciler

RETRY_SECONDS = 15
# An Event's message is at most this long (the API server's limit).
EVENT_MESSAGE_BYTES = 1024
# Not kopf's per-object logger: that one would also post these lines as Events.
log = logging.getLogger("baton.operator")


def event(ref: Mapping[str, Any], kind: str, reason: str, message: str, now: str) -> dict:
    """A core/v1 Event about the InferenceService `ref` (apiVersion, kind, metadata with
    name, namespace and uid)."""
    meta = ref["metadata"]
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": crd.API_VERSION, "kind": crd.KIND,
                           "name": meta["name"], "namespace": meta["namespace"],
                           "uid": meta.get("uid") or ""},
        "type": kind, "reason": reason,
        "message": message.encode()[:EVENT_MESSAGE_BYTES].decode(errors="ignore"),
        "source": {"component": MANAGED_BY},
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    }


def _post(kube: Kube, ref: Mapping[str, Any], outcome: Outcome) -> None:
    """An Event when Ready changes: Warning for a problem, Normal otherwise. Best effort:
    an Event the API refuses is logged, never raised."""
    ready = outcome.ready
    if ready is None or not outcome.ready_changed:
        return
    meta = ref["metadata"]
    # Failing handoffs are a problem of the running service, not a fleet still starting.
    warn = bool(outcome.problems) or ready["reason"] == "KVTransferNotReady"
    log.log(logging.WARNING if warn else logging.INFO, "%s/%s Ready=%s %s: %s",
            meta["namespace"], meta["name"], ready["status"], ready["reason"], ready["message"])
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        kube.create(event(ref, "Warning" if warn else "Normal", ready["reason"],
                          ready["message"], now))
    except ApiError as error:
        log.warning("%s/%s: Event %s not posted: %s", meta["namespace"], meta["name"],
                    ready["reason"], error)


def _owner(body: Mapping[str, Any]) -> dict | None:
    """The InferenceService controlling a child object, as a minimal object reference."""
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == crd.KIND and ref.get("apiVersion") == crd.API_VERSION:
            return {"apiVersion": crd.API_VERSION, "kind": crd.KIND,
                    "metadata": {"name": ref["name"], "uid": ref.get("uid"),
                                 "namespace": body["metadata"]["namespace"]}}
    return None


async def _resync(reconciler: Reconciler, interval: float, logger: logging.Logger) -> None:
    """Every `interval` seconds, reconcile every InferenceService.

    Repairs drift and retries services blocked on something outside their spec (a missing
    PVC, KEDA not installed yet). A no-op when nothing changed: nothing is written.
    """
    while True:
        await asyncio.sleep(interval)
        try:
            keys = await asyncio.to_thread(reconciler.services)
        except ApiError as error:
            logger.warning(f"resync: cannot list InferenceServices: {error}")
            continue
        for namespace, name in keys:
            try:
                outcome = await asyncio.to_thread(reconciler.reconcile, namespace, name)
                ref = {"apiVersion": crd.API_VERSION, "kind": crd.KIND,
                       "metadata": {"namespace": namespace, "name": name, "uid": outcome.uid}}
                await asyncio.to_thread(_post, reconciler.kube, ref, outcome)
            except ApiError as error:
                logger.warning(f"resync of {namespace}/{name} failed, next round retries: {error}")
            except Exception:  # a bug in one service's round must not end the resync
                logger.exception(f"resync of {namespace}/{name} failed, next round retries")


def connection_info(configuration: Any) -> kopf.ConnectionInfo:
    """kopf's credentials from the operator's own kubernetes client configuration.

    Called again by kopf on 401, so a rotated service-account token is picked up (the
    configuration's refresh hook re-reads it).
    """
    header = (configuration.get_api_key_with_prefix("BearerToken")
              or configuration.get_api_key_with_prefix("authorization") or "")
    scheme, _, token = header.partition(" ") if " " in header else ("", "", header)
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler,
             config: OperatorConfig, configuration: Any) -> None:
    """Register the operator's handlers on `registry`; `configuration` is the kubernetes
    client Configuration whose credentials kopf uses too."""
    resource = (crd.GROUP, crd.VERSION, crd.PLURAL)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # kopf's bookkeeping lives in baton.dev annotations, so the status schema stays
        # strict and holds only what the operator reports.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix=crd.GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=crd.GROUP, key="last-handled-configuration")
        # Events come from `_post` with actionable reasons; kopf adds only its failures.
        settings.posting.level = logging.WARNING

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        # The same credentials as the operator's own client, from one configuration.
        return connection_info(configuration)

    def reconcile(body: Mapping[str, Any], name: str, namespace: str,
                  logger: logging.Logger, **_: Any) -> None:
        try:
            outcome = reconciler.reconcile(namespace, name)
        except ApiError as error:
            raise kopf.TemporaryError(f"API call failed, retrying: {error}",
                                      delay=RETRY_SECONDS) from error
        _post(reconciler.kube, body, outcome)

    kopf.on.create(*resource, id="reconcile-create", registry=registry)(reconcile)
    kopf.on.update(*resource, id="reconcile-update", registry=registry)(reconcile)
    kopf.on.resume(*resource, id="reconcile-resume", registry=registry)(reconcile)

    @kopf.on.startup(registry=registry)
    async def start_resync(memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
        # One operator-wide loop rather than a kopf timer per object: kopf guards timers
        # with a finalizer, and deleting an InferenceService must never wait for the
        # operator to be running.
        memo.resync = asyncio.create_task(_resync(reconciler, config.resync_seconds, logger))

    @kopf.on.cleanup(registry=registry)
    async def stop_resync(memo: kopf.Memo, **_: Any) -> None:
        task = getattr(memo, "resync", None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @kopf.on.delete(*resource, id="forget", optional=True, registry=registry)
    def forget(name: str, namespace: str, **_: Any) -> None:
        # Children go with their owner through garbage collection; nothing to delete here.
        reconciler.forget(namespace, name)

    @kopf.on.event("apps", "v1", "deployments", id="child-deployment", registry=registry,
                   labels={"app.kubernetes.io/managed-by": MANAGED_BY})
    def child_changed(body: Mapping[str, Any], logger: logging.Logger, **_: Any) -> None:
        owner = _owner(body)
        if owner is None:
            return
        meta = owner["metadata"]
        try:
            outcome = reconciler.refresh_status(meta["namespace"], meta["name"])
        except ApiError as error:
            # The next event or resync writes the status; a lost update is not fatal.
            logger.warning(f"status of {meta['namespace']}/{meta['name']} not updated: {error}")
            return
        _post(reconciler.kube, owner, outcome)
