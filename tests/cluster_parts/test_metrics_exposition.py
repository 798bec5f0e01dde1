"""Workers expose `baton:` names with their colons, whatever format the scraper asks for."""

from __future__ import annotations

import urllib.request

from prometheus_client import CollectorRegistry, Gauge
from serving_harness import free_port

from baton.metrics import start_metrics_server

# What Prometheus 2.42 sends: OpenMetrics first, the text format as a fallback.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def test_a_prometheus_scrape_gets_the_text_format_with_colons_kept():
    registry = CollectorRegistry()
    Gauge("baton:num_requests_running", "doc", ["role"], registry=registry).labels("decode").set(3)
    port = free_port()
    server, thread = start_metrics_server(port, "127.0.0.1", registry)
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                         headers={"Accept": PROMETHEUS_ACCEPT})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read().decode()
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    finally:
        server.shutdown()
        thread.join(timeout=5)
    assert 'baton:num_requests_running{role="decode"} 3.0' in body.splitlines()
