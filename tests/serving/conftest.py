"""Deployments shared by the serving tests: started once per session, stopped at the end.

`disaggregated`: `baton up` with one prefill and one decode worker (gRPC KV transfer).
`disaggregated_ucx`: the same with the UCX KV transport (TCP on this CPU-only host).
`colocated`: `baton up --mode colocated` with one worker, behind an API key.
`served_embed`: `baton serve MODEL --task embed` (vLLM's drop-in: the router and the engine in
one process; it also serves embeddings).
Tests that kill processes start their own deployments (test_faults.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The tests import their helpers from this folder (serving_harness.py).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_harness import Deployment, baton_up  # noqa: E402

API_KEY = "test-key-0123456789"


@pytest.fixture(scope="session", autouse=True)
def _tiny_model_cache(tmp_path_factory):
    """Every process of the session writes and reads the tiny model in one private cache."""
    cache = tmp_path_factory.mktemp("baton-cache")
    old = os.environ.get("BATON_CACHE_DIR")
    os.environ["BATON_CACHE_DIR"] = str(cache)
    from baton.engine.tiny_model import ensure_tiny_model

    ensure_tiny_model()
    yield cache
    if old is None:
        os.environ.pop("BATON_CACHE_DIR", None)
    else:
        os.environ["BATON_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(_tiny_model_cache) -> Path:
    from baton.engine.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def disaggregated(_tiny_model_cache) -> Deployment:
    dep = baton_up("--mode", "disaggregated")
    yield dep
    dep.stop()


@pytest.fixture(scope="session")
def disaggregated_ucx(_tiny_model_cache) -> Deployment:
    dep = baton_up("--mode", "disaggregated", "--transport", "ucx")
    yield dep
    dep.stop()


@pytest.fixture(scope="session")
def colocated(_tiny_model_cache) -> Deployment:
    dep = baton_up("--mode", "colocated", api_key=API_KEY)
    yield dep
    dep.stop()


@pytest.fixture(scope="session")
def served_embed(_tiny_model_cache, tiny_model_dir) -> Deployment:
    dep = baton_up(str(tiny_model_dir), "--task", "embed", command="serve")
    yield dep
    dep.stop()


@pytest.fixture(scope="session", params=["disaggregated", "disaggregated_ucx", "colocated"])
def deployment(request) -> Deployment:
    return request.getfixturevalue(request.param)
