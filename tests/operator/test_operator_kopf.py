"""The real operator (kopf, `baton.operator.main.run`) against an emulated API server.

Each test starts the operator, acts as a user or as the cluster's controllers would
(apply and edit an InferenceService, an HPA scaling a Deployment, pods becoming ready),
and checks what the operator wrote back.
"""

from __future__ import annotations

import asyncio

import pytest

IS = "baton.dev/v1alpha1/inferenceservices"
DEPLOY = "apps/v1/deployments"
HPA = "autoscaling/v2/horizontalpodautoscalers"
NS = "default"
CHILDREN = {
    DEPLOY: {"llama-prefill", "llama-decode", "llama-router"},
    "v1/services": {"llama-prefill", "llama-decode", "llama-router"},
    "policy/v1/poddisruptionbudgets": {"llama-prefill", "llama-decode", "llama-router"},
    "v1/serviceaccounts": {"llama-router"},
    "rbac.authorization.k8s.io/v1/roles": {"llama-router"},
    "rbac.authorization.k8s.io/v1/rolebindings": {"llama-router"},
}


def service(name: str = "llama", **spec) -> dict:
    return {"apiVersion": "baton.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"model": {"source": {"pvc": {"claimName": "models"}}}, **spec}}


async def models_claim(apiserver) -> None:
    await apiserver.create("v1/persistentvolumeclaims", {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "models", "namespace": NS}, "spec": {}})


@pytest.fixture
async def models(apiserver):
    """The PersistentVolumeClaim the services read their model from."""
    await models_claim(apiserver)


def condition(apiserver, kind: str = "Ready", name: str = "llama") -> dict:
    body = apiserver.get_object(IS, NS, name) or {}
    for item in (body.get("status") or {}).get("conditions") or []:
        if item["type"] == kind:
            return item
    return {}


def events(apiserver, reason: str) -> list[dict]:
    return [event for name in apiserver.names("v1/events", NS)
            if (event := apiserver.get_object("v1/events", NS, name))["reason"] == reason]


async def make_ready(apiserver, name: str, ready: int) -> None:
    """Play the Deployment controller: report `ready` of the desired pods ready."""
    desired = apiserver.get_object(DEPLOY, NS, name)["spec"].get("replicas", 1)
    await apiserver.merge(DEPLOY, NS, name, {"status": {
        "replicas": desired, "updatedReplicas": desired, "readyReplicas": ready,
        "availableReplicas": ready}}, subresource="status")


async def test_create_makes_every_child_owned_by_the_service(apiserver, operator, models, wait):
    await operator.start()
    uid = (await apiserver.create(IS, service()))["metadata"]["uid"]

    ready = await wait(lambda: condition(apiserver))  # written after every child
    for resource, names in CHILDREN.items():
        assert apiserver.names(resource, NS) == names, resource
        for name in names:
            meta = apiserver.get_object(resource, NS, name)["metadata"]
            assert meta["ownerReferences"] == [{
                "apiVersion": "baton.dev/v1alpha1", "kind": "InferenceService", "name": "llama",
                "uid": uid, "controller": True, "blockOwnerDeletion": True}]
            assert meta["labels"]["app.kubernetes.io/instance"] == "llama"
            assert meta["labels"]["app.kubernetes.io/managed-by"] == "baton-operator"

    assert (ready["status"], ready["reason"]) == ("False", "PrefillNotReady")
    status = apiserver.get_object(IS, NS, "llama")["status"]
    assert status["observedGeneration"] == 1
    assert status["url"] == "http://llama-router.default.svc.cluster.local:8000"
    assert status["prefill"] == {"replicas": 1, "readyReplicas": 0, "ready": "0/1"}


