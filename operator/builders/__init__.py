"""Pure builders: one function per child object, from a parsed InferenceService to a dict.

`build_all` lists every child the spec asks for, in creation order. Builders never touch
the API and never change their inputs; tests call them without a cluster.
"""

from __future__ import annotations

from baton.operator.builders import autoscaling, cells, common, config_map, policy, router, workers
from baton.operator.config import OperatorConfig
from baton.operator.spec import InferenceService


def build_all(svc: InferenceService, config: OperatorConfig) -> list[dict]:
    """Every child object of `svc`, ordered so that what a pod needs exists before it."""
    objects: list[dict] = []
    if common.fetches(svc):
        objects.append(config_map.config_map(svc))
    objects += [router.router_service_account(svc), router.router_role(svc),
                router.router_role_binding(svc)]
    for name in svc.scaled:
        if name == cells.COMPONENT:
            objects += [cells.cell_service(svc, "prefill"), cells.cell_service(svc, "decode"),
                        cells.cell_deployment(svc, config)]
        else:
            objects += [workers.worker_service(svc, name), workers.worker_deployment(svc, name, config)]
        objects.append(policy.pdb(svc, name))
        scaling = svc.autoscaling_of(name)
        if scaling and svc.autoscaling_engine == "keda":
            objects.append(autoscaling.scaled_object(svc, name, config))
        elif scaling:
            objects.append(autoscaling.hpa(svc, name))
        if svc.network_policy:
            objects.append(policy.network_policy(svc, name))
    objects += [router.router_service(svc), router.router_deployment(svc, config),
                policy.pdb(svc, "router")]
    return objects
