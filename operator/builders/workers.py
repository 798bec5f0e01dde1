"""Prefill, decode and colocated worker fleets: one Deployment and one headless Service each.

Flags follow the worker command-line contract in docs/operations.md.
"""

from __future__ import annotations

from baton.operator.builders import common, kvtransfer, lora
from baton.operator.config import OperatorConfig
from baton.operator.spec import Engine, InferenceService, Role

COMMANDS = {"prefill": "serve-prefill", "decode": "serve-decode", "colocated": "serve-colocated"}
# A big model can take many minutes to load; the startup probe allows 30 before the
# liveness probe may restart the pod.
STARTUP_SECONDS = 1800


def _model_core(svc: InferenceService) -> list[str]:
    return ["--model", common.model_path(svc), "--served-model-name", svc.model.served_name,
            "--dtype", svc.model.dtype]


def _model_rest(svc: InferenceService) -> list[str]:
    args = []
    if svc.model.quantization:
        args += ["--quantization", svc.model.quantization]
    if svc.model.kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", svc.model.kv_cache_dtype]
    if svc.otlp_endpoint:
        args += ["--otlp-traces-endpoint", svc.otlp_endpoint]
    if svc.model.max_model_len:
        args += ["--max-model-len", str(svc.model.max_model_len)]
    return args


def _engine_core(engine: Engine) -> list[str]:
    return ["--block-size", str(engine.block_size),
            "--max-num-seqs", str(engine.max_num_seqs),
            "--max-num-batched-tokens", str(engine.max_num_batched_tokens),
            "--gpu-memory-utilization", f"{engine.gpu_memory_utilization:g}"]


def _engine_rest(engine: Engine) -> list[str]:
    args = []
    if not engine.enable_prefix_caching:
        args.append("--no-enable-prefix-caching")
    if engine.num_gpu_blocks_override:
        args += ["--num-gpu-blocks-override", str(engine.num_gpu_blocks_override)]
    if engine.kv_cache_memory_gb:
        args += ["--kv-cache-memory-gb", f"{engine.kv_cache_memory_gb:g}"]
    if engine.tensor_parallel_size > 1:
        args += ["--tensor-parallel-size", str(engine.tensor_parallel_size)]
    if engine.speculative_config:
        args += ["--speculative-config", engine.speculative_config]
    return args


def model_args(svc: InferenceService) -> list[str]:
    """Flags every engine of the service shares: the model, its KV layout, tracing."""
    return _model_core(svc) + _model_rest(svc)


def engine_args(engine: Engine) -> list[str]:
    """Flags of one role's engine settings (`spec.<role>.engine`), `extraArgs` last."""
    return _engine_core(engine) + _engine_rest(engine) + list(engine.extra_args)


def worker_args(svc: InferenceService, role: Role) -> list[str]:
    """Command-line flags of one worker role (after `baton serve-<role>`). The order is
    part of the pod template: changing it rolls every worker."""
    args = _model_core(svc) + _engine_core(role.engine) + [
        "--host", "0.0.0.0",
        "--port", str(common.GRPC_PORT),
        "--metrics-port", str(common.METRICS_PORT),
        "--shutdown-grace-seconds", str(common.SHUTDOWN_GRACE_SECONDS),
    ]
    if role.name != "colocated":
        args += ["--kv-transfer", svc.transport]
    return (args + _model_rest(svc) + _engine_rest(role.engine) + kvtransfer.args(svc, role) + lora.args(svc)
            + list(role.engine.extra_args))


def _ports(svc: InferenceService, role: Role) -> list[dict]:
    ports = [{"name": "grpc", "containerPort": common.GRPC_PORT, "protocol": "TCP"},
             {"name": "metrics", "containerPort": common.METRICS_PORT, "protocol": "TCP"}]
    ports += [{"name": name, "containerPort": port, "protocol": "TCP"}
              for name, port, _ in kvtransfer.listeners(svc, role)]
    return ports


