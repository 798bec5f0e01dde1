"""The autoscaling queries, evaluated by a real Prometheus scraping a running `baton up`.

The KEDA queries are the ones the operator writes into its ScaledObjects for
`examples/autoscaling-keda.yaml`; the HPA path is the chart's prometheus-adapter rule, read
from the rendered chart and expanded the way prometheus-adapter expands it for an HPA's
Pods metric. Each must select live series, and those series must rise under load and fall
back when it stops. vLLM's names (docs/metrics.md) are stored beside Baton's, equal.
"""

from __future__ import annotations

import re
import time

import helm_python as helm
import yaml
from cluster_harness import NAMESPACE, ROOT, Load, Monitored
from serving_harness import wait_until

from baton.operator.builders import autoscaling, common
from baton.operator.config import OperatorConfig
from baton.operator.spec import DEFAULT_TARGETS

TIMEOUT = 90


def keda_query(monitored: Monitored, role: str) -> str:
    scaled = autoscaling.scaled_object(monitored.service, role, OperatorConfig())
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    return trigger["metadata"]["query"]


def value(monitored: Monitored, expr: str, at: float | None = None) -> float | None:
    """The single value `expr` evaluates to (at time `at`), or None for an empty vector."""
    params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
    result = monitored.prometheus.api("query", **params)["result"]
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None


def test_keda_decode_query_rises_under_load_and_falls_back(monitored):
    query = keda_query(monitored, "decode")
    assert 'service="llama-keda-decode"' in query and f'namespace="{NAMESPACE}"' in query
    wait_until(lambda: value(monitored, query) == 0, timeout=TIMEOUT, what=f"{query} idle at 0")
    with Load(monitored.deployment) as load:
        wait_until(lambda: (value(monitored, query) or 0) >= 1, timeout=TIMEOUT,
                   what=f"{query} to rise under load")
    assert not load.errors, load.errors[:3]
    wait_until(lambda: value(monitored, query) == 0, timeout=TIMEOUT, what=f"{query} back to 0")


def test_keda_query_of_a_sleeping_prefill_fleet_follows_the_routers_queue(monitored):
    """minReplicas 0: with no prefill pod scraped, the query answers the router's waiting
    requests, so the first queued request wakes the fleet."""
    query = keda_query(monitored, "prefill")
    router_waiting = (f'sum(baton:num_requests_waiting{{namespace="{NAMESPACE}",'
                      f'service="{common.child_name(monitored.service, "router")}"}})')
    assert router_waiting in query
    prometheus = monitored.prometheus
    awake = list(prometheus.targets)
    # While the fleet runs, the query is the fleet's own sum (a series exists, even at 0).
    prefill_own = query.split(" or ")[0]
    wait_until(lambda: value(monitored, prefill_own) is not None, timeout=TIMEOUT,
               what="the prefill fleet's series")
    prometheus.set_targets([t for t in awake if not t.labels["service"].endswith("-prefill")])
    try:
        wait_until(lambda: value(monitored, prefill_own) is None, timeout=TIMEOUT,
                   what="the prefill series to go stale")
        with Load(monitored.deployment) as load:
            at = wait_until(lambda: (time.time() if (value(monitored, router_waiting) or 0) >= 1
                                     else None), timeout=TIMEOUT, what="the router to queue")
            # Both evaluated at one instant: the query answers exactly the router's queue.
            assert value(monitored, query, at) == value(monitored, router_waiting, at) >= 1
        assert not load.errors, load.errors[:3]
        wait_until(lambda: value(monitored, query) == 0, timeout=TIMEOUT, what=f"{query} at 0")
    finally:
        prometheus.set_targets(awake)


def adapter_rules() -> list[dict]:
    """prometheus-adapter's rules, as the chart renders them."""
    with helm.Chart.load(ROOT / "charts" / "baton") as chart:
        manifests = chart.render({"metrics": {"adapterRules": {"enabled": True}}},
                                 name="baton", namespace="baton-system")
    docs = [doc for path, text in manifests.items() if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]
    (config_map,) = [d for d in docs if d["metadata"]["name"].endswith("-adapter-rules")]
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


