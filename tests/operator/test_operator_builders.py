"""Builders: every child for several specs, checked against the Kubernetes schemas and
against the worker/router command-line contract (docs/operations.md)."""

from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest

from baton.operator import builders, crd, spec
from baton.operator.builders import autoscaling, common, router
from baton.operator.config import OperatorConfig

CONFIG = OperatorConfig(worker_image="registry.example/baton:1", control_image="registry.example/ctl:1")
KUBERNETES_VERSIONS = ("1.27", "1.30", "1.33")
# KEDA's CRD is not among the Kubernetes schemas: the fields Baton sets, as KEDA documents
# them (triggers' metadata values are strings).
SCALED_OBJECT = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {"spec": {
        "type": "object", "additionalProperties": False,
        "required": ["scaleTargetRef", "triggers"],
        "properties": {
            "scaleTargetRef": {"type": "object", "required": ["name"],
                               "properties": {"name": {"type": "string"}}},
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "pollingInterval": {"type": "integer"}, "cooldownPeriod": {"type": "integer"},
            "advanced": {"type": "object"},
            "triggers": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["type", "metadata"],
                "properties": {"type": {"const": "prometheus"},
                               "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                               "metadata": {"type": "object", "required": [
                                   "serverAddress", "query", "threshold"],
                                   "additionalProperties": {"type": "string"}}}}},
        }}},
}


def body(name: str = "llama", **spec_fields) -> dict:
    return {"apiVersion": "baton.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": "models-ns", "uid": "uid-1",
                         "generation": 3},
            "spec": {"model": {"source": {"pvc": {"claimName": "models", "path": "llama"}}},
                     **spec_fields}}


GPU = {"limits": {"nvidia.com/gpu": 1, "memory": "64Gi"}, "requests": {"cpu": 4}}
SPECS = {
    "disaggregated": body(prefill={"replicas": 2, "resources": GPU},
                          decode={"replicas": 3, "resources": GPU}, kvTransfer={"transport": "ucx"}),
    "colocated": body(mode="colocated", model={"source": {"hostPath": "/data/m"}},
                      colocated={"replicas": 2, "engine": {"enablePrefixCaching": False}}),
    "hpa": body(prefill={"autoscaling": {"maxReplicas": 8}},
                decode={"autoscaling": {"minReplicas": 2, "maxReplicas": 9,
                                        "metric": "kv_cache_usage_perc", "target": 0.75}}),
    "keda": body(autoscaling={"engine": "keda"},
                 prefill={"autoscaling": {"minReplicas": 0, "maxReplicas": 4}}),
    "secured-uri": body(
        model={"source": {"uri": "hf://org/model@main", "credentialsSecretRef": {"name": "hf"},
                          "sizeLimit": "40Gi"}, "maxModelLen": 4096},
        router={"apiKeySecretRef": {"name": "keys"}, "serviceType": "LoadBalancer",
                "replicas": 2, "image": "registry.example/router:2"},
        networkPolicy={"enabled": True}, imagePullSecrets=[{"name": "pull"}],
        imagePullPolicy="Always", kvTransfer={"transport": "ucx"}),
    "rdma": body(
        prefill={"resources": GPU},
        decode={"resources": GPU, "env": [{"name": "UCX_NET_DEVICES", "value": "mlx5_1:1"}]},
        kvTransfer={"transport": "ucx",
                    "ucx": {"netDevices": ["mlx5_0:1"], "progressMode": "thread-polling"},
                    "rdma": {"resourceName": "rdma/ib", "count": 2,
                             "networks": ["net-ops/rdma-a", "rdma-b"]}},
        networkPolicy={"enabled": True}),
    "placement": body(prefill={
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
        "env": [{"name": "HOME", "value": "/scratch"}, {"name": "X", "value": "1"}],
        "engine": {"extraArgs": ["--enforce-eager"], "numGpuBlocksOverride": 512}}),
    "quantized-traced": body(
        model={"source": {"pvc": {"claimName": "models"}}, "quantization": "fp8",
               "kvCacheDtype": "fp8_e4m3"},
        tracing={"otlpEndpoint": "otel-collector.observability:4317"}),
    "colocated-tp": body(mode="colocated", colocated={
        "engine": {"tensorParallelSize": 4}, "resources": {"limits": {"memory": "64Gi"}, "requests": {"cpu": 8}}}),
    "speculative": body(decode={"engine": {"speculative": {
        "numSpeculativeTokens": 4, "promptLookupMax": 3, "disableByBatchSize": 16}}}),
    "colocated-draft": body(mode="colocated", colocated={"engine": {"speculative": {
        "method": "draft_model", "model": "/models/draft", "numSpeculativeTokens": 3}}}),
    "colocated-awq": body(mode="colocated", model={
        "source": {"hostPath": "/data/m"}, "quantization": "awq", "kvCacheDtype": "fp8"},
        tracing={"otlpEndpoint": "https://otlp.example:4317"}),
}


