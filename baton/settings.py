"""Environment switches, typed and in one place. Nothing else reads `os.environ`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where Baton writes generated files (the tiny model): $BATON_CACHE_DIR or ~/.cache/baton."""
    value = os.environ.get("BATON_CACHE_DIR")
    if value:
        return Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "baton"


def api_key() -> str | None:
    """The router's bearer token when --api-key is not given: $BATON_API_KEY."""
    return os.environ.get("BATON_API_KEY") or None


def log_level(default: str = "INFO") -> str:
    return os.environ.get("BATON_LOG_LEVEL", default).upper()


def kv_fault() -> str | None:
    """Test-only KV-transfer fault injection point: $BATON_KV_FAULT (see baton.kvtransfer.faults)."""
    return os.environ.get("BATON_KV_FAULT") or None


def pod_namespace() -> str | None:
    """The namespace a pod runs in ($POD_NAMESPACE from the downward API, or the
    service-account mount); None outside Kubernetes."""
    value = os.environ.get("POD_NAMESPACE")
    if value:
        return value
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.exists() else None


def pod_ip() -> str | None:
    """This pod's IP ($POD_IP from the downward API); None outside Kubernetes."""
    return os.environ.get("POD_IP") or None
