"""The router: Deployment, Service, and the RBAC that lets it read worker EndpointSlices.

Flags follow the router command-line contract in docs/operations.md: it discovers
workers through the EndpointSlices of the worker Services (`--discovery kubernetes`).
"""

from __future__ import annotations

import copy

from baton.operator.builders import common
from baton.operator.config import OperatorConfig
from baton.operator.spec import InferenceService

COMPONENT = "router"


def router_args(svc: InferenceService) -> list[str]:
    """Command-line flags of the router (after `baton serve-router`)."""
    args = [
        "--host", "0.0.0.0",
        "--port", str(common.ROUTER_PORT),
        "--model", common.model_path(svc),
        "--served-model-name", svc.model.served_name,
        "--discovery", "kubernetes",
        "--namespace", svc.namespace,
    ]
    if svc.mode == "colocated":
        args += ["--colocated-service", common.child_name(svc, "colocated")]
    else:
        args += ["--prefill-service", common.child_name(svc, "prefill"),
                 "--decode-service", common.child_name(svc, "decode")]
        if svc.cells:  # the cells' engines, pooled with the fleets'
            args += ["--prefill-service", common.child_name(svc, "cell-prefill"),
                     "--decode-service", common.child_name(svc, "cell-decode")]
    args += ["--routing-policy", svc.router.routing_policy,
             "--max-queue", str(svc.router.max_queue)]
    if svc.otlp_endpoint:
        args += ["--otlp-traces-endpoint", svc.otlp_endpoint]
    if svc.router.tool_call_parser:
        args += ["--tool-call-parser", svc.router.tool_call_parser, "--enable-auto-tool-choice"]
    if svc.router.trust_request_chat_template:
        args.append("--trust-request-chat-template")
    return args


def _container(svc: InferenceService, config: OperatorConfig) -> dict:
    env = common.base_env()
    if svc.router.api_key:
        env.append({"name": "BATON_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": svc.router.api_key.name, "key": svc.router.api_key.key}}})
    health = {"httpGet": {"path": "/health", "port": "http"}, "timeoutSeconds": 3}
    container = {
        "name": COMPONENT,
        "image": common.router_image(svc, config),
        **common.pull_policy(svc),
        "command": ["baton", "serve-router"],
        "args": router_args(svc),
        "ports": [{"name": "http", "containerPort": common.ROUTER_PORT, "protocol": "TCP"}],
        "env": common.merge_env(env, svc.router.placement.env),
        # Loading the tokenizer is quick; a minute of startup is plenty.
        "startupProbe": {**health, "periodSeconds": 2, "failureThreshold": 30},
        "readinessProbe": {**health, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**health, "periodSeconds": 10, "failureThreshold": 3},
        "securityContext": common.container_security(),
        "volumeMounts": [{"name": "model", "mountPath": common.MODEL_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }
    if svc.router.placement.resources:
        container["resources"] = copy.deepcopy(svc.router.placement.resources)
    return container


def router_deployment(svc: InferenceService, config: OperatorConfig) -> dict:
    """The router Deployment. It mounts the model directory for the tokenizer and chat
    template (a uri source fetches only those files)."""
    pod_spec = {
        "serviceAccountName": common.child_name(svc, COMPONENT),
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": common.SHUTDOWN_GRACE_SECONDS,
        "securityContext": common.pod_security(),
        **common.pod_placement(svc, svc.router.placement),
        "topologySpreadConstraints": common.spread(svc, COMPONENT),
        "containers": [_container(svc, config)],
        "volumes": common.model_volumes(svc),
    }
    if svc.model.source.kind == "uri":
        pod_spec["initContainers"] = [common.fetch_container(
            svc, common.router_image(svc, config), tokenizer_only=True)]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": common.metadata(svc, COMPONENT),
        "spec": {
            "replicas": svc.router.replicas,
            "selector": {"matchLabels": common.selector(svc, COMPONENT)},
            "strategy": common.rolling_update(),
            "revisionHistoryLimit": 5,
            "template": {
                "metadata": {"labels": common.labels(svc, COMPONENT), "annotations": {
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(common.ROUTER_PORT),
                    "prometheus.io/path": "/metrics"}},
                "spec": pod_spec,
            },
        },
    }


def router_service(svc: InferenceService) -> dict:
    """The entry point clients use: status.url points here."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": common.metadata(svc, COMPONENT),
        "spec": {
            "type": svc.router.service_type,
            "selector": common.selector(svc, COMPONENT),
            "ports": [{"name": "http", "port": common.ROUTER_PORT, "targetPort": "http",
                       "protocol": "TCP"}],
        },
    }


def router_service_account(svc: InferenceService) -> dict:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": common.metadata(svc, COMPONENT)}


def router_role(svc: InferenceService) -> dict:
    """Read-only access to EndpointSlices in the namespace, and nothing else."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": common.metadata(svc, COMPONENT),
        "rules": [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                   "verbs": ["get", "list", "watch"]}],
    }


def router_role_binding(svc: InferenceService) -> dict:
    name = common.child_name(svc, COMPONENT)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": common.metadata(svc, COMPONENT),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": svc.namespace}],
    }