def build(name: str) -> list[dict]:
    return builders.build_all(spec.parse(copy.deepcopy(SPECS[name])), CONFIG)


def find(objects: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind} {name}: {len(matches)} found"
    return matches[0]


def container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("name", SPECS)
def test_every_child_validates_against_the_kubernetes_schemas(name):
    objects = build(name)
    for obj in objects:
        if obj["kind"] == "ScaledObject":
            jsonschema.validate(obj, SCALED_OBJECT)
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), "two children with one name"


@pytest.mark.parametrize("name", SPECS)
def test_children_are_owned_labelled_and_in_the_namespace(name):
    for obj in build(name):
        meta = obj["metadata"]
        assert meta["namespace"] == "models-ns"
        assert meta["ownerReferences"][0]["uid"] == "uid-1"
        assert meta["ownerReferences"][0]["controller"] is True
        assert meta["labels"]["app.kubernetes.io/instance"] == "llama"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "baton-operator"
        assert len(meta["name"]) <= 63


def test_builders_do_not_change_the_spec():
    svc = spec.parse(copy.deepcopy(SPECS["placement"]))
    snapshot = copy.deepcopy(svc)
    objects = builders.build_all(svc, CONFIG)
    for obj in objects:  # mutate every output: the spec must not see it
        obj["metadata"]["labels"]["x"] = "y"
        if obj["kind"] == "Deployment":
            pod = obj["spec"]["template"]["spec"]
            pod.get("tolerations", [{}])[0]["key"] = "changed"
            container(obj)["env"].append({"name": "Y"})
    assert svc == snapshot


