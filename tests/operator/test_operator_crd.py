"""The CRD: generated from operator/crd.py, structural, its CEL rules, and the examples."""

from __future__ import annotations

import copy
import pathlib

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from baton.operator import builders, crd, spec
from baton.operator.config import OperatorConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
SCHEMA = yaml.safe_load((ROOT / "crds" / "baton.dev_inferenceservices.yaml").read_text())[
    "spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_crd_files_are_generated_from_operator_crd_py():
    for name, render in crd.REPO_FILES.items():
        assert (ROOT / "crds" / name).read_text() == render(), (
            f"crds/{name} is stale: run `python -m baton.operator.crd write`")


def test_crds_validate_against_the_kubernetes_schema():
    for path in (ROOT / "crds").glob("*.yaml"):
        for document in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(document, "1.30", strict=True)


def _walk(node: dict, path: str = ""):
    yield path, node
    for key, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural():
    """Every node has a type (or is int-or-string / preserves unknown fields), as the
    API server requires of a CRD schema, and defaults sit only where a type allows them."""
    for path, node in _walk(SCHEMA):
        if node.get("x-kubernetes-int-or-string"):
            continue
        assert "type" in node, f"{path or '<root>'} has no type"
        if node["type"] == "object" and not node.get("x-kubernetes-preserve-unknown-fields"):
            assert "properties" in node or "additionalProperties" in node or path == ".metadata", path
        if "default" in node:
            jsonschema.validate(node["default"], _json_schema(node))


def test_printer_columns_and_status_subresource():
    version = yaml.safe_load((ROOT / "crds" / "baton.dev_inferenceservices.yaml").read_text())[
        "spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[:3] == ["Mode", "Prefill", "Decode"]
    assert {"Ready", "URL", "Age"} <= set(columns)


def _json_schema(node):
    """The CRD's OpenAPI v3 schema as JSON Schema, strict about unknown fields (like
    `kubectl apply --validate=strict`, where the API server would silently prune them)."""
    node = copy.deepcopy(node)
    for _, sub in _walk(node):
        if sub.get("exclusiveMinimum") is True:
            sub["exclusiveMinimum"] = sub.pop("minimum")
        if sub.get("type") == "object" and "properties" in sub and not sub.get(
                "x-kubernetes-preserve-unknown-fields"):
            sub.setdefault("additionalProperties", False)
    return node


def _rules():
    """(path, rule, message) of every CEL rule, compiled with celpy."""
    environment = celpy.Environment()
    for path, node in _walk(SCHEMA):
        for item in node.get("x-kubernetes-validations", []):
            program = environment.program(environment.compile(item["rule"]))
            yield path, program, item["message"]


def _at(obj, path: str):
    for key in filter(None, path.split(".")):
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def violations(obj: dict) -> list[str]:
    """Messages of the CEL rules `obj` (defaulted, as the API server sees it) breaks."""
    obj = crd.apply_defaults(obj)
    broken = []
    for path, program, message in _rules():
        value = _at(obj, path)
        if value is not None and not program.evaluate({"self": celpy.json_to_cel(value)}):
            broken.append(message)
    return broken


def schema_errors(obj: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(_json_schema(SCHEMA))
    return [error.message for error in validator.iter_errors(crd.apply_defaults(obj))]


def service(**spec_fields) -> dict:
    return {"apiVersion": "baton.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "llama"},
            "spec": {"model": {"source": {"pvc": {"claimName": "models"}}}, **spec_fields}}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_valid(path):
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents
    for body in documents:
        assert body["kind"] == "InferenceService"
        assert schema_errors(body) == []
        assert violations(body) == []
        body["metadata"].update(namespace="default", uid="u", generation=1)
        spec.parse(body)  # and the operator can read it


@pytest.mark.parametrize("fields, message", [
    ({"prefill": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}},
     "must not exceed autoscaling.maxReplicas"),
    ({"mode": "colocated", "prefill": {}}, "prefill and decode apply only"),
    ({"worker": {}}, "colocated (or its old spelling worker) applies only to mode colocated"),
    ({"colocated": {}}, "colocated (or its old spelling worker) applies only to mode colocated"),
    ({"mode": "colocated", "colocated": {}, "worker": {}},
     "set colocated or its old spelling worker, not both"),
    ({"prefill": {"autoscaling": {"minReplicas": 0, "maxReplicas": 2}}},
     "needs autoscaling.engine keda"),
    ({"decode": {"autoscaling": {"maxReplicas": 2, "metric": "kv_cache_usage_perc",
                                 "target": 80}}}, "kv_cache_usage_perc is a fraction"),
    ({"model": {"source": {"pvc": {"claimName": "m"}, "hostPath": "/m"}}}, "exactly one of"),
    ({"model": {"source": {}}}, "exactly one of"),
    ({"compileCache": {"pvc": {"claimName": "c"}, "hostPath": "/c"}}, "at most one of spec.compileCache"),
    ({"kvTransfer": {"transport": "tcp", "rdma": {}}},
     "kvTransfer.rdma needs transport ucx or auto"),
    ({"kvTransfer": {"transport": "grpc", "ucx": {"tls": ["rc"]}}},
     "kvTransfer.ucx applies to transport ucx or auto"),
    ({"model": {"source": {"pvc": {"claimName": "m", "path": "../etc"}}}}, "no '..'"),
    ({"model": {"source": {"hostPath": "/m", "credentialsSecretRef": {"name": "s"}}}},
     "applies only to uri sources"),
    ({"prefill": {"engine": {"extraArgs": ["--tensor-parallel-size=2"]}}}, "must not set a flag"),
    ({"decode": {"engine": {"speculative": {"method": "draft_model", "numSpeculativeTokens": 2}}}},
     "speculative.model is required with method draft_model"),
    ({"decode": {"engine": {"speculative": {"numSpeculativeTokens": 2, "model": "/m/draft"}}}},
     "speculative.model is required with method draft_model and refused with ngram"),
    ({"decode": {"engine": {"speculative": {"method": "draft_model", "model": "/m/draft",
                                            "numSpeculativeTokens": 2, "promptLookupMax": 3}}}},
     "apply to method ngram only"),
    ({"prefill": {"engine": {"speculative": {"numSpeculativeTokens": 2}}}},
     "prefill.engine.speculative is refused: prefill engines end each request at its first token"),
    ({"cells": {"prefill": {"engine": {"speculative": {"numSpeculativeTokens": 2}}}}},
     "cells.prefill.engine.speculative is refused"),
])
def test_cel_rules_reject_what_types_cannot(fields, message):
    body = service(**fields)
    assert any(message in text for text in violations(body)), violations(body)


def test_cel_rules_accept_their_valid_counterparts():
    assert violations(service(decode={"engine": {"speculative": {
        "numSpeculativeTokens": 4, "promptLookupMin": 2, "promptLookupMax": 3}}})) == []
    assert violations(service(cells={"decode": {"engine": {"speculative": {"numSpeculativeTokens": 2}}}})) == []
    assert violations(service(decode={"engine": {"speculative": {
        "method": "draft_model", "model": "/m/draft", "numSpeculativeTokens": 4}}})) == []
    assert violations(service(mode="colocated", colocated={"engine": {
        "tensorParallelSize": 2, "speculative": {"numSpeculativeTokens": 2}}})) == []
    assert violations(service(autoscaling={"engine": "keda"}, prefill={
        "autoscaling": {"minReplicas": 0, "maxReplicas": 2}})) == []
    assert violations(service(mode="colocated", colocated={"replicas": 2})) == []
    assert violations(service(kvTransfer={"transport": "ucx", "rdma": {},
                                          "ucx": {"tls": ["rc"], "netDevices": ["mlx5_0:1"]}})) == []
    assert violations(service(mode="colocated", worker={"replicas": 2})) == []
    assert violations(service(mode="colocated", colocated={"engine": {"tensorParallelSize": 8}})) == []
    assert violations(service(prefill={"engine": {"tensorParallelSize": 2}}, decode={"engine": {}})) == []
    assert violations(service(compileCache={"hostPath": "/var/cache/baton"})) == []


@pytest.mark.parametrize("mode, name, ok", [
    ("disaggregated", "llama", True), ("disaggregated", "a" * 55, True),
    ("disaggregated", "a" * 56, False), ("disaggregated", "9lives", False),
    ("disaggregated", "has.dot", False), ("colocated", "a" * 53, True),
    ("colocated", "a" * 54, False)])
def test_names_must_leave_room_for_child_suffixes(mode, name, ok):
    """The longest child name (NAME-prefill, NAME-colocated) is a 63-character DNS label."""
    body = service(mode=mode)
    body["metadata"].update(name=name, namespace="default")
    assert (violations(body) == []) is ok
    if ok:
        longest = max(obj["metadata"]["name"] for obj in builders.build_all(
            spec.parse(body), OperatorConfig()))
        assert len(longest) <= 63
    elif len(name) > crd.max_name_length(mode):  # the operator refuses it too
        with pytest.raises(spec.SpecError, match="choose a shorter name"):
            spec.parse(body)


@pytest.mark.parametrize("fields", [
    {"mode": "sideways"},
    {"prefill": {"replicas": -1}},
    {"prefill": {"engine": {"blockSize": 12}}},
    {"decode": {"engine": {"gpuMemoryUtilization": 1.5}}},
    {"kvTransfer": {"transport": "rdma"}},
    {"kvTransfer": {"transport": "ucx", "rdma": {"count": 0}}},
    {"kvTransfer": {"transport": "ucx", "rdma": {"resourceName": "has space/x"}}},
    {"kvTransfer": {"transport": "ucx", "ucx": {"tls": ["rc,tcp"]}}},  # a list, not a string
    {"kvTransfer": {"transport": "ucx", "ucx": {"progressMode": "fast"}}},
    {"router": {"routingPolicy": "random"}},
    {"router": {"toolCallParser": "mistral"}},  # a parser the router does not have
    {"model": {"source": {"uri": "s3://bucket/model"}}},
    {"prefill": {"resources": {"limits": {"memory": "lots"}}}},
    {"prefill": {"replica": 2}},  # a typo: strict validation names it
    {"model": {"source": {"hostPath": "/m"}, "quantization": "int8"}},
    {"model": {"source": {"hostPath": "/m"}, "kvCacheDtype": "fp8_e5m2"}},
    {"tracing": {"otlpEndpoint": ""}},
    {"tracing": {"otlpEndpoint": "collector:4317 --port 1"}},
    {"tracing": {"endpoint": "collector:4317"}},
    {"mode": "colocated", "colocated": {"engine": {"tensorParallelSize": 0}}},
    {"mode": "colocated", "colocated": {"engine": {"tensorParallelSize": 32}}},
    {"decode": {"engine": {"speculative": {"method": "eagle", "numSpeculativeTokens": 2}}}},
    {"decode": {"engine": {"speculative": {"numSpeculativeTokens": 0}}}},
    {"decode": {"engine": {"speculative": {"method": "ngram"}}}},
])
def test_schema_rejects_bad_values(fields):
    assert schema_errors(service(**fields))


def test_parsing_the_defaulted_spec_changes_nothing():
    """The operator's typed spec reads the CRD's defaults: parsing a spec before and after
    the API server fills them in gives the same result, for every example too."""
    bodies = [yaml.safe_load(path.read_text()) for path in EXAMPLES] + [
        service(prefill={"engine": {}, "autoscaling": {"maxReplicas": 3}}, decode={}),
        service(mode="colocated", worker={"engine": {}}),
        service(mode="colocated", colocated={"engine": {}}),
    ]
    for body in bodies:
        body["metadata"].update(namespace="default", uid="u", generation=1)
        assert spec.parse(body) == spec.parse(crd.apply_defaults(body))
