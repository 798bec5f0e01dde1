"""The Grafana dashboard the chart ships: built by scripts/dashboard.py, shaped as Grafana's
dashboard schema says, and every query answered by a real Prometheus scraping `baton up`
(under load, and after one abandoned KV reservation, so the failures panel has data)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import grpc
import helm_python as helm
import kubernetes_validate
import yaml
from cluster_harness import NAMESPACE, ROOT, Load
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard
from serving_harness import wait_until

from baton.protos import worker_pb2, worker_pb2_grpc

DASHBOARD = ROOT / "charts" / "baton" / "dashboards" / "baton.json"
# What Grafana puts in for the variables when the test's namespace and model are picked.
VARIABLES = {"$namespace": NAMESPACE, "$model": "tiny-llama-v1", "$__rate_interval": "15s"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def test_the_shipped_json_is_what_the_builder_makes():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "dashboard.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_json_decodes_into_grafanas_dashboard_schema_without_loss():
    """grafana-foundation-sdk's types are generated from Grafana's dashboard schema; decoding
    drops every key the schema does not define, so a lossless round trip means no unknown
    field anywhere (panels, targets, variables, field config)."""
    data = dashboard()
    decoded = json.loads(json.dumps(Dashboard.from_json(data), cls=JSONEncoder))
    assert decoded == data
    assert data["uid"] and data["title"] == "Baton" and data["schemaVersion"] >= 39


def test_panels_cover_the_serving_metrics_per_role_without_overlapping():
    titles = {p["title"] for p in panels()}
    assert {"Time to first token", "Time per output token", "End-to-end request latency",
            "Running requests", "Waiting requests", "KV cache usage", "Prefix cache hit rate",
            "KV transfer latency", "KV transfer failures"} <= titles
    cells = set()
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    for panel in panels():
        for target in panel["targets"]:
            assert "by (role" in target["expr"] or "by (le, role)" in target["expr"], target
            assert "{{role}}" in target["legendFormat"]


def test_the_chart_ships_it_in_a_configmap_for_grafanas_sidecar():
    with helm.Chart.load(ROOT / "charts" / "baton") as chart:
        manifests = chart.render({"metrics": {"dashboard": {"enabled": True, "folder": "LLM"}}},
                                 name="baton", namespace="baton-system")
        default = chart.render(None, name="baton", namespace="baton-system")
    docs = [doc for path, text in manifests.items() if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]
    (config_map,) = [d for d in docs if d["metadata"]["name"] == "baton-dashboard"]
    kubernetes_validate.validate(config_map, "1.30", strict=True)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert json.loads(config_map["data"]["baton.json"]) == dashboard()
    assert "baton-dashboard" not in "".join(default.values())  # off unless asked for


def substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"an unknown variable in {expr}"
    return expr


def abandon_a_reservation(decode_grpc: str) -> None:
    """Reserve KV on the decode worker and never fill it, as a router that died between its
    Reserve and Prefill calls would: the handoff fails with reason `expired`."""
    with grpc.insecure_channel(decode_grpc) as channel:
        worker_pb2_grpc.WorkerStub(channel).Reserve(worker_pb2.ReserveRequest(
            request_id="abandoned", num_prompt_tokens=16, ttl_seconds=1.0), timeout=30)


def test_every_query_is_answered_by_a_real_prometheus_under_load(monitored):
    prometheus = monitored.prometheus
    queries = [(p["title"], substitute(t["expr"])) for p in panels() for t in p["targets"]]

    def answered() -> dict[str, list]:
        results = {expr: prometheus.query(expr) for _, expr in queries}  # raises on a bad query
        return results if all(results.values()) else {}

    with Load(monitored.deployment, concurrency=4) as load:
        abandon_a_reservation(monitored.deployment.processes["decode-0"].grpc)
        results = wait_until(answered, timeout=120, what="every panel's query to have series")
    assert not load.errors, load.errors[:3]
    for title, expr in queries:
        for series in results[expr]:
            assert series["metric"].get("role"), f"{title}: a series without a role: {series}"
    roles = {s["metric"]["role"] for title, expr in queries if title == "Running requests"
             for s in results[expr]}
    assert roles == {"prefill", "decode", "router"}
    failures = next(expr for title, expr in queries if title == "KV transfer failures")
    assert [(s["metric"]["role"], s["metric"]["reason"]) for s in results[failures]] == [
        ("decode", "expired")]

    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"])
        assert match, variable["query"]
        values = prometheus.api(f"label/{match[2]}/values", **{"match[]": substitute(match[1])})
        assert VARIABLES[f"${variable['name']}"] in values, (variable["name"], values)