def expand(template: str, series: str, matchers: str, group_by: str) -> str:
    """prometheus-adapter's metricsQuery template, for the placeholders the rule uses."""
    placeholders = set(re.findall(r"<<[^>]*>>", template))
    assert placeholders <= {"<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"}, placeholders
    return (template.replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers)
            .replace("<<.GroupBy>>", group_by))


def test_adapter_rule_serves_every_autoscaling_metric_per_pod_and_follows_load(monitored):
    (rule,) = adapter_rules()
    prometheus = monitored.prometheus
    # Discovery: the series the rule's seriesQuery finds, renamed as the rule says.
    wait_until(lambda: len(prometheus.api("series", **{"match[]": rule["seriesQuery"]})) >= 5,
               timeout=TIMEOUT, what="the rule's series")
    found = prometheus.api("series", **{"match[]": rule["seriesQuery"]})
    pattern = re.compile(rule["name"]["matches"])
    exposed = {pattern.sub(rule["name"]["as"].replace("${1}", r"\1"), s["__name__"]) for s in found}
    # Exactly the names the operator's HPAs ask for, one per metric the CRD accepts.
    assert exposed == {autoscaling.adapter_metric_name(m) for m in DEFAULT_TARGETS}
    for series in found:
        for label, resource in rule["resources"]["overrides"].items():
            assert series.get(label), f"{series} lacks the {label} label ({resource['resource']})"

    # What an HPA on the decode Deployment asks: each metric for its pods in its namespace.
    decode_pod = monitored.pods["decode-0"]
    matchers = f'namespace="{NAMESPACE}",pod=~"{decode_pod}"'

    def per_pod(metric: str) -> float | None:
        result = prometheus.query(expand(rule["metricsQuery"], f"baton:{metric}", matchers, "pod"))
        assert [r["metric"] for r in result] in ([], [{"pod": decode_pod}]), result
        return result[0]["value"] if result else None

    for metric in DEFAULT_TARGETS:
        wait_until(lambda m=metric: per_pod(m) == 0, timeout=TIMEOUT, what=f"{metric} idle at 0")
    with Load(monitored.deployment) as load:
        for metric in ("num_requests_running", "kv_cache_usage_perc"):
            wait_until(lambda m=metric: (per_pod(m) or 0) > 0, timeout=TIMEOUT,
                       what=f"baton_{metric} of {decode_pod} to rise under load")
    assert not load.errors, load.errors[:3]
    for metric in DEFAULT_TARGETS:
        wait_until(lambda m=metric: per_pod(m) == 0, timeout=TIMEOUT, what=f"{metric} back to 0")


def test_vllm_names_hold_the_baton_values_in_prometheus(monitored):
    """A dashboard written for vLLM selects series: each `vllm:` series is stored beside its
    `baton:` one with the same labels and, at one instant (the same scrape), the same value."""
    from baton.metrics import VLLM_NAMES

    monitored.deployment.client().completions.create(model="tiny-llama-v1", prompt="Hello", max_tokens=3)
    wait_until(lambda: monitored.prometheus.query('vllm:request_success_total{role="router"}'),
               timeout=TIMEOUT, what="the router's vllm:request_success_total in Prometheus")
    series = monitored.prometheus.query('{__name__=~"(baton|vllm):.+"}')
    by_key = {(s["metric"]["__name__"], frozenset((k, v) for k, v in s["metric"].items() if k != "__name__")):
              s["value"] for s in series}
    compared = set()
    for (name, labels), v in by_key.items():
        for family, aliases in VLLM_NAMES.items():
            suffix = name[len(family):]
            if name.startswith(family) and suffix in ("", "_total", "_count", "_sum", "_bucket"):
                for alias in aliases:
                    assert by_key[(alias + suffix, labels)] == v, (name, alias, dict(labels))
                    compared.add((alias + suffix, dict(labels)["role"]))
    for role in ("prefill", "decode"):
        assert ("vllm:gpu_cache_usage_perc", role) in compared and ("vllm:num_preemptions_total", role) in compared
    for role in ("prefill", "decode", "router"):
        assert ("vllm:time_to_first_token_seconds_count", role) in compared
