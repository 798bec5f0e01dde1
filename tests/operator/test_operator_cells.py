"""Cells (`spec.cells`): the CRD's checks, the operator's checks, and the children it builds,
checked against the Kubernetes schemas and against the `baton serve-cell`, worker and
router command lines they drive."""

from __future__ import annotations

import copy
import shlex

import kubernetes_validate
import pytest
from test_operator_builders import CONFIG, KUBERNETES_VERSIONS, body, container, find
from test_operator_crd import schema_errors, violations
from test_operator_crd import service as crd_service

from baton import cell
from baton.operator import builders, compat, spec
from baton.operator.builders import autoscaling, router
from baton.router.discovery import slice_addresses
from baton.worker import flags

CELLS = body(prefill={"replicas": 0}, decode={"replicas": 2},
             cells={"replicas": 3, "prefill": {"engines": 1}, "decode": {"engines": 3, "engine": {"maxNumSeqs": 64}},
                    "resources": {"limits": {"memory": "200Gi"}}, "shmSize": "8Gi"},
             networkPolicy={"enabled": True})


def build(document: dict) -> list[dict]:
    return builders.build_all(spec.parse(copy.deepcopy(document)), CONFIG)


def test_every_child_validates_against_the_kubernetes_schemas():
    objects = build(CELLS)
    for obj in objects:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {("Deployment", "llama-cell"), ("Service", "llama-cell-prefill"), ("Service", "llama-cell-decode"),
            ("PodDisruptionBudget", "llama-cell"), ("NetworkPolicy", "llama-cell"),
            ("Deployment", "llama-prefill"), ("Deployment", "llama-decode")} <= names


def test_a_cell_pod_holds_every_gpu_and_runs_serve_cell_as_its_parser_reads_it():
    deployment = find(build(CELLS), "Deployment", "llama-cell")
    assert deployment["spec"]["replicas"] == 3
    main = container(deployment)
    assert main["command"] == ["baton", "serve-cell"]
    assert main["resources"]["limits"] == {"memory": "200Gi", "nvidia.com/gpu": "4"}
    # serve-cell's own parser takes the cell flags; what it passes on, each engine's parser takes.
    args, engine_argv = cell.build_parser().parse_known_args(main["args"])
    assert (args.prefill, args.decode, args.device, args.port) == (1, 3, "cuda", 50051)
    assert args.engine_port == 50100 and args.engine_metrics_port == 9100
    for side, extra in (("prefill", args.prefill_args), ("decode", args.decode_args)):
        parsed = flags.build_parser("baton serve-" + side, side).parse_args(engine_argv + shlex.split(extra))
        assert parsed.model == "/models/llama" and parsed.block_size == 16
    assert "--max-num-seqs 64" in args.decode_args and "--max-num-seqs 256" in args.prefill_args
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports["health"] == 50051 and ports["grpc-3"] == 50103 and ports["metrics-0"] == 9100
    assert main["readinessProbe"]["grpc"]["port"] == 50051


def test_the_router_pools_fleet_and_cell_engines_and_discovers_one_worker_per_engine_port():
    objects = build(CELLS)
    args = router.router_args(spec.parse(copy.deepcopy(CELLS)))
    pairs = list(zip(args[::2], args[1::2], strict=False))
    assert ("--prefill-service", "llama-cell-prefill") in pairs and ("--prefill-service", "llama-prefill") in pairs
    assert ("--decode-service", "llama-cell-decode") in pairs and ("--decode-service", "llama-decode") in pairs
    for side, engines in (("prefill", [50100]), ("decode", [50101, 50102, 50103])):
        service = find(objects, "Service", f"llama-cell-{side}")
        assert service["spec"]["clusterIP"] == "None"
        # The EndpointSlice Kubernetes derives from this Service, as the router reads it.
        endpoint_slice = {"ports": [{"name": p["name"], "port": p["port"]} for p in service["spec"]["ports"]],
                          "endpoints": [{"addresses": ["10.1.2.3"], "conditions": {"ready": True}}]}
        assert slice_addresses(endpoint_slice) == {f"10.1.2.3:{port}" for port in engines}


def test_cells_scale_as_units_on_the_average_of_their_engines():
    hpa_spec = body(cells={"autoscaling": {"minReplicas": 1, "maxReplicas": 6, "metric": "num_requests_waiting"}})
    objects = build(hpa_spec)
    hpa = find(objects, "HorizontalPodAutoscaler", "llama-cell")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "llama-cell" and hpa["spec"]["maxReplicas"] == 6
    assert "replicas" not in find(objects, "Deployment", "llama-cell")["spec"]
    keda = spec.parse(copy.deepcopy(body(autoscaling={"engine": "keda"}, cells={
        "prefill": {"engines": 1}, "decode": {"engines": 2}, "autoscaling": {"minReplicas": 0, "maxReplicas": 4}})))
    query = autoscaling.prometheus_query(keda, "cell")
    assert 'service=~"llama-cell-(prefill|decode)"' in query and ") / 3 or sum(" in query