async def test_editing_replicas_and_image_patches_the_children(apiserver, operator, models, wait):
    await operator.start()
    await apiserver.create(IS, service())
    await wait(lambda: apiserver.names(DEPLOY, NS) == CHILDREN[DEPLOY])
    before = apiserver.get_object(DEPLOY, NS, "llama-decode")
    router_image = apiserver.get_object(DEPLOY, NS, "llama-router")["spec"]["template"][
        "spec"]["containers"][0]["image"]

    await apiserver.merge(IS, NS, "llama", {"spec": {
        "image": "registry.example/baton:v2", "decode": {"replicas": 3}}})

    def patched():
        spec = apiserver.get_object(DEPLOY, NS, "llama-decode")["spec"]
        image = spec["template"]["spec"]["containers"][0]["image"]
        return spec["replicas"] == 3 and image == "registry.example/baton:v2"

    await wait(patched)
    after = apiserver.get_object(DEPLOY, NS, "llama-decode")
    assert after["metadata"]["uid"] == before["metadata"]["uid"]  # patched, not recreated
    prefill = apiserver.get_object(DEPLOY, NS, "llama-prefill")["spec"]
    assert prefill["template"]["spec"]["containers"][0]["image"] == "registry.example/baton:v2"
    router = apiserver.get_object(DEPLOY, NS, "llama-router")["spec"]["template"]["spec"]
    assert router["containers"][0]["image"] == router_image  # the router runs the control image
    await wait(lambda: apiserver.get_object(IS, NS, "llama")["status"][
        "observedGeneration"] == 2)


async def test_tracing_and_quantization_edits_reach_the_router_and_every_worker(
        apiserver, operator, models, wait):
    await operator.start()
    await apiserver.create(IS, service())
    await wait(lambda: apiserver.names(DEPLOY, NS) == CHILDREN[DEPLOY])
    uid = apiserver.get_object(DEPLOY, NS, "llama-decode")["metadata"]["uid"]

    await apiserver.merge(IS, NS, "llama", {"spec": {
        "tracing": {"otlpEndpoint": "otel-collector.observability:4317"},
        "model": {"quantization": "fp8", "kvCacheDtype": "fp8_e4m3"}}})

    def args(name: str) -> list[str]:
        return apiserver.get_object(DEPLOY, NS, name)["spec"]["template"]["spec"][
            "containers"][0]["args"]

    def flag(name: str, key: str) -> str | None:
        given = args(name)
        return given[given.index(key) + 1] if key in given else None

    await wait(lambda: all(flag(name, "--otlp-traces-endpoint") for name in CHILDREN[DEPLOY]))
    for name in CHILDREN[DEPLOY]:
        assert flag(name, "--otlp-traces-endpoint") == "otel-collector.observability:4317"
    for name in ("llama-prefill", "llama-decode"):
        assert (flag(name, "--quantization"), flag(name, "--kv-cache-dtype")) == ("fp8", "fp8")
    assert "--quantization" not in args("llama-router")
    assert apiserver.get_object(DEPLOY, NS, "llama-decode")["metadata"]["uid"] == uid


async def test_autoscaling_creates_an_hpa_and_leaves_replicas_to_it(apiserver, operator, models,
                                                                    wait):
    await operator.start()
    await apiserver.create(IS, service(prefill={"replicas": 2}))
    await wait(lambda: apiserver.get_object(DEPLOY, NS, "llama-prefill"))

    await apiserver.merge(IS, NS, "llama", {"spec": {"prefill": {"autoscaling": {
        "minReplicas": 1, "maxReplicas": 6}}}})
    hpa = await wait(lambda: apiserver.get_object(HPA, NS, "llama-prefill"))
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                            "name": "llama-prefill"}
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "baton_num_requests_waiting"
    assert hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == "4"

    # The HPA scales the Deployment; a later edit of the service must not undo that.
    await apiserver.merge(DEPLOY, NS, "llama-prefill", {"spec": {"replicas": 5}})
    await apiserver.merge(IS, NS, "llama", {"spec": {"prefill": {
        "replicas": 1, "engine": {"maxNumSeqs": 64}}}})

    def args_patched():
        container = apiserver.get_object(DEPLOY, NS, "llama-prefill")["spec"]["template"][
            "spec"]["containers"][0]
        return "64" in container["args"]

    await wait(args_patched)
    assert apiserver.get_object(DEPLOY, NS, "llama-prefill")["spec"]["replicas"] == 5

    # Autoscaling off: the HPA goes, and the operator owns replicas again.
    await apiserver.merge(IS, NS, "llama", {"spec": {"prefill": {"autoscaling": None}}})
    await wait(lambda: apiserver.get_object(HPA, NS, "llama-prefill") is None)
    await wait(lambda: apiserver.get_object(DEPLOY, NS, "llama-prefill")["spec"]["replicas"] == 1)


