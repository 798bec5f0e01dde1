"""Baton's Grafana dashboard, built with grafana-foundation-sdk (types generated from Grafana
11.6's dashboard schema) into charts/baton/dashboards/baton.json, which the chart ships in a
ConfigMap for Grafana's dashboard sidecar (value `metrics.dashboard.enabled`).

    python scripts/dashboard.py           # write the JSON
    python scripts/dashboard.py --check   # exit 1 if the JSON differs from what this builds

Every panel shows one series per role (prefill, decode, colocated, router), filtered by the
`namespace` and `model` variables; rates use Grafana's `$__rate_interval`.
tests/cluster_parts/test_dashboard.py evaluates every query against a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    GridPos,
    VariableRefresh,
    VariableSort,
)

OUTPUT = Path(__file__).resolve().parents[1] / "charts" / "baton" / "dashboards" / "baton.json"
UID = "baton-serving"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
SELECTOR = 'namespace=~"$namespace", model_name=~"$model"'
RATE = "$__rate_interval"


def quantiles(histogram: str) -> list[tuple[str, str]]:
    """p50 and p99 per role of a `baton:` histogram."""
    return [(f"histogram_quantile({q}, sum by (le, role) "
             f"(rate(baton:{histogram}_bucket{{{SELECTOR}}}[{RATE}])))", f"{{{{role}}}} p{p}")
            for q, p in ((0.5, 50), (0.99, 99))]


def per_role(expr: str, legend: str = "{{role}}") -> list[tuple[str, str]]:
    return [(expr, legend)]


# (row, title, unit, description, [(PromQL, legend)]); two panels side by side per line.
PANELS = [
    ("Latency", "Time to first token", "s",
     "From a request's arrival to its first token, as each role sees it.",
     quantiles("time_to_first_token_seconds")),
    ("Latency", "Time per output token", "s",
     "Mean time between output tokens of finished requests.",
     quantiles("time_per_output_token_seconds")),
    ("Latency", "End-to-end request latency", "s",
     "From a request's arrival to its last token.",
     quantiles("e2e_request_latency_seconds")),
    ("Latency", "Finished requests", "reqps", "Requests finished per second, by finish reason.",
     per_role(f"sum by (role, finished_reason) (rate(baton:request_success_total{{{SELECTOR}}}"
              f"[{RATE}]))", "{{role}} {{finished_reason}}")),
    ("Load", "Running requests", "short",
     "Requests in the engines' running batches; the router's: requests it is serving.",
     per_role(f"sum by (role) (baton:num_requests_running{{{SELECTOR}}})")),
    ("Load", "Waiting requests", "short",
     "Requests waiting to be scheduled; the router's: waiting for decode capacity.",
     per_role(f"sum by (role) (baton:num_requests_waiting{{{SELECTOR}}})")),
    ("KV cache", "KV cache usage", "percentunit",
     "Share of KV blocks in use (requests and reservations): mean and fullest worker.",
     [(f"avg by (role) (baton:kv_cache_usage_perc{{{SELECTOR}}})", "{{role}} mean"),
      (f"max by (role) (baton:kv_cache_usage_perc{{{SELECTOR}}})", "{{role}} max")]),
    ("KV cache", "Prefix cache hit rate", "percentunit",
     "Share of looked-up prompt tokens found in the prefix cache.",
     per_role(f"sum by (role) (rate(baton:prefix_cache_hits_total{{{SELECTOR}}}[{RATE}])) / "
              f"sum by (role) (rate(baton:prefix_cache_queries_total{{{SELECTOR}}}[{RATE}]))")),
    ("KV transfer", "KV transfer latency", "s",
     "Duration of completed KV handoffs (prefill: sending, decode: receiving).",
     quantiles("kv_transfer_seconds")),
    ("KV transfer", "KV transfer failures", "short",
     "Failed KV handoffs per second, by reason.",
     per_role(f"sum by (role, reason) (rate(baton:kv_transfer_failures_total{{{SELECTOR}}}"
              f"[{RATE}]))", "{{role}} {{reason}}")),
    ("KV transfer", "KV transfer throughput", "Bps", "KV bytes moved by completed handoffs.",
     per_role(f"sum by (role) (rate(baton:kv_transfer_bytes_total{{{SELECTOR}}}[{RATE}]))")),
    ("KV transfer", "Reserved KV blocks", "short",
     "Decode blocks reserved for handoffs and not yet filled.",
     per_role(f"sum by (role) (baton:kv_transfer_reserved_blocks{{{SELECTOR}}})")),
]
WIDTH, HEIGHT = 12, 8


def variable(name: str, label: str, query: str) -> dashboard.QueryVariable:
    return (dashboard.QueryVariable(name).label(label).query(query).datasource(DATASOURCE)
            .multi(True).include_all(True).refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC))


def build() -> dict:
    """The dashboard as Grafana's JSON model."""
    board = (dashboard.Dashboard("Baton")
             .uid(UID).tags(["baton", "llm"]).refresh("30s").time("now-1h", "now")
             .description("Latency, load, KV cache and KV transfer of Baton deployments, per role.")
             .with_variable(dashboard.DatasourceVariable("datasource").label("Data source")
                            .type("prometheus"))
             .with_variable(variable("namespace", "Namespace",
                                     "label_values(baton:num_requests_running, namespace)"))
             .with_variable(variable(
                 "model", "Model",
                 'label_values(baton:num_requests_running{namespace=~"$namespace"}, model_name)')))
    y, row, column = 0, None, 0
    for row_title, title, unit, description, targets in PANELS:
        if row_title != row:
            y += HEIGHT if column else 0
            board = board.with_row(dashboard.Row(row_title).grid_pos(GridPos(h=1, w=24, x=0, y=y)))
            row, column, y = row_title, 0, y + 1
        panel = (timeseries.Panel().title(title).description(description).unit(unit)
                 .datasource(DATASOURCE).min(0)
                 .grid_pos(GridPos(h=HEIGHT, w=WIDTH, x=column * WIDTH, y=y)))
        for i, (expr, legend) in enumerate(targets):
            panel = panel.with_target(prometheus.Dataquery().expr(expr).legend_format(legend)
                                      .ref_id("ABCDEFGH"[i]).datasource(DATASOURCE))
        board = board.with_panel(panel)
        column = (column + 1) % 2
        y += HEIGHT if column == 0 else 0
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the JSON is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run python scripts/dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