def test_network_policies_let_every_prefill_engine_reach_every_decode_engine():
    objects = build(CELLS)
    decode = find(objects, "NetworkPolicy", "llama-decode")["spec"]["ingress"]
    senders = [rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
               for rule in decode if "from" in rule]
    assert senders == ["router", "prefill", "cell"]
    cell_rules = find(objects, "NetworkPolicy", "llama-cell")["spec"]["ingress"]
    router_ports = {p["port"] for p in cell_rules[0]["ports"]}
    assert router_ports == {"grpc-0", "grpc-1", "grpc-2", "grpc-3"}
    kv_ports = {p["port"] for p in cell_rules[1]["ports"]}
    assert {"grpc-1", 50201, 50301, 50303} <= kv_ports and "grpc-0" not in kv_ports


@pytest.mark.parametrize("fields, message", [
    ({"mode": "colocated", "cells": {}}, "cells apply only to mode disaggregated"),
    ({"cells": {"decode": {"engine": {"blockSize": 32}}}}, "must equal prefill.engine.blockSize"),
    ({"cells": {"prefill": {"engines": 4}, "decode": {"engines": 5}}}, "at most 8 engines"),
    ({"cells": {"resources": {"limits": {"nvidia.com/gpu": 2}}}}, "must not set nvidia.com/gpu"),
    ({"cells": {"autoscaling": {"minReplicas": 0, "maxReplicas": 2}}}, "needs autoscaling.engine keda"),
])
def test_cel_refuses_a_split_that_cannot_run(fields, message):
    assert any(message in text for text in violations(crd_service(**fields)))


def test_cel_accepts_cells_beside_fleets_and_the_schema_bounds_the_split():
    fine = crd_service(cells={"prefill": {"engines": 2}, "decode": {"engines": 6}, "gpusPerEngine": 1})
    assert violations(fine) == [] and schema_errors(fine) == []
    assert schema_errors(crd_service(cells={"decode": {"engines": 0}}))
    assert schema_errors(crd_service(cells={"gpusPerEngine": 2}))


def test_the_operator_checks_what_cel_checks_and_what_it_cannot_read():
    def parsed(**fields) -> spec.InferenceService:
        document = crd_service(**fields)
        document["metadata"].update(namespace="default", uid="u")
        return spec.parse(document)

    [problem] = compat.problems(parsed(cells={"decode": {"engine": {"blockSize": 64}}}))
    assert "spec.prefill.engine.blockSize (16) differs from spec.cells.decode.engine.blockSize (64)" \
        in problem.message
    [problem] = compat.problems(parsed(cells={"prefill": {"engine": {"extraArgs": ["--device", "cuda:3"]}}}))
    assert "spec.cells.prefill.engine.extraArgs sets --device" in problem.message
    for fields, message in (({"cells": {"resources": {"limits": {"nvidia.com/gpu": 1}}}}, "nvidia.com/gpu"),
                            ({"cells": {"prefill": {"engines": 5}, "decode": {"engines": 4}}}, "at most 8"),
                            ({"mode": "colocated", "cells": {}}, "only to mode disaggregated")):
        with pytest.raises(spec.SpecError, match=message):
            parsed(**fields)
    long = crd_service(cells={})
    long["metadata"].update(name="x" * 51, namespace="default")
    with pytest.raises(spec.SpecError, match="longer than 50"):
        spec.parse(long)


# --- the real operator on the emulated API server -------------------------------------------


