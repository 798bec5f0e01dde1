"""What every child object shares: names, labels, owner references, pod plumbing.

All functions are pure: they read an `InferenceService` and return new dicts, copying
anything taken from the spec so the result can be changed without touching the spec.
"""

from __future__ import annotations

import copy

from baton.operator import crd
from baton.operator.config import OperatorConfig
from baton.operator.spec import InferenceService

MANAGED_BY = "baton-operator"
MODEL_DIR = "/models"
CONFIG_DIR = "/etc/baton"
GRPC_PORT = 50051
KV_PORT = 50052  # UCX listener of decode workers
KV_TCP_PORT = 50053  # KV TCP listener of decode workers (transport tcp or auto)
METRICS_PORT = 9090
ROUTER_PORT = 8000
SHUTDOWN_GRACE_SECONDS = 30
# The images run as this user (Dockerfile, Dockerfile.control); fsGroup makes the
# emptyDirs writable for it.
RUN_AS = 1000


def child_name(svc: InferenceService, component: str) -> str:
    """Name of the child for `component` (a role, "router" or "config")."""
    return f"{svc.name}-{component}"


def selector(svc: InferenceService, component: str) -> dict:
    """Labels that select a component's pods. Immutable in a Deployment: never change."""
    return {
        "app.kubernetes.io/name": "baton",
        "app.kubernetes.io/instance": svc.name,
        "app.kubernetes.io/component": component,
    }


def labels(svc: InferenceService, component: str) -> dict:
    return {**selector(svc, component), "app.kubernetes.io/part-of": "baton",
            "app.kubernetes.io/managed-by": MANAGED_BY}


def owner_reference(svc: InferenceService) -> dict:
    """Makes the InferenceService the controller of a child: deleting it deletes them."""
    return {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "name": svc.name, "uid": svc.uid,
            "controller": True, "blockOwnerDeletion": True}


def metadata(svc: InferenceService, component: str, name: str | None = None) -> dict:
    return {
        "name": name or child_name(svc, component),
        "namespace": svc.namespace,
        "labels": labels(svc, component),
        "ownerReferences": [owner_reference(svc)],
    }


def worker_image(svc: InferenceService, config: OperatorConfig) -> str:
    return svc.image or config.worker_image


def router_image(svc: InferenceService, config: OperatorConfig) -> str:
    return svc.router.image or config.control_image


def model_path(svc: InferenceService) -> str:
    """Where the model directory appears inside every pod (the --model argument)."""
    source = svc.model.source
    if source.kind == "pvc" and source.path:
        return f"{MODEL_DIR}/{source.path}"
    return MODEL_DIR


def model_volume(svc: InferenceService, source=None, name: str = "model") -> dict:
    """The volume holding the model (or `source`, a LoRA adapter's, as volume `name`)."""
    source = source or svc.model.source
    if source.kind == "pvc":
        return {"name": name,
                "persistentVolumeClaim": {"claimName": source.claim_name, "readOnly": True}}
    if source.kind == "hostPath":
        return {"name": name, "hostPath": {"path": source.host_path, "type": "Directory"}}
    empty: dict = {"sizeLimit": source.size_limit} if source.size_limit else {}
    return {"name": name, "emptyDir": empty}


def fetches(svc: InferenceService) -> bool:
    """Whether some pod fetches a uri source (the model's or a LoRA adapter's): the
    ConfigMap with the fetch script is needed then."""
    return svc.model.source.kind == "uri" or any(
        a.source.kind == "uri" for a in (svc.lora.adapters if svc.lora else ()))


def pod_security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security() -> dict:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}


def base_env() -> list[dict]:
    """Pod identity from the downward API, and caches on the writable /tmp."""
    def field(name: str, path: str) -> dict:
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}

    return [
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
        field("POD_IP", "status.podIP"),
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
    ]


def merge_env(ours: list[dict], theirs: list[dict]) -> list[dict]:
    """`ours` then the user's variables; a user variable replaces ours of the same name."""
    names = {item["name"] for item in theirs}
    return [item for item in ours if item["name"] not in names] + copy.deepcopy(theirs)


def fetch_container(svc: InferenceService, image: str, *, tokenizer_only: bool, source=None,
                    volume: str = "model", dest: str = MODEL_DIR, name: str = "fetch-model") -> dict:
    """Init container that downloads a uri source (the model's, or `source`: a LoRA
    adapter's) into the emptyDir `volume`, mounted at `dest`.

    It runs the fetch script the operator ships in the ConfigMap (operator/fetch_model.py),
    so the fetch logic matches the operator's version whatever image the pods run. It is
    idempotent: a restarted pod keeps its emptyDir and skips a finished download.
    """
    source = source or svc.model.source
    args = [f"{CONFIG_DIR}/fetch_model.py", "--uri", source.uri or "", "--dest", dest]
    if tokenizer_only:
        args.append("--tokenizer-only")
    env = base_env()
    if source.credentials:
        env.append({"name": "BATON_MODEL_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": source.credentials.name, "key": source.credentials.key}}})
    return {
        "name": name,
        "image": image,
        **pull_policy(svc),
        "command": ["python3"],
        "args": args,
        "env": env,
        "securityContext": container_security(),
        "volumeMounts": [
            {"name": volume, "mountPath": dest},
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def pull_policy(svc: InferenceService) -> dict:
    return {"imagePullPolicy": svc.image_pull_policy} if svc.image_pull_policy else {}


def model_volumes(svc: InferenceService) -> list[dict]:
    """The `model` volume, the writable `tmp`, and the ConfigMap for uri sources."""
    volumes = [model_volume(svc), {"name": "tmp", "emptyDir": {}}]
    if svc.model.source.kind == "uri":
        volumes.append({"name": "config",
                        "configMap": {"name": child_name(svc, "config"), "defaultMode": 0o555}})
    return volumes


def pod_placement(svc: InferenceService, placement) -> dict:
    """nodeSelector/tolerations/affinity/imagePullSecrets for a pod spec (copies)."""
    fields: dict = {}
    if placement.node_selector:
        fields["nodeSelector"] = dict(placement.node_selector)
    if placement.tolerations:
        fields["tolerations"] = copy.deepcopy(placement.tolerations)
    if placement.affinity:
        fields["affinity"] = copy.deepcopy(placement.affinity)
    if svc.image_pull_secrets:
        fields["imagePullSecrets"] = [{"name": name} for name in svc.image_pull_secrets]
    return fields


def spread(svc: InferenceService, component: str) -> list[dict]:
    """Prefer spreading a component's pods over nodes (soft: never blocks scheduling)."""
    return [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
             "whenUnsatisfiable": "ScheduleAnyway",
             "labelSelector": {"matchLabels": selector(svc, component)}}]


def rolling_update() -> dict:
    """Never drop below the desired ready count: a new pod is ready before an old one goes."""
    return {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