async def test_status_follows_the_child_deployments(apiserver, operator, models, wait):
    await operator.start()
    await apiserver.create(IS, service(prefill={"replicas": 2}))
    await wait(lambda: apiserver.names(DEPLOY, NS) == CHILDREN[DEPLOY])

    await make_ready(apiserver, "llama-prefill", 1)
    await wait(lambda: condition(apiserver, "PrefillReady").get("reason") == "PartiallyReady")
    for name, ready in (("llama-prefill", 2), ("llama-decode", 1), ("llama-router", 1)):
        await make_ready(apiserver, name, ready)
    ready = await wait(lambda: condition(apiserver).get("status") == "True" and condition(apiserver))
    assert ready["reason"] == "Serving"
    status = apiserver.get_object(IS, NS, "llama")["status"]
    assert status["prefill"]["ready"] == "2/2" and status["decode"]["ready"] == "1/1"
    assert condition(apiserver, "RouterReady")["reason"] == "AllReplicasReady"

    await make_ready(apiserver, "llama-decode", 0)
    await wait(lambda: condition(apiserver).get("reason") == "DecodeNotReady")
    assert condition(apiserver, "DecodeReady")["reason"] == "NoReplicasReady"
    await wait(lambda: events(apiserver, "DecodeNotReady"))


@pytest.mark.parametrize("blocker", ["keda", "pvc", "conflict"])
async def test_unservable_spec_reports_why_and_recovers(apiserver, operator, blocker, wait):
    """A spec the schema accepts but the cluster cannot serve yet: Ready=False with a
    reason, a Warning Event, no children; once the cluster can, the resync serves it."""
    await operator.start(resync_seconds=0.3)
    if blocker == "keda":
        await models_claim(apiserver)
        body = service(autoscaling={"engine": "keda"},
                       prefill={"autoscaling": {"minReplicas": 0, "maxReplicas": 3}})
        reason = "KedaNotInstalled"
    elif blocker == "pvc":
        body, reason = service(), "ModelClaimNotFound"
    else:  # someone else's Service already has the router's name
        await models_claim(apiserver)
        await apiserver.create("v1/services", {"apiVersion": "v1", "kind": "Service",
                                               "metadata": {"name": "llama-router",
                                                            "namespace": NS}, "spec": {}})
        body, reason = service(), "NameConflict"
    await apiserver.create(IS, body)

    ready = await wait(lambda: condition(apiserver).get("reason") == reason and condition(apiserver))
    assert ready["status"] == "False"
    warning = await wait(lambda: events(apiserver, reason))
    assert warning[0]["type"] == "Warning"
    if blocker != "conflict":  # a conflict blocks only the one child
        assert apiserver.names(DEPLOY, NS) == set()
    assert operator.thread.is_alive()  # no crash, no retry storm: a status, then a wait

    if blocker == "keda":
        apiserver.install_keda()
        await wait(lambda: apiserver.get_object("keda.sh/v1alpha1/scaledobjects", NS,
                                                "llama-prefill"))
    elif blocker == "pvc":
        await models_claim(apiserver)
    else:
        await apiserver.remove("v1/services", NS, "llama-router")
    await wait(lambda: apiserver.names(DEPLOY, NS) == CHILDREN[DEPLOY])
    await wait(lambda: condition(apiserver).get("reason") == "PrefillNotReady")


async def test_speculative_decoding_on_prefill_is_refused_until_moved_to_decode(apiserver, operator, models, wait):
    """Without CEL (a cluster whose CRD predates the rule), the operator refuses it itself:
    Ready=False InvalidSpec naming the field, no worker; moved to decode, it is served."""
    await operator.start(resync_seconds=0.3)
    ngram = {"speculative": {"numSpeculativeTokens": 2}}
    await apiserver.create(IS, service(prefill={"engine": ngram}))
    ready = await wait(lambda: condition(apiserver).get("reason") == "InvalidSpec" and condition(apiserver))
    assert ready["status"] == "False"
    assert "spec.prefill.engine.speculative is refused" in ready["message"]
    assert "set it on spec.decode.engine.speculative" in ready["message"]
    assert apiserver.names(DEPLOY, NS) == set()

    await apiserver.merge(IS, NS, "llama", {"spec": {"prefill": {"engine": {"speculative": None}},
                                                     "decode": {"engine": ngram}}})
    await wait(lambda: apiserver.names(DEPLOY, NS) == CHILDREN[DEPLOY])
    args = apiserver.get_object(DEPLOY, NS, "llama-decode")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--speculative-config" in args
    prefill = apiserver.get_object(DEPLOY, NS, "llama-prefill")["spec"]["template"]["spec"]["containers"][0]
    assert "--speculative-config" not in prefill["args"]


