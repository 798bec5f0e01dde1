"""Disruption budgets for every fleet, and the optional NetworkPolicies for workers."""

from __future__ import annotations

from baton.operator.builders import common, kvtransfer
from baton.operator.spec import InferenceService


def pdb(svc: InferenceService, component: str) -> dict:
    """Voluntary disruptions (drains) take at most one pod of a component at a time."""
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": common.metadata(svc, component),
        "spec": {"maxUnavailable": 1,
                 "selector": {"matchLabels": common.selector(svc, component)}},
    }


def _from(svc: InferenceService, component: str, *ports: str) -> dict:
    return {"from": [{"podSelector": {"matchLabels": common.selector(svc, component)}}],
            "ports": [{"port": port, "protocol": "TCP"} for port in ports]}


def network_policy(svc: InferenceService, role_name: str) -> dict:
    """Ingress to a worker role: gRPC from the router, KV pushes from prefill to decode,
    and /metrics from anywhere (Prometheus may live in another namespace)."""
    rules = [_from(svc, "router", "grpc")]
    if role_name == "decode":
        listeners = kvtransfer.listeners(svc, svc.role("decode"))
        rules.append(_from(svc, "prefill", "grpc", *(name for name, _, _ in listeners)))
    rules.append({"ports": [{"port": "metrics", "protocol": "TCP"}]})
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": common.metadata(svc, role_name),
        "spec": {"podSelector": {"matchLabels": common.selector(svc, role_name)},
                 "policyTypes": ["Ingress"], "ingress": rules},
    }
