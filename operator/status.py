"""The InferenceService status, computed from the child Deployments: pure functions.

Each fleet (prefill and decode, or colocated, and router) gets a condition
(`PrefillReady`, `DecodeReady`, `ColocatedReady`, `RouterReady`) and `Ready` sums them up.
A disaggregated service also gets `KVTransferReady`, the live handoff health the
reconciler reads from the workers (`operator/kvhealth.py`); when it is False, so is Ready. A problem the
operator found while reconciling (a spec it cannot serve, a missing dependency) makes
`Ready` False with that problem's reason; only the next reconcile clears it. Reasons are
CamelCase and docs/operator.md says what to do about each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CONDITION_TYPES = {"prefill": "PrefillReady", "decode": "DecodeReady",
                   "colocated": "ColocatedReady", "cell": "CellsReady", "router": "RouterReady"}
# The spec field of a component, where it is not the component's name.
SPEC_FIELDS = {"cell": "cells"}
# Reasons of problems found while reconciling, kept in status until a reconcile clears them.
PROBLEM_REASONS = frozenset({"InvalidSpec", "IncompatibleRoles", "KedaNotInstalled",
                             "ModelClaimNotFound", "NameConflict", "ApplyFailed"})
KV_CONDITION = "KVTransferReady"


@dataclass(frozen=True)
class Problem:
    """Why the operator cannot serve the spec right now; `message` says what to do."""

    reason: str
    message: str


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool | None  # None: Unknown
    reason: str
    message: str


def fleet_condition(component: str, name: str, deployment: Mapping[str, Any] | None) -> Condition:
    """Readiness of one fleet from its Deployment (None: not created yet)."""
    kind = CONDITION_TYPES[component]
    if deployment is None:
        return Condition(kind, False, "NotCreated", f"Deployment {name} does not exist yet")
    desired = _desired(deployment)
    status = deployment.get("status") or {}
    ready = int(status.get("readyReplicas") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    pods = (f"kubectl describe pods -l app.kubernetes.io/instance="
            f"{deployment['metadata']['labels']['app.kubernetes.io/instance']},"
            f"app.kubernetes.io/component={component}")
    failure = conditions.get("ReplicaFailure")
    if failure and failure.get("status") == "True":
        return Condition(kind, False, "ReplicaFailure",
                         f"{name} cannot create pods: {failure.get('message', '')}")
    progress = conditions.get("Progressing")
    if progress and progress.get("status") == "False" and ready < desired:
        return Condition(kind, False, "ProgressDeadlineExceeded",
                         f"{name}: pods did not become ready in time; see `{pods}` (image pull, "
                         "GPU scheduling, model loading)")
    if desired == 0:
        return Condition(kind, False, "ScaledToZero",
                         f"{name} has 0 replicas: raise spec.{SPEC_FIELDS.get(component, component)}.replicas (or "
                         "autoscaling.minReplicas)")
    if ready == 0:
        return Condition(kind, False, "NoReplicasReady",
                         f"0/{desired} pods of {name} ready: starting, pulling the image, waiting "
                         f"for a node with the requested resources, or loading the model; see "
                         f"`{pods}`")
    if ready < desired:
        return Condition(kind, True, "PartiallyReady", f"{ready}/{desired} pods of {name} ready")
    if updated < desired:
        return Condition(kind, True, "RollingOut",
                         f"{updated}/{desired} pods of {name} run the current template")
    return Condition(kind, True, "AllReplicasReady", f"{ready}/{desired} pods of {name} ready")


def _desired(deployment: Mapping[str, Any]) -> int:
    replicas = (deployment.get("spec") or {}).get("replicas")
    return 1 if replicas is None else int(replicas)


def ready_condition(fleets: Sequence[Condition], problems: Sequence[Problem], url: str,
                    kv: Condition | None = None) -> Condition:
    if problems:
        return Condition("Ready", False, problems[0].reason,
                         "; ".join(problem.message for problem in problems))
    # With cells ready, a prefill or decode fleet scaled to zero is a choice (cells serve
    # both sides), not an outage.
    cells_up = any(c.type == CONDITION_TYPES["cell"] and c.status for c in fleets)
    down = [c for c in fleets if not c.status and not (cells_up and c.reason == "ScaledToZero")]
    if not down and kv is not None and kv.status is False:
        return Condition("Ready", False, "KVTransferNotReady", f"{kv.reason}: {kv.message}")
    if down:
        first = down[0]
        return Condition("Ready", False, first.type.removesuffix("Ready") + "NotReady",
                         f"{first.reason}: {first.message}")
    return Condition("Ready", True, "Serving", f"every fleet has ready pods; OpenAI API at {url}/v1")


def recorded_kv(status: Mapping[str, Any] | None) -> tuple[Condition, dict] | None:
    """The `KVTransferReady` condition and `kvTransfer` report the status holds, if any."""
    status = status or {}
    for c in status.get("conditions") or []:
        if c.get("type") == KV_CONDITION:
            state = {"True": True, "False": False}.get(c.get("status"))
            return (Condition(KV_CONDITION, state, c.get("reason", ""), c.get("message", "")),
                    dict(status.get("kvTransfer") or {}))
    return None


def recorded_problems(status: Mapping[str, Any] | None) -> list[Problem]:
    """The reconcile problem that the status holds in its Ready condition, if any."""
    for condition in (status or {}).get("conditions") or []:
        if condition.get("type") == "Ready" and condition.get("reason") in PROBLEM_REASONS:
            return [Problem(condition["reason"], condition.get("message", ""))]
    return []


def compute(*, components: Sequence[str], names: Mapping[str, str],
            deployments: Mapping[str, Mapping[str, Any] | None], problems: Sequence[Problem],
            url: str, previous: Mapping[str, Any] | None, generation: int | None,
            now: str, kv: tuple[Condition, dict] | None = None) -> dict:
    """The whole status object.

    `components` are the fleets this spec runs (e.g. prefill, decode, router), `names`
    their Deployment names, `previous` the current status (its conditions keep their
    lastTransitionTime while their status holds), `generation` the metadata.generation
    just reconciled (None keeps the previous observedGeneration), `kv` the
    `KVTransferReady` condition and the `kvTransfer` report (None: no KV moves).
    """
    previous = previous or {}
    fleets = [fleet_condition(c, names[c], deployments.get(c)) for c in components]
    ready = ready_condition(fleets, problems, url, kv[0] if kv else None)
    observed = generation if generation is not None else previous.get("observedGeneration")
    before = {c.get("type"): c for c in previous.get("conditions") or []}
    status: dict[str, Any] = {"url": url}
    if observed is not None:
        status["observedGeneration"] = observed
    for component in components:
        deployment = deployments.get(component)
        desired = _desired(deployment) if deployment else 0
        ready_pods = int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)
        status[component] = {"replicas": desired, "readyReplicas": ready_pods,
                             "ready": f"{ready_pods}/{desired}"}
    extra = []
    if kv is not None:
        extra = [kv[0]]
        status["kvTransfer"] = dict(kv[1])
    status["conditions"] = [_as_dict(c, before.get(c.type), observed, now)
                            for c in [ready, *fleets, *extra]]
    return status


def _as_dict(condition: Condition, before: Mapping[str, Any] | None, generation: int | None,
             now: str) -> dict:
    text = {True: "True", False: "False", None: "Unknown"}[condition.status]
    since = before.get("lastTransitionTime") if before and before.get("status") == text else None
    result = {"type": condition.type, "status": text, "reason": condition.reason,
              "message": condition.message, "lastTransitionTime": since or now}
    if generation is not None:
        result["observedGeneration"] = generation
    return result