def test_rdma_requests_the_device_pins_memory_and_keeps_ucx_off_tcp():
    objects = build("rdma")
    for role in ("prefill", "decode"):
        deployment = find(objects, "Deployment", f"llama-{role}")
        main = container(deployment)
        assert main["resources"]["limits"]["rdma/ib"] == "2"
        assert main["resources"]["requests"] == {"cpu": "4", "rdma/ib": "2"}
        assert main["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
        env = {e["name"]: e.get("value") for e in main["env"]}
        assert env["UCX_TLS"] == "rc,cuda_copy,sm,self"  # no tcp: no silent fallback
        assert main["args"][main["args"].index("--ucx-progress-mode") + 1] == "thread-polling"
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["k8s.v1.cni.cncf.io/networks"] == "net-ops/rdma-a,rdma-b"
    decode_env = {e["name"]: e.get("value") for e in container(
        find(objects, "Deployment", "llama-decode"))["env"]}
    assert decode_env["UCX_NET_DEVICES"] == "mlx5_1:1"  # the role's own env wins
    prefill_env = {e["name"]: e.get("value") for e in container(
        find(objects, "Deployment", "llama-prefill"))["env"]}
    assert prefill_env["UCX_NET_DEVICES"] == "mlx5_0:1"
    router = container(find(objects, "Deployment", "llama-router"))
    assert "add" not in router["securityContext"]["capabilities"]
    assert not any(e["name"].startswith("UCX_") for e in router["env"])


def test_ucx_settings_without_rdma_leave_the_pod_alone():
    svc = spec.parse(body(kvTransfer={"transport": "ucx", "ucx": {"tls": ["tcp", "cuda_copy"]}}))
    main = container(find(builders.build_all(svc, CONFIG), "Deployment", "llama-decode"))
    assert {"name": "UCX_TLS", "value": "tcp,cuda_copy"} in main["env"]
    assert "add" not in main["securityContext"]["capabilities"] and "resources" not in main
    assert not any(e["name"].startswith("UCX_") for e in container(find(
        build("disaggregated"), "Deployment", "llama-decode"))["env"])
    with pytest.raises(spec.SpecError, match="kvTransfer.rdma needs kvTransfer.transport ucx or auto"):
        spec.parse(body(kvTransfer={"transport": "tcp", "rdma": {}}))


def test_disaggregated_worker_command_lines_follow_the_contract():
    objects = build("disaggregated")
    prefill = container(find(objects, "Deployment", "llama-prefill"))
    decode = container(find(objects, "Deployment", "llama-decode"))
    assert prefill["command"] == ["baton", "serve-prefill"]
    assert decode["command"] == ["baton", "serve-decode"]
    args = dict(zip(prefill["args"][::2], prefill["args"][1::2], strict=False))
    assert args["--model"] == "/models/llama"
    assert args["--served-model-name"] == "llama"
    assert args["--kv-transfer"] == "ucx" and args["--port"] == "50051"
    assert "--kv-port" not in prefill["args"]
    assert decode["args"][decode["args"].index("--kv-port") + 1] == "50052"
    assert {p["name"] for p in decode["ports"]} == {"grpc", "metrics", "kv"}
    assert prefill["image"] == "registry.example/baton:1"


def test_worker_pods_probe_grpc_and_run_hardened():
    deployment = find(build("disaggregated"), "Deployment", "llama-decode")
    pod = deployment["spec"]["template"]["spec"]
    main = container(deployment)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["grpc"] == {"port": common.GRPC_PORT}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    cache = next(m for m in main["volumeMounts"] if m["name"] == "compile-cache")
    assert {"name": "compile-cache", "emptyDir": {}} in pod["volumes"]
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["TRITON_CACHE_DIR"].startswith(cache["mountPath"])
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(cache["mountPath"])
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "shm", "mountPath": "/dev/shm"} in main["volumeMounts"]
    model = next(v for v in pod["volumes"] if v["name"] == "model")
    assert model["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert deployment["spec"]["replicas"] == 3
    assert main["resources"]["limits"] == {"nvidia.com/gpu": "1", "memory": "64Gi"}


def test_worker_services_are_headless():
    objects = build("colocated")
    assert find(objects, "Service", "llama-colocated")["spec"]["clusterIP"] == "None"
    assert find(objects, "Service", "llama-router")["spec"].get("clusterIP") is None


def test_the_old_spelling_worker_builds_the_same_colocated_fleet():
    """A CR written with `spec.worker` (before the role was named colocated) keeps working."""
    old = copy.deepcopy(SPECS["colocated"])
    old["spec"]["worker"] = old["spec"].pop("colocated")
    assert builders.build_all(spec.parse(old), CONFIG) == build("colocated")


def test_router_tool_call_parser_enables_auto_tool_choice():
    from baton.router.config import parse as parse_router
    from baton.router.tool_parsers import PARSERS

    assert set(crd.node("spec", "router", "toolCallParser")["enum"]) == set(PARSERS)
    for parser in (None, "hermes"):
        fields = copy.deepcopy(SPECS["colocated"])
        if parser:
            fields["spec"]["router"] = {"toolCallParser": parser}
        objects = builders.build_all(spec.parse(fields), CONFIG)
        config = parse_router(container(find(objects, "Deployment", "llama-router"))["args"])
        assert config.tool_call_parser == parser and config.enable_auto_tool_choice is bool(parser)


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_the_compile_cache_outlives_pods_on_the_volume_the_spec_names(mode):
    for source, volume in [
            ({"pvc": {"claimName": "kernels"}}, {"persistentVolumeClaim": {"claimName": "kernels"}}),
            ({"hostPath": "/var/cache/baton"}, {"hostPath": {"path": "/var/cache/baton",
                                                            "type": "DirectoryOrCreate"}})]:
        fields = copy.deepcopy(SPECS[mode])
        fields["spec"]["compileCache"] = source
        deployments = [o for o in builders.build_all(spec.parse(fields), CONFIG) if o["kind"] == "Deployment"
                       and any(m["name"] == "compile-cache" for m in container(o).get("volumeMounts", []))]
        assert deployments  # every engine pod mounts it
        for deployment in deployments:
            assert {"name": "compile-cache", **volume} in deployment["spec"]["template"]["spec"]["volumes"]
    fields = copy.deepcopy(SPECS[mode])
    fields["spec"]["compileCache"] = {"pvc": {"claimName": "c"}, "hostPath": "/c"}
    with pytest.raises(spec.SpecError, match="at most one of spec.compileCache"):
        spec.parse(fields)


def test_router_trusts_request_chat_templates_only_when_the_spec_says_so():
    from baton.router.config import parse as parse_router

    for trust in (None, False, True):
        fields = copy.deepcopy(SPECS["colocated"])
        if trust is not None:
            fields["spec"]["router"] = {"trustRequestChatTemplate": trust}
        objects = builders.build_all(spec.parse(fields), CONFIG)
        config = parse_router(container(find(objects, "Deployment", "llama-router"))["args"])
        assert config.trust_request_chat_template is bool(trust)


def test_router_discovers_workers_through_endpointslices():
    objects = build("disaggregated")
    main = container(find(objects, "Deployment", "llama-router"))
    assert main["command"] == ["baton", "serve-router"]
    assert router.router_args(spec.parse(copy.deepcopy(SPECS["disaggregated"]))) == [
        "--host", "0.0.0.0", "--port", "8000", "--model", "/models/llama",
        "--served-model-name", "llama", "--discovery", "kubernetes", "--namespace", "models-ns",
        "--prefill-service", "llama-prefill", "--decode-service", "llama-decode",
        "--routing-policy", "load", "--max-queue", "64"]
    assert main["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert main["image"] == "registry.example/ctl:1"
    role = find(objects, "Role", "llama-router")
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]
    binding = find(objects, "RoleBinding", "llama-router")
    assert binding["subjects"][0]["name"] == "llama-router"
    pod = find(objects, "Deployment", "llama-router")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "llama-router"
    colocated = container(find(build("colocated"), "Deployment", "llama-router"))["args"]
    assert colocated[colocated.index("--colocated-service") + 1] == "llama-colocated"
    assert "--prefill-service" not in colocated


def test_api_key_comes_from_the_secret_and_uri_models_are_fetched():
    objects = build("secured-uri")
    deployment = find(objects, "Deployment", "llama-router")
    env = {e["name"]: e for e in container(deployment)["env"]}
    assert env["BATON_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "keys", "key": "api-key"}}
    assert container(deployment)["image"] == "registry.example/router:2"
    fetch = deployment["spec"]["template"]["spec"]["initContainers"][0]
    assert "--tokenizer-only" in fetch["args"]
    worker_pod = find(objects, "Deployment", "llama-prefill")["spec"]["template"]["spec"]
    worker_fetch = worker_pod["initContainers"][0]
    assert worker_fetch["args"][worker_fetch["args"].index("--uri") + 1] == "hf://org/model@main"
    assert "--tokenizer-only" not in worker_fetch["args"]
    assert {"name": "BATON_MODEL_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "hf", "key": "token"}}} in worker_fetch["env"]
    model = next(v for v in worker_pod["volumes"] if v["name"] == "model")
    assert model == {"name": "model", "emptyDir": {"sizeLimit": "40Gi"}}
    config_map = find(objects, "ConfigMap", "llama-config")
    assert "def fetch(" in config_map["data"]["fetch_model.py"]
    assert worker_pod["imagePullSecrets"] == [{"name": "pull"}]
    assert container(find(objects, "Deployment", "llama-prefill"))["args"][-2:] == [
        "--max-model-len", "4096"]


def test_network_policies_admit_router_to_workers_and_prefill_to_decode():
    objects = build("secured-uri")
    decode = find(objects, "NetworkPolicy", "llama-decode")["spec"]
    sources = {rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]:
               [p["port"] for p in rule["ports"]] for rule in decode["ingress"] if "from" in rule}
    assert sources == {"router": ["grpc"], "prefill": ["grpc", "kv"]}
    prefill = find(objects, "NetworkPolicy", "llama-prefill")["spec"]
    assert [r["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
            for r in prefill["ingress"] if "from" in r] == ["router"]
    assert not [o for o in build("disaggregated") if o["kind"] == "NetworkPolicy"]


def test_autoscaled_roles_get_an_hpa_and_no_replicas():
    objects = build("hpa")
    decode = find(objects, "HorizontalPodAutoscaler", "llama-decode")["spec"]
    assert decode["minReplicas"] == 2 and decode["maxReplicas"] == 9
    assert decode["metrics"][0]["pods"] == {
        "metric": {"name": "baton_kv_cache_usage_perc"},
        "target": {"type": "AverageValue", "averageValue": "750m"}}
    prefill_hpa = find(objects, "HorizontalPodAutoscaler", "llama-prefill")["spec"]
    assert prefill_hpa["metrics"][0]["pods"]["target"]["averageValue"] == "4"
    for name in ("llama-prefill", "llama-decode"):
        assert "replicas" not in find(objects, "Deployment", name)["spec"]
    assert find(objects, "Deployment", "llama-router")["spec"]["replicas"] == 1


def test_keda_scaled_object_queries_prometheus_and_wakes_from_zero():
    objects = build("keda")
    scaled = find(objects, "ScaledObject", "llama-prefill")["spec"]
    assert scaled["minReplicaCount"] == 0
    trigger = scaled["triggers"][0]["metadata"]
    assert trigger["serverAddress"] == CONFIG.prometheus_url
    assert trigger["threshold"] == "4"
    assert trigger["query"] == (
        'sum(baton:num_requests_waiting{namespace="models-ns",service="llama-prefill"}) or '
        'sum(baton:num_requests_waiting{namespace="models-ns",service="llama-router"})')
    assert not [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    assert autoscaling.adapter_metric_name("num_requests_waiting") == "baton_num_requests_waiting"


def test_user_env_overrides_the_defaults_and_extra_args_come_last():
    main = container(find(build("placement"), "Deployment", "llama-prefill"))
    names = [e["name"] for e in main["env"]]
    assert names.count("HOME") == 1
    assert {"name": "HOME", "value": "/scratch"} in main["env"]
    assert main["args"][-1] == "--enforce-eager"
    assert "--num-gpu-blocks-override" in main["args"]


@pytest.mark.parametrize("transport, listeners", [
    ("grpc", {}), ("ucx", {"kv": 50052}), ("tcp", {"kv-tcp": 50053}),
    ("auto", {"kv": 50052, "kv-tcp": 50053})])
def test_decode_workers_open_the_kv_listeners_of_their_transport(transport, listeners):
    """Ports, flags, Service ports and the NetworkPolicy agree on each KV listener."""
    objects = builders.build_all(spec.parse(body(kvTransfer={"transport": transport},
                                                 networkPolicy={"enabled": True})), CONFIG)
    decode = container(find(objects, "Deployment", "llama-decode"))
    ports = {p["name"]: p["containerPort"] for p in decode["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9090, **listeners}
    flags = {"kv": "--kv-port", "kv-tcp": "--kv-tcp-port"}
    for name, port in listeners.items():
        assert decode["args"][decode["args"].index(flags[name]) + 1] == str(port)
    assert decode["args"][decode["args"].index("--kv-transfer") + 1] == transport
    service = find(objects, "Service", "llama-decode")["spec"]["ports"]
    assert {p["name"] for p in service} == set(ports)
    policy = find(objects, "NetworkPolicy", "llama-decode")["spec"]["ingress"]
    from_prefill = next(rule for rule in policy if "from" in rule and rule["from"][0][
        "podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "prefill")
    assert [p["port"] for p in from_prefill["ports"]] == ["grpc", *listeners]
    prefill = container(find(objects, "Deployment", "llama-prefill"))
    assert {p["name"] for p in prefill["ports"]} == {"grpc", "metrics"}


@pytest.mark.parametrize("name", ["quantized-traced", "colocated-awq", "disaggregated"])
def test_quantization_kv_dtype_and_tracing_reach_every_process(name):
    """The flags the operator writes parse with the workers' and the router's own parsers,
    and say what the spec says: one quantization and KV cache dtype for every worker role,
    the traces endpoint on the router and every worker; nothing of it when left out."""
    from baton.router.config import build_parser as router_parser
    from baton.worker.flags import parse as parse_worker

    fields = SPECS[name]["spec"]
    model, endpoint = fields["model"], fields.get("tracing", {}).get("otlpEndpoint")
    objects = build(name)
    roles = ["colocated"] if fields.get("mode") == "colocated" else ["prefill", "decode"]
    for role in roles:
        main = container(find(objects, "Deployment", f"llama-{role}"))
        engine, options = parse_worker(main["args"], f"baton {main['command'][1]}", role)
        assert engine.quantization == model.get("quantization")
        # fp8_e4m3 is written as fp8: the workers read both as e4m3.
        assert engine.kv_cache_dtype == {"fp8_e4m3": "fp8"}.get(
            model.get("kvCacheDtype", "auto"), model.get("kvCacheDtype", "auto"))
        assert options.otlp_traces_endpoint == endpoint
        assert ("--kv-cache-dtype" in main["args"]) is (engine.kv_cache_dtype != "auto")
    router_args = container(find(objects, "Deployment", "llama-router"))["args"]
    assert router_parser().parse_args(router_args).otlp_traces_endpoint == endpoint
    assert ("--otlp-traces-endpoint" in router_args) is (endpoint is not None)


@pytest.mark.parametrize("name, role, expected", [
    ("speculative", "decode", {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
                               "disable_by_batch_size": 16}),
    ("speculative", "prefill", None),
    ("colocated-draft", "colocated", {"method": "draft_model", "model": "/models/draft",
                                      "num_speculative_tokens": 3}),
])
def test_speculative_decoding_reaches_the_workers_it_is_set_on(name, role, expected):
    """engine.speculative becomes --speculative-config, which the worker's own parser and
    the engine's speculative config read back as the spec said."""
    from baton.engine.spec_decode.config import parse_speculative
    from baton.worker.flags import parse as parse_worker

    main = container(find(build(name), "Deployment", f"llama-{role}"))
    engine, _ = parse_worker(main["args"], f"baton {main['command'][1]}", role)
    if expected is None:
        assert engine.speculative_config is None
    else:
        assert parse_speculative(engine.speculative_config) == parse_speculative(expected)


def test_the_crd_offers_what_the_workers_accept():
    from baton.engine.quantization.schemes import KV_CACHE_DTYPES, METHOD_ALIASES

    assert set(crd.QUANTIZATIONS) == set(METHOD_ALIASES.values())
    assert crd.KV_CACHE_DTYPES == KV_CACHE_DTYPES


def test_spelling_fp8_either_way_rolls_no_pod():
    def workers(kv: str) -> list[dict]:
        fields = {"model": {"source": {"pvc": {"claimName": "models"}}, "kvCacheDtype": kv}}
        return [o for o in builders.build_all(spec.parse(body(**fields)), CONFIG)
                if o["kind"] == "Deployment"]

    assert workers("fp8") == workers("fp8_e4m3") != workers("auto")


def test_tensor_parallel_size_reaches_the_worker_and_requests_one_gpu_per_rank():
    main = container(find(build("colocated-tp"), "Deployment", "llama-colocated"))
    assert main["args"][main["args"].index("--tensor-parallel-size") + 1] == "4"
    assert main["resources"] == {"limits": {"memory": "64Gi", "nvidia.com/gpu": "4"},
                                 "requests": {"cpu": "8", "nvidia.com/gpu": "4"}}
    one = container(find(build("colocated"), "Deployment", "llama-colocated"))
    assert "--tensor-parallel-size" not in one["args"] and "resources" not in one  # TP 1: as before
    same = body(mode="colocated", colocated={"engine": {"tensorParallelSize": 2},
                                             "resources": {"limits": {"nvidia.com/gpu": 2}}})
    assert container(find(builders.build_all(spec.parse(same), CONFIG), "Deployment", "llama-colocated"))[
        "resources"] == {"limits": {"nvidia.com/gpu": "2"}}


def test_a_gpu_limit_that_contradicts_tensor_parallel_size_is_a_spec_error():
    with pytest.raises(spec.SpecError, match=r"spec.colocated.resources.limits nvidia.com/gpu \(1\) differs "
                                             r"from spec.colocated.engine.tensorParallelSize \(2\)"):
        spec.parse(body(mode="colocated", colocated={"engine": {"tensorParallelSize": 2},
                                                     "resources": {"limits": {"nvidia.com/gpu": 1}}}))


def test_prefill_and_decode_may_run_different_tensor_parallel_sizes():
    """KV handoffs regroup the heads (every handoff pool has the whole model's layout)."""
    from baton.operator import compat

    svc = spec.parse(body(prefill={"engine": {"tensorParallelSize": 2}}, decode={"engine": {"tensorParallelSize": 4}}))
    assert compat.problems(svc) == []
    objects = builders.build_all(svc, CONFIG)
    for role, gpus in (("prefill", "2"), ("decode", "4")):
        main = container(find(objects, "Deployment", f"llama-{role}"))
        assert main["args"][main["args"].index("--tensor-parallel-size") + 1] == gpus
        assert main["resources"]["limits"]["nvidia.com/gpu"] == gpus
