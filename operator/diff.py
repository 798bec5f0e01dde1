"""Which fields of a child object to patch: a three-way JSON merge patch (RFC 7386).

The operator sets a subset of every child's fields; the API server adds defaults and
other controllers add their own fields. `merge_patch(desired, live, last_applied)` returns
the smallest patch that makes `live` agree with `desired` wherever `desired` speaks, and
removes what the operator set last time (`last_applied`) but no longer wants. Fields it
never set are left alone, so a no-op resync produces an empty patch: no write, no churn.

Lists are replaced whole (merge-patch semantics); a list "agrees" when it has the same
length and each item agrees, so server defaults inside list items (a container's
`terminationMessagePath`) do not count as a difference.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# Fields another controller takes over when the operator stops setting them: with
# autoscaling on, the HPA or KEDA owns a Deployment's replicas. Dropping them from the
# desired object must release them, not delete them (which would reset replicas to 1).
RELEASED = frozenset({("spec", "replicas")})
LAST_APPLIED = "baton.dev/last-applied"


def agrees(live: Any, desired: Any) -> bool:
    """True when `live` has every value `desired` sets (extra live fields are ignored)."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(
            key in live and agrees(live[key], value) for key, value in desired.items())
    if isinstance(desired, list):
        return (isinstance(live, list) and len(live) == len(desired)
                and all(agrees(a, b) for a, b in zip(live, desired, strict=True)))
    if isinstance(desired, bool) or isinstance(live, bool):
        return live is desired
    if isinstance(desired, int | float) and isinstance(live, int | float):
        return float(live) == float(desired)
    return live == desired


def merge_patch(desired: Mapping[str, Any], live: Mapping[str, Any],
                last_applied: Mapping[str, Any] | None = None,
                _path: tuple[str, ...] = ()) -> dict:
    """The merge patch that brings `live` to `desired`; empty when they already agree.

    A key in `last_applied` but not in `desired` is removed (patched to null), unless its
    path is in RELEASED. No argument is changed.
    """
    last_applied = last_applied or {}
    patch: dict[str, Any] = {}
    for key, want in desired.items():
        have = live.get(key)
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            before = last_applied.get(key)
            sub = merge_patch(want, have, before if isinstance(before, Mapping) else {},
                              (*_path, key))
            if sub:
                patch[key] = sub
        elif key not in live or not agrees(have, want):
            patch[key] = want
    for key in last_applied:
        if key not in desired and key in live and (*_path, key) not in RELEASED:
            patch[key] = None
    return patch


def record(desired: Mapping[str, Any]) -> str:
    """The annotation value that remembers what was applied (stable: sorted, compact)."""
    return json.dumps(_without_record(desired), sort_keys=True, separators=(",", ":"))


def recorded(live: Mapping[str, Any]) -> dict:
    """What the operator applied last time, read back from the live object ({} if none)."""
    text = (live.get("metadata", {}).get("annotations") or {}).get(LAST_APPLIED)
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def with_record(desired: Mapping[str, Any]) -> dict:
    """`desired` plus the last-applied annotation describing it (a new dict)."""
    meta = dict(desired.get("metadata", {}))
    meta["annotations"] = {**meta.get("annotations", {}), LAST_APPLIED: record(desired)}
    return {**desired, "metadata": meta}


def _without_record(obj: Mapping[str, Any]) -> dict:
    meta = dict(obj.get("metadata", {}))
    annotations = {k: v for k, v in meta.get("annotations", {}).items() if k != LAST_APPLIED}
    if annotations:
        meta["annotations"] = annotations
    else:
        meta.pop("annotations", None)
    return {**obj, "metadata": meta}
