"""The Helm chart, through Helm's own Go library (helm-python-sdk): lint, render, validate."""

from __future__ import annotations

import os
import pathlib
import re

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from baton import __version__
from baton.operator import config

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "baton"
NON_DEFAULT = {
    "image": {"registry": "registry.example/ml", "pullPolicy": "Always",
              "worker": {"repository": "baton-gpu", "tag": "v9"}},
    "imagePullSecrets": [{"name": "pull"}],
    "operator": {"replicas": 2, "peering": "baton", "watchNamespaces": ["team-a", "team-b"],
                 "logLevel": "DEBUG", "resyncSeconds": 30,
                 "nodeSelector": {"pool": "system"},
                 "tolerations": [{"key": "system", "operator": "Exists"}]},
    "serviceAccount": {"create": True, "name": "baton-op", "annotations": {"a": "b"}},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                "adapterRules": {"enabled": True}},
}
# Not in the Kubernetes schemas: prometheus-operator's and kopf's custom resources.
CUSTOM_KINDS = {"ServiceMonitor", "ClusterKopfPeering", "KopfPeering"}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values=None) -> list[dict]:
    manifests = chart.render(values, name="baton", namespace="baton-system")
    return [doc for path, text in manifests.items() if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def test_lints_clean_in_strict_mode():
    for values in (None, NON_DEFAULT):
        report = helm.lint(CHART, values, strict=True, namespace="baton-system",
                           kube_version="v1.30.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("values", [None, NON_DEFAULT], ids=["default", "non-default"])
def test_every_rendered_object_validates(chart, values):
    objects = render(chart, values)
    assert objects
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            assert obj["apiVersion"] in ("monitoring.coreos.com/v1", "kopf.dev/v1")
            continue
        for version in ("1.27", "1.30", "1.33"):
            kubernetes_validate.validate(obj, version, strict=True)


def test_default_install_is_cluster_wide_and_standalone(chart):
    objects = render(chart)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "ServiceAccount"]
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["BATON_NAMESPACES"] == "" and env["BATON_PEERING"] == ""
    assert container["command"] == ["baton", "operator"]
    # The chart's images are the operator's defaults: both follow the package version.
    assert container["image"] == config.DEFAULT_CONTROL_IMAGE
    assert env["BATON_WORKER_IMAGE"] == config.DEFAULT_WORKER_IMAGE
    assert env["BATON_CONTROL_IMAGE"] == config.DEFAULT_CONTROL_IMAGE
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert chart.metadata["appVersion"] == __version__


def test_every_operator_setting_has_its_environment_variable(chart):
    """The chart sets each BATON_* variable the operator reads (and no other)."""
    container = next(o for o in render(chart) if o["kind"] == "Deployment")[
        "spec"]["template"]["spec"]["containers"][0]
    set_by_chart = {e["name"] for e in container["env"]}
    source = (ROOT / "operator" / "config.py").read_text()
    read_by_operator = set(re.findall(r'(?:env|environ)\.get\("(BATON_[A-Z_]+)"', source))
    assert set_by_chart == read_by_operator


def test_namespaced_install_grants_roles_per_namespace(chart):
    objects = render(chart, NON_DEFAULT)
    roles = {(o["kind"], o["metadata"].get("namespace")) for o in objects
             if o["kind"] in ("Role", "RoleBinding")}
    assert roles == {(k, ns) for k in ("Role", "RoleBinding") for ns in ("team-a", "team-b")}
    cluster_role = next(o for o in objects if o["kind"] == "ClusterRole")
    assert not any("deployments" in rule["resources"] for rule in cluster_role["rules"])
    peerings = [o for o in objects if o["kind"] == "KopfPeering"]
    assert {p["metadata"]["namespace"] for p in peerings} == {"team-a", "team-b"}
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    env = {e["name"]: e["value"] for e in
           deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["BATON_NAMESPACES"] == "team-a,team-b"
    assert env["BATON_WORKER_IMAGE"] == "registry.example/ml/baton-gpu:v9"


def test_operator_rbac_covers_every_kind_it_writes(chart):
    """The ClusterRole grants create/patch/delete on each child kind the builders emit."""
    from baton.operator.reconcile import PRUNABLE

    rules = next(o for o in render(chart) if o["kind"] == "ClusterRole")["rules"]

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
                   for r in rules)

    plurals = {"Deployment": "deployments", "Service": "services", "ConfigMap": "configmaps",
               "PodDisruptionBudget": "poddisruptionbudgets", "NetworkPolicy": "networkpolicies",
               "HorizontalPodAutoscaler": "horizontalpodautoscalers",
               "ScaledObject": "scaledobjects"}
    for api_version, kind in PRUNABLE:
        group = api_version.rpartition("/")[0]
        for verb in ("get", "list", "create", "patch", "delete"):
            assert allowed(group, plurals[kind], verb), (kind, verb)
    assert allowed("baton.dev", "inferenceservices/status", "patch")
    assert allowed("discovery.k8s.io", "endpointslices", "watch")  # granted on to routers
    assert allowed("", "pods", "list")  # worker /metrics for KVTransferReady
    assert not allowed("", "secrets", "get")  # the operator never reads secrets


def test_adapter_rules_serve_the_metric_names_the_hpas_use(chart):
    from baton.operator.builders.autoscaling import adapter_metric_name
    from baton.operator.crd import METRICS

    config_map = next(o for o in render(chart, NON_DEFAULT) if o["kind"] == "ConfigMap")
    rule = yaml.safe_load(config_map["data"]["config.yaml"])["rules"][0]
    series = re.search(r'__name__=~"(.*?)"', rule["seriesQuery"]).group(1)
    for metric in METRICS:
        assert re.fullmatch(series, f"baton:{metric}")
        renamed = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"),
                         f"baton:{metric}")
        assert renamed == adapter_metric_name(metric)
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_bad_values_are_refused(chart):
    with pytest.raises(helm.HelmValuesError, match="replicas"):
        chart.render({"operator": {"replicas": "two"}}, name="b", namespace="n")
    with pytest.raises(helm.HelmValuesError, match="bogus"):
        chart.render({"operator": {"bogus": 1}}, name="b", namespace="n")
    with pytest.raises(helm.HelmRenderError, match="needs operator.peering"):
        chart.render({"operator": {"replicas": 2}}, name="b", namespace="n")


def test_chart_crds_are_the_repository_crds(chart):
    """One source of truth: charts/baton/crds links to crds/, and Helm loads those bytes."""
    link = CHART / "crds"
    assert link.is_symlink() and link.resolve() == (ROOT / "crds").resolve()
    assert os.readlink(link) == "../../crds"
    loaded = {pathlib.PurePath(item["name"]).name: item["data"] for item in chart.crds}
    on_disk = {path.name: path.read_text() for path in (ROOT / "crds").glob("*.yaml")}
    assert loaded == on_disk
