"""Autoscalers for worker roles: an HPA on Pods metrics, or a KEDA ScaledObject.

Both read the workers' Prometheus gauges (`baton:<metric>`). The HPA gets them from the
custom metrics API, served by prometheus-adapter with the chart's rules, which rename
`baton:<metric>` to `baton_<metric>`. KEDA queries Prometheus itself.
"""

from __future__ import annotations

from baton.operator import quantity
from baton.operator.builders import common
from baton.operator.config import OperatorConfig
from baton.operator.spec import Autoscaling, InferenceService, Role

# Start workers quickly, retire them slowly: a worker costs minutes to load a model.
BEHAVIOR = {
    "scaleUp": {"stabilizationWindowSeconds": 0,
                "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}]},
    "scaleDown": {"stabilizationWindowSeconds": 300,
                  "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]},
}


def adapter_metric_name(metric: str) -> str:
    """Name of `baton:<metric>` in the custom metrics API (the chart's adapter rules)."""
    return f"baton_{metric}"


def _target(svc: InferenceService, role: Role) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "name": common.child_name(svc, role.name)}


def _scaled_role(svc: InferenceService, role_name: str) -> tuple[Role, Autoscaling]:
    role = svc.role(role_name)
    if role.autoscaling is None:
        raise ValueError(f"spec.{role_name} has no autoscaling block")
    return role, role.autoscaling


def hpa(svc: InferenceService, role_name: str) -> dict:
    """autoscaling/v2 HPA holding the per-pod average of the role's metric at the target."""
    role, scaling = _scaled_role(svc, role_name)
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": common.metadata(svc, role.name),
        "spec": {
            "scaleTargetRef": _target(svc, role),
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [{"type": "Pods", "pods": {
                "metric": {"name": adapter_metric_name(scaling.metric)},
                "target": {"type": "AverageValue",
                           "averageValue": quantity.canonical(scaling.target)},
            }}],
            "behavior": BEHAVIOR,
        },
    }


def prometheus_query(svc: InferenceService, role: Role) -> str:
    """Sum of the metric over the role's pods; KEDA divides by replicas (AverageValue).

    Series are matched by the `namespace` and `service` target labels, which the chart's
    ServiceMonitor puts on every scraped series. A role that may sleep (minReplicas 0)
    has no series of its own while asleep, so its query falls back (PromQL `or`) to the
    router's waiting requests: the first queued request wakes the fleet.
    """
    _, scaling = _scaled_role(svc, role.name)
    own = common.child_name(svc, role.name)
    query = f'sum(baton:{scaling.metric}{{namespace="{svc.namespace}",service="{own}"}})'
    if scaling.min_replicas == 0:
        router = common.child_name(svc, "router")
        query += (f' or sum(baton:num_requests_waiting{{namespace="{svc.namespace}",'
                  f'service="{router}"}})')
    return query


def scaled_object(svc: InferenceService, role_name: str, config: OperatorConfig) -> dict:
    """KEDA ScaledObject with a Prometheus trigger; can scale to zero (minReplicas 0)."""
    role, scaling = _scaled_role(svc, role_name)
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": common.metadata(svc, role.name),
        "spec": {
            "scaleTargetRef": _target(svc, role),
            "minReplicaCount": scaling.min_replicas,
            "maxReplicaCount": scaling.max_replicas,
            "pollingInterval": 15,
            "cooldownPeriod": 300,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": BEHAVIOR}},
            "triggers": [{
                "type": "prometheus",
                "metricType": "AverageValue",
                "metadata": {
                    "serverAddress": config.prometheus_url,
                    "query": prometheus_query(svc, role),
                    "threshold": f"{scaling.target:g}",
                },
            }],
        },
    }