def probes() -> dict:
    """gRPC probes against grpc.health.v1 on the worker port (empty service: the server)."""
    grpc = {"port": common.GRPC_PORT}
    return {
        "startupProbe": {"grpc": grpc, "periodSeconds": 10,
                         "failureThreshold": STARTUP_SECONDS // 10, "timeoutSeconds": 5},
        "readinessProbe": {"grpc": grpc, "periodSeconds": 5, "failureThreshold": 3,
                           "timeoutSeconds": 5},
        "livenessProbe": {"grpc": grpc, "periodSeconds": 10, "failureThreshold": 6,
                          "timeoutSeconds": 5},
    }


# Compiled kernels (Triton, TorchInductor) on a volume of their own: a restarted container
# loads them instead of compiling again before it is ready (the worker's warm-up compiles or
# loads every shape its traffic can reach). An emptyDir lives as long as the pod;
# spec.compileCache names a volume that outlives pods (a new pod of the same image loads).
COMPILE_CACHE_DIR = "/var/cache/baton/compile"
COMPILE_CACHE_ENV = [{"name": "TRITON_CACHE_DIR", "value": f"{COMPILE_CACHE_DIR}/triton"},
                     {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{COMPILE_CACHE_DIR}/inductor"}]


def worker_container(svc: InferenceService, role: Role, config: OperatorConfig) -> dict:
    security = common.container_security()
    added = kvtransfer.capabilities(svc, role)
    if added:
        security["capabilities"]["add"] = added
    container = {
        "name": role.name,
        "image": common.worker_image(svc, config),
        **common.pull_policy(svc),
        "command": ["baton", COMMANDS[role.name]],
        "args": worker_args(svc, role),
        "ports": _ports(svc, role),
        "env": common.merge_env(common.base_env() + kvtransfer.env(svc, role) + COMPILE_CACHE_ENV,
                                role.placement.env),
        **probes(),
        "securityContext": security,
        "volumeMounts": [
            {"name": "model", "mountPath": common.MODEL_DIR, "readOnly": True},
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "compile-cache", "mountPath": COMPILE_CACHE_DIR},
            *lora.mounts(svc),
        ],
    }
    resources = _with_gpus(kvtransfer.resources(svc, role), role)
    if resources:
        container["resources"] = resources
    return container


def _with_gpus(resources: dict, role: Role) -> dict:
    """`resources` with one GPU per tensor-parallel rank (the spec may name the same count)."""
    tp = role.engine.tensor_parallel_size
    if tp == 1:
        return resources
    merged = {section: dict(amounts) for section, amounts in resources.items()}
    merged.setdefault("limits", {})["nvidia.com/gpu"] = str(tp)
    if "requests" in merged:  # an extended resource's request must equal its limit
        merged["requests"]["nvidia.com/gpu"] = str(tp)
    return merged


def worker_deployment(svc: InferenceService, role_name: str, config: OperatorConfig) -> dict:
    """The Deployment of one worker role.

    `spec.replicas` is left out while the role autoscales: the HPA or KEDA owns it then,
    and writing it would fight them.
    """
    role = svc.role(role_name)
    annotations = {"prometheus.io/port": str(common.METRICS_PORT), **kvtransfer.annotations(svc, role)}
    return engine_deployment(svc, role.name, worker_container(svc, role, config), config, role.placement,
                             role.shm_size, None if role.autoscaling else role.replicas, annotations)


def engine_deployment(svc: InferenceService, component: str, container: dict, config: OperatorConfig,
                      placement, shm_size: str, replicas: int | None, annotations: dict) -> dict:
    """A Deployment of engine pods (a worker role's, or the cells'): `container` with the
    model, /dev/shm, /tmp and compile-cache volumes; `replicas` None leaves them to an
    autoscaler."""
    pod_spec = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": common.SHUTDOWN_GRACE_SECONDS + 15,
        "securityContext": common.pod_security(),
        **common.pod_placement(svc, placement),
        "topologySpreadConstraints": common.spread(svc, component),
        "containers": [container],
        "volumes": common.model_volumes(svc) + [
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}},
            {"name": "compile-cache", **(svc.compile_cache or {"emptyDir": {}})}] + lora.volumes(svc),
    }
    image = common.worker_image(svc, config)
    fetches = lora.fetch_containers(svc, image)
    if svc.model.source.kind == "uri":
        fetches.insert(0, common.fetch_container(svc, image, tokenizer_only=False))
    if fetches:
        pod_spec["initContainers"] = fetches
    spec = {
        "selector": {"matchLabels": common.selector(svc, component)},
        "strategy": common.rolling_update(),
        "revisionHistoryLimit": 5,
        "progressDeadlineSeconds": STARTUP_SECONDS,
        "template": {
            "metadata": {
                "labels": common.labels(svc, component),
                "annotations": {
                    "prometheus.io/scrape": "true",
                    "prometheus.io/path": "/metrics",
                    "kubectl.kubernetes.io/default-container": container["name"],
                    **annotations,
                },
            },
            "spec": pod_spec,
        },
    }
    if replicas is not None:
        spec = {"replicas": replicas, **spec}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": common.metadata(svc, component), "spec": spec}


def worker_service(svc: InferenceService, role_name: str) -> dict:
    """Headless Service: its EndpointSlices list the ready workers for the router."""
    role = svc.role(role_name)
    ports = [{"name": port["name"], "port": port["containerPort"], "targetPort": port["name"],
              "protocol": "TCP"} for port in _ports(svc, role)]
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": common.metadata(svc, role.name),
        "spec": {"clusterIP": "None", "selector": common.selector(svc, role.name),
                 "ports": ports, "publishNotReadyAddresses": False},
    }