async def test_deleting_the_service_removes_its_children(apiserver, operator, models, wait):
    await operator.start(resync_seconds=0.3)
    await apiserver.create(IS, service())
    await wait(lambda: apiserver.names(DEPLOY, NS) == CHILDREN[DEPLOY])
    other = service("other")
    await apiserver.create(IS, other)
    await wait(lambda: apiserver.get_object(DEPLOY, NS, "other-router"))

    await apiserver.remove(IS, NS, "llama")
    await wait(lambda: not any(name.startswith("llama-") for resource in CHILDREN
                               for name in apiserver.names(resource, NS)))
    await asyncio.sleep(1.0)  # a few resyncs: nothing comes back
    assert not any(name.startswith("llama-") for name in apiserver.names(DEPLOY, NS))
    assert apiserver.get_object(DEPLOY, NS, "other-router")  # the other service is untouched


async def test_restart_and_resync_write_nothing_new(apiserver, operator, models, wait):
    await operator.start(resync_seconds=0.3)
    await apiserver.create(IS, service(prefill={"autoscaling": {"maxReplicas": 4}}))
    await wait(lambda: apiserver.names(DEPLOY, NS) == CHILDREN[DEPLOY])
    await wait(lambda: condition(apiserver).get("reason"))
    await asyncio.sleep(1.0)  # settle: the first resyncs may still be under way

    def churn(since: int) -> list:
        return [r for r in apiserver.writes()[since:]
                if r.resource.plural != "events"
                and not (r.resource.plural == "inferenceservices" and r.subresource is None)]

    mark = len(apiserver.writes())
    await asyncio.sleep(1.0)  # three resyncs of an unchanged service
    assert churn(mark) == []

    before = {resource: apiserver.names(resource, NS) for resource in [*CHILDREN, HPA]}
    await operator.stop()
    mark = len(apiserver.writes())
    await operator.start(resync_seconds=0.3)
    await asyncio.sleep(1.5)
    assert churn(mark) == [], "a restarted operator re-wrote children or status"
    assert {resource: apiserver.names(resource, NS) for resource in before} == before


async def test_tensor_parallel_size_sets_the_flag_and_the_gpu_request(apiserver, operator, models, wait):
    """engine.tensorParallelSize reaches the worker's command line and requests one GPU per
    rank; an edit rolls both; prefill and decode may differ."""
    await operator.start()
    await apiserver.create(IS, service(mode="colocated", colocated={"engine": {"tensorParallelSize": 2}}))

    def worker(gpus: str):
        deployment = apiserver.get_object(DEPLOY, NS, "llama-colocated")
        if deployment is None:
            return None
        main = deployment["spec"]["template"]["spec"]["containers"][0]
        ok = (main.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") == gpus
              and main["args"][main["args"].index("--tensor-parallel-size") + 1] == gpus)
        return ok and main

    await wait(lambda: worker("2"))
    await apiserver.merge(IS, NS, "llama", {"spec": {"colocated": {"engine": {"tensorParallelSize": 4}}}})
    await wait(lambda: worker("4"))

    await apiserver.create(IS, service("split", decode={"engine": {"tensorParallelSize": 2}}))
    decode = await wait(lambda: apiserver.get_object(DEPLOY, NS, "split-decode"))
    main = decode["spec"]["template"]["spec"]["containers"][0]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "2"
    prefill = await wait(lambda: apiserver.get_object(DEPLOY, NS, "split-prefill"))
    assert "--tensor-parallel-size" not in prefill["spec"]["template"]["spec"]["containers"][0]["args"]
