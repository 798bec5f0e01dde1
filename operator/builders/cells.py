"""Cells (`spec.cells`): a Deployment of `baton serve-cell` pods and two headless Services.

One container per pod holds every engine of the cell and all its GPUs (`nvidia.com/gpu` =
engines × gpusPerEngine), so prefill engines map decode engines' KV pools by CUDA IPC.
Engine k (prefill engines first) listens on `ENGINE_PORT + k` (gRPC, port `grpc-<k>`) and
`ENGINE_METRICS_PORT + k` (/metrics, port `metrics-<k>`); the pod's probes ask the cell's
own gRPC health on `common.GRPC_PORT`, SERVING while every engine is. With `spec.lora`
the pod gets the adapters' volumes and fetches as a worker pod does (`lora.py`), and every
engine the `--enable-lora --lora-modules ...` flags.

`NAME-cell-prefill` and `NAME-cell-decode` list one port per engine of that side: the
router takes each as a worker and pools them with the fleets' (`--prefill-service`
repeated), and the chart's ServiceMonitor scrapes their `metrics-<k>` ports.
Flags follow the `baton serve-cell` contract in docs/operations.md.
"""

from __future__ import annotations

import shlex

from baton.operator.builders import common, lora
from baton.operator.builders.workers import (
    COMPILE_CACHE_DIR,
    COMPILE_CACHE_ENV,
    engine_args,
    engine_deployment,
    model_args,
    probes,
)
from baton.operator.config import OperatorConfig
from baton.operator.spec import InferenceService

COMPONENT = "cell"
ENGINE_PORT = 50100
ENGINE_METRICS_PORT = 9100
ENGINE_KV_PORT = 50200
ENGINE_KV_TCP_PORT = 50300


def engines(svc: InferenceService, side: str) -> range:
    """The engine indexes k of one side ("prefill" or "decode") in each cell."""
    cells = svc.cells
    return range(cells.prefill_engines) if side == "prefill" else range(cells.prefill_engines, cells.engines)


def cell_args(svc: InferenceService) -> list[str]:
    """Command-line flags of `baton serve-cell`: the cell's own, the model's and the LoRA
    adapters' (every engine: prefill and decode engines serve the same adapters), then
    each side's engine settings."""
    cells = svc.cells
    return [
        "--prefill", str(cells.prefill_engines),
        "--decode", str(cells.decode_engines),
        "--device", "cuda" if cells.gpus_per_engine else "cpu",
        "--host", "0.0.0.0",
        "--port", str(common.GRPC_PORT),
        "--engine-port", str(ENGINE_PORT),
        "--engine-metrics-port", str(ENGINE_METRICS_PORT),
        "--engine-kv-port", str(ENGINE_KV_PORT),
        "--engine-kv-tcp-port", str(ENGINE_KV_TCP_PORT),
        "--shutdown-grace-seconds", str(common.SHUTDOWN_GRACE_SECONDS),
        *model_args(svc),
        *lora.args(svc),
        "--prefill-args", shlex.join(engine_args(cells.prefill)),
        "--decode-args", shlex.join(engine_args(cells.decode)),
    ]


def _ports(svc: InferenceService) -> list[dict]:
    ports = [{"name": "health", "containerPort": common.GRPC_PORT, "protocol": "TCP"}]
    for k in range(svc.cells.engines):
        ports += [{"name": f"grpc-{k}", "containerPort": ENGINE_PORT + k, "protocol": "TCP"},
                  {"name": f"metrics-{k}", "containerPort": ENGINE_METRICS_PORT + k, "protocol": "TCP"}]
    return ports


def cell_container(svc: InferenceService, config: OperatorConfig) -> dict:
    cells = svc.cells
    resources = {section: dict(amounts) for section, amounts in cells.placement.resources.items()}
    if cells.gpus:
        resources.setdefault("limits", {})["nvidia.com/gpu"] = str(cells.gpus)
    container = {
        "name": COMPONENT,
        "image": common.worker_image(svc, config),
        **common.pull_policy(svc),
        "command": ["baton", "serve-cell"],
        "args": cell_args(svc),
        "ports": _ports(svc),
        "env": common.merge_env(common.base_env() + COMPILE_CACHE_ENV, cells.placement.env),
        **probes(),
        "securityContext": common.container_security(),
        "volumeMounts": [
            {"name": "model", "mountPath": common.MODEL_DIR, "readOnly": True},
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "compile-cache", "mountPath": COMPILE_CACHE_DIR},
            *lora.mounts(svc),
        ],
    }
    if resources:
        container["resources"] = resources
    return container


def cell_deployment(svc: InferenceService, config: OperatorConfig) -> dict:
    """The cells' Deployment (`NAME-cell`); no `spec.replicas` while cells autoscale."""
    cells = svc.cells
    annotations = {"prometheus.io/port": str(ENGINE_METRICS_PORT)}
    return engine_deployment(svc, COMPONENT, cell_container(svc, config), config, cells.placement,
                             cells.shm_size, None if cells.autoscaling else cells.replicas, annotations)


def service_name(svc: InferenceService, side: str) -> str:
    return common.child_name(svc, f"{COMPONENT}-{side}")


def cell_service(svc: InferenceService, side: str) -> dict:
    """Headless Service of one side's engines of every cell: a port `grpc-<k>` and
    `metrics-<k>` per engine k of that side."""
    ports = []
    for k in engines(svc, side):
        ports += [{"name": f"grpc-{k}", "port": ENGINE_PORT + k, "targetPort": f"grpc-{k}", "protocol": "TCP"},
                  {"name": f"metrics-{k}", "port": ENGINE_METRICS_PORT + k, "targetPort": f"metrics-{k}",
                   "protocol": "TCP"}]
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": common.metadata(svc, COMPONENT, service_name(svc, side)),
        "spec": {"clusterIP": "None", "selector": common.selector(svc, COMPONENT),
                 "ports": ports, "publishNotReadyAddresses": False},
    }