async def test_cells_are_created_beside_the_fleets_reported_and_removed(apiserver, operator, wait):
    """Adding spec.cells creates the cell Deployment and its two Services and points the
    router at them; status gets `cell` and a CellsReady condition that follows the
    Deployment; removing spec.cells deletes them again."""
    from test_operator_kopf import DEPLOY, IS, NS, condition, make_ready, models_claim
    from test_operator_kopf import service as kopf_service

    await models_claim(apiserver)
    await operator.start()
    await apiserver.create(IS, kopf_service())
    await wait(lambda: "llama-decode" in apiserver.names(DEPLOY, NS))
    await apiserver.merge(IS, NS, "llama", {"spec": {"cells": {"replicas": 2, "decode": {"engines": 2}}}})
    await wait(lambda: "llama-cell" in apiserver.names(DEPLOY, NS))
    assert {"llama-cell-prefill", "llama-cell-decode"} <= apiserver.names("v1/services", NS)
    cell_pod = apiserver.get_object(DEPLOY, NS, "llama-cell")["spec"]
    assert cell_pod["replicas"] == 2
    assert cell_pod["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "3"
    await wait(lambda: "llama-cell-decode" in apiserver.get_object(DEPLOY, NS, "llama-router")[
        "spec"]["template"]["spec"]["containers"][0]["args"])
    await wait(lambda: condition(apiserver, "CellsReady").get("reason") == "NoReplicasReady")
    for name in ("llama-prefill", "llama-decode", "llama-router"):
        await make_ready(apiserver, name, 1)
    await make_ready(apiserver, "llama-cell", 1)
    await wait(lambda: condition(apiserver, "CellsReady").get("reason") == "PartiallyReady")
    assert apiserver.get_object(IS, NS, "llama")["status"]["cell"] == {
        "replicas": 2, "readyReplicas": 1, "ready": "1/2"}
    await make_ready(apiserver, "llama-cell", 2)
    await wait(lambda: condition(apiserver).get("reason") == "Serving")
    await apiserver.merge(IS, NS, "llama", {"spec": {"cells": None}})
    await wait(lambda: "llama-cell" not in apiserver.names(DEPLOY, NS))
    await wait(lambda: not {"llama-cell-prefill", "llama-cell-decode"} & apiserver.names("v1/services", NS))
    await wait(lambda: condition(apiserver, "CellsReady") == {})


def test_the_charts_service_monitor_scrapes_every_engine_of_the_largest_cell():
    import helm_python as helm
    from test_operator_chart import CHART, render

    with helm.Chart.load(CHART) as chart:
        objects = render(chart, {"metrics": {"serviceMonitor": {"enabled": True}}})
    monitor = next(o for o in objects if o["kind"] == "ServiceMonitor")
    scraped = {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]}
    largest = build(body(cells={"prefill": {"engines": 1}, "decode": {"engines": 7}}))
    for side in ("prefill", "decode"):
        ports = {p["name"] for p in find(largest, "Service", f"llama-cell-{side}")["spec"]["ports"]}
        assert {p for p in ports if p.startswith("metrics-")} <= scraped


def test_with_cells_ready_a_fleet_scaled_to_zero_is_no_outage():
    from baton.operator import status

    def deployment(name: str, replicas: int, ready: int) -> dict:
        return {"metadata": {"labels": {"app.kubernetes.io/instance": "llama"}}, "spec": {"replicas": replicas},
                "status": {"readyReplicas": ready, "updatedReplicas": replicas}}

    def ready(cells_ready: int) -> dict:
        deployments = {"prefill": deployment("p", 0, 0), "decode": deployment("d", 1, 1),
                       "cell": deployment("c", 2, cells_ready), "router": deployment("r", 1, 1)}
        computed = status.compute(components=list(deployments), names={c: f"llama-{c}" for c in deployments},
                                  deployments=deployments, problems=[], url="http://r", previous=None,
                                  generation=1, now="2026-12-06T00:00:00Z")
        return {c["type"]: c for c in computed["conditions"]}

    up = ready(2)
    assert up["PrefillReady"]["reason"] == "ScaledToZero" and up["CellsReady"]["status"] == "True"
    assert up["Ready"]["reason"] == "Serving"
    down = ready(0)
    assert (down["Ready"]["status"], down["Ready"]["reason"]) == ("False", "PrefillNotReady")


def test_kv_health_reads_every_engine_of_a_cell_pod():
    from baton.operator import kvhealth

    cell_pod = find(build(CELLS), "Deployment", "llama-cell")["spec"]["template"]
    fleet_pod = find(build(CELLS), "Deployment", "llama-decode")["spec"]["template"]
    pods = [{"metadata": {"name": "llama-cell-abc"}, "spec": cell_pod["spec"],
             "status": {"phase": "Running", "podIP": "10.0.0.9"}},
            {"metadata": {"name": "llama-decode-xyz"}, "spec": fleet_pod["spec"],
             "status": {"phase": "Running", "podIP": "10.0.0.7"}}]
    assert kvhealth.metrics_urls(pods) == {
        "llama-decode-xyz": "http://10.0.0.7:9090/metrics",
        **{f"llama-cell-abc/metrics-{k}": f"http://10.0.0.9:{9100 + k}/metrics" for k in range(4)}}
