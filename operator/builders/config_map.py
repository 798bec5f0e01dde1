"""The ConfigMap that carries the model fetch script for uri sources."""

from __future__ import annotations

from importlib import resources

from baton.operator.builders import common
from baton.operator.spec import InferenceService


def fetch_script() -> str:
    """Source of operator/fetch_model.py, the program the fetch-model init containers run."""
    return resources.files("baton.operator").joinpath("fetch_model.py").read_text()


def config_map(svc: InferenceService) -> dict:
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": common.metadata(svc, "config"),
        "data": {"fetch_model.py": fetch_script(), "model-uri": svc.model.source.uri or ""},
    }
