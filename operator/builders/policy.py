"""Disruption budgets for every fleet, and the optional NetworkPolicies for workers."""

from __future__ import annotations

from baton.operator.builders import cells, common, kvtransfer
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
    """Ingress to a worker role or the cells: gRPC from the router, KV pushes from every
    prefill engine (the prefill fleet's and the cells') to decode engines, and /metrics from
    anywhere (Prometheus may live in another namespace)."""
    senders = ["prefill", cells.COMPONENT] if svc.cells else ["prefill"]
    if role_name == cells.COMPONENT:
        engines = range(svc.cells.engines)
        rules = [_from(svc, "router", *(f"grpc-{k}" for k in engines))]
        decoders = cells.engines(svc, "decode")
        # KV listeners bind numbered ports, not named ones: the ticket carries the address.
        kv = [f"grpc-{k}" for k in decoders] + [cells.ENGINE_KV_PORT + k for k in decoders]
        kv += [cells.ENGINE_KV_TCP_PORT + k for k in decoders]
        rules += [_from(svc, sender, *kv) for sender in senders]
        rules.append({"ports": [{"port": f"metrics-{k}", "protocol": "TCP"} for k in engines]})
    else:
        rules = [_from(svc, "router", "grpc")]
        if role_name == "decode":
            listeners = kvtransfer.listeners(svc, svc.role("decode"))
            rules += [_from(svc, sender, "grpc", *(name for name, _, _ in listeners)) for sender in senders]
        rules.append({"ports": [{"port": "metrics", "protocol": "TCP"}]})
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": common.metadata(svc, role_name),
        "spec": {"podSelector": {"matchLabels": common.selector(svc, role_name)},
                 "policyTypes": ["Ingress"], "ingress": rules},
    }
