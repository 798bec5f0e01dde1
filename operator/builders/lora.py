"""What spec.lora adds to every worker and cell pod: the adapters' volumes, fetches and flags.

Each adapter gets a volume of its own (`lora-<i>`, from its source as the model gets
`model`), mounted read-only at `/adapters/<i>` in the worker container; a uri source is
downloaded into an emptyDir by an init container (`fetch-lora-<i>`, the model's fetch
script). The worker serves them with `--enable-lora --lora-modules NAME=DIR ...`: every
role, and every engine of a cell (`cells.py`), gets the same list, so prefill and decode
hold the same adapters.
"""

from __future__ import annotations

from baton.operator.builders import common
from baton.operator.spec import InferenceService

ADAPTERS_DIR = "/adapters"


def _dir(i: int) -> str:
    return f"{ADAPTERS_DIR}/{i}"


def args(svc: InferenceService) -> list[str]:
    """Worker flags (none without spec.lora)."""
    lora = svc.lora
    if lora is None:
        return []
    out = ["--enable-lora", "--max-loras", str(lora.max_loras), "--max-lora-rank", str(lora.max_lora_rank)]
    if lora.max_cpu_loras is not None:
        out += ["--max-cpu-loras", str(lora.max_cpu_loras)]
    if lora.adapters:
        out += ["--lora-modules"]
        for i, adapter in enumerate(lora.adapters):
            path = _dir(i) + (f"/{adapter.source.path}" if adapter.source.kind == "pvc" and adapter.source.path else "")
            out.append(f"{adapter.name}={path}")
    return out


def volumes(svc: InferenceService) -> list[dict]:
    """The adapters' volumes, and the fetch script's ConfigMap if only adapters need it."""
    adapters = svc.lora.adapters if svc.lora else ()
    out = [common.model_volume(svc, a.source, f"lora-{i}") for i, a in enumerate(adapters)]
    if svc.model.source.kind != "uri" and common.fetches(svc):
        out.append({"name": "config",
                    "configMap": {"name": common.child_name(svc, "config"), "defaultMode": 0o555}})
    return out


def mounts(svc: InferenceService) -> list[dict]:
    adapters = svc.lora.adapters if svc.lora else ()
    return [{"name": f"lora-{i}", "mountPath": _dir(i), "readOnly": True} for i in range(len(adapters))]


def fetch_containers(svc: InferenceService, image: str) -> list[dict]:
    """One init container per uri adapter."""
    adapters = svc.lora.adapters if svc.lora else ()
    return [common.fetch_container(svc, image, tokenizer_only=False, source=a.source, volume=f"lora-{i}",
                                   dest=_dir(i), name=f"fetch-lora-{i}")
            for i, a in enumerate(adapters) if a.source.kind == "uri"]
