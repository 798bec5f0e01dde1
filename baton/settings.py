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
    """The router's bearer token unless --api-key-file names a file: $BATON_API_KEY."""
    return os.environ.get("BATON_API_KEY") or None


def log_level(default: str = "INFO") -> str:
    return os.environ.get("BATON_LOG_LEVEL", default).upper()


def kv_fault() -> str | None:
    """Test-only KV-transfer fault injection point: $BATON_KV_FAULT (see baton.kvtransfer.faults)."""
    return os.environ.get("BATON_KV_FAULT") or None


def ucx_progress_mode() -> str | None:
    """UCXX's own progress-mode switch, $UCXPY_PROGRESS_MODE, read here so that Baton knows
    the mode UCXX will run in when no --ucx-progress-mode is given."""
    return os.environ.get("UCXPY_PROGRESS_MODE") or None


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


def _unless_zero(value: str) -> bool:
    return value != "0"


def _only_one(value: str) -> bool:
    return value == "1"


# BATON_* spelling -> (KernelConfig field, parser). Each overrides that field's default for
# engines built without an explicit `kernel_config` (engine/config.py, `KernelConfig`).
KERNEL_SWITCHES = {
    "BATON_PDL": ("pdl", _unless_zero),
    "BATON_PREFETCH_MB": ("prefetch_mb", float),
    "BATON_PREFETCH_MODE": ("prefetch_mode", int),
    "BATON_FUSE_NORMS": ("fuse_norms", _unless_zero),
    "BATON_ROPE_EPILOGUE": ("rope_epilogue", _unless_zero),
    "BATON_MERGE_IN_SPLITS": ("merge_in_splits", _unless_zero),
    "BATON_SIDE_STREAM_INPUTS": ("side_stream_inputs", _only_one),
}


def kernel_switches() -> dict[str, object]:
    """The kernel switches set in the environment, as {KernelConfig field: value}: the
    overrides an engine without an explicit `kernel_config` starts from. BATON_PDL=0,
    BATON_FUSE_NORMS=0, BATON_ROPE_EPILOGUE=0, BATON_MERGE_IN_SPLITS=0 turn those off;
    BATON_SIDE_STREAM_INPUTS=1 turns it on; BATON_PREFETCH_MB and BATON_PREFETCH_MODE are numbers."""
    switches = {}
    for name, (field, parse) in KERNEL_SWITCHES.items():
        value = os.environ.get(name)
        if value is not None:
            try:
                switches[field] = parse(value)
            except ValueError as exc:
                raise ValueError(f"{name}={value!r} is not a number") from exc
    return switches
