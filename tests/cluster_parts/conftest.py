"""Fixtures for the cluster parts run for real (see cluster_harness.py).

`monitored`: one disaggregated `baton up` (a prefill, a decode worker and the router, each
engine admitting at most two sequences so that a few concurrent requests queue), scraped
by a real Prometheus; shared by the whole session.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster_harness import NAMESPACE, Monitored, example_service  # noqa: E402
from prometheus_server import Prometheus, Target  # noqa: E402
from serving_harness import baton_up, free_port, wait_until  # noqa: E402

from baton.operator.builders import common  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_cache(tmp_path_factory):
    """Every process of the session writes and reads the tiny model in one private cache."""
    cache = tmp_path_factory.mktemp("baton-cache")
    old = os.environ.get("BATON_CACHE_DIR")
    os.environ["BATON_CACHE_DIR"] = str(cache)
    from baton.engine.tiny_model import ensure_tiny_model

    yield ensure_tiny_model()
    if old is None:
        os.environ.pop("BATON_CACHE_DIR", None)
    else:
        os.environ["BATON_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def monitored(tiny_model_cache, tmp_path_factory) -> Monitored:
    svc = example_service()
    dep = baton_up("--mode", "disaggregated", "--max-num-seqs", "2")
    targets, pods = [], {}
    try:
        for name, process in dep.processes.items():
            role = name.split("-")[0]  # "prefill-0" -> prefill; "router"
            service = common.child_name(svc, role)
            pods[name] = f"{service}-{name.rsplit('-', 1)[-1] if role != 'router' else 0}"
            url = process.metrics_url if role != "router" else f"{dep.url}/metrics"
            address, _, path = url.removeprefix("http://").partition("/")
            targets.append(Target(address, "/" + path, {
                "namespace": NAMESPACE, "service": service, "job": service, "pod": pods[name],
                "endpoint": "http" if role == "router" else "metrics"}))
        prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), free_port(), targets)
    except BaseException:
        dep.stop()
        raise
    try:
        wait_until(prometheus.targets_up, timeout=60, what="every target to be scraped")
        yield Monitored(dep, prometheus, svc, pods)
    finally:
        prometheus.stop()
        dep.stop()


