"""Autoscalers for worker roles: an HPA on Pods metrics, or a KEDA ScaledObject.

Both read the workers' Prometheus gauges (`baton:<metric>`). The HPA gets them from the
custom metrics API, served by prometheus-adapter with the chart's rules, which rename
`baton:<metric>` to `baton_<metric>`. KEDA queries Prometheus itself.
"""

from __future__ import annotations

from baton.operator import quantity
from baton.operator.builders import common
from baton.operator.config import OperatorConfig
from baton.operator.spec import Autoscaling, InferenceService

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


def _target(svc: InferenceService, component: str) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "name": common.child_name(svc, component)}


def _scaling(svc: InferenceService, component: str) -> Autoscaling:
    scaling = svc.autoscaling_of(component)
    if scaling is None:
        raise ValueError(f"spec.{'cells' if component == 'cell' else component} has no autoscaling block")
    return scaling


def hpa(svc: InferenceService, component: str) -> dict:
    """autoscaling/v2 HPA holding the per-pod average of the component's metric at the
    target (a role's, or the cells': a cell pod's value is the average of its engines',
    as the chart's adapter rules compute it per pod)."""
    scaling = _scaling(svc, component)
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": common.metadata(svc, component),
        "spec": {
            "scaleTargetRef": _target(svc, component),
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


def prometheus_query(svc: InferenceService, component: str) -> str:
    """Sum of the metric over the role's pods; KEDA divides by replicas (AverageValue).

    Series are matched by the `namespace` and `service` target labels, which the chart's
    ServiceMonitor puts on every scraped series. A role that may sleep (minReplicas 0)
    has no series of its own while asleep, so its query falls back (PromQL `or`) to the
    router's waiting requests: the first queued request wakes the fleet.
    """
    scaling = _scaling(svc, component)
    own = common.child_name(svc, component)
    if component == "cell":
        # A cell's engines are scraped through its two Services, one series per engine:
        # dividing by the engines per cell makes KEDA's per-replica average the per-engine
        # average, as the HPA's per-pod value (the adapter averages a pod's series).
        query = (f'sum(baton:{scaling.metric}{{namespace="{svc.namespace}",service=~"{own}-(prefill|decode)"}})'
                 f' / {svc.cells.engines}')
    else:
        query = f'sum(baton:{scaling.metric}{{namespace="{svc.namespace}",service="{own}"}})'
    if scaling.min_replicas == 0:
        router = common.child_name(svc, "router")
        query += (f' or sum(baton:num_requests_waiting{{namespace="{svc.namespace}",'
                  f'service="{router}"}})')
    return query


def scaled_object(svc: InferenceService, component: str, config: OperatorConfig) -> dict:
    """KEDA ScaledObject with a Prometheus trigger; can scale to zero (minReplicas 0)."""
    scaling = _scaling(svc, component)
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": common.metadata(svc, component),
        "spec": {
            "scaleTargetRef": _target(svc, component),
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
                    "query": prometheus_query(svc, component),
                    "threshold": f"{scaling.target:g}",
                },
            }],
        },
    }
