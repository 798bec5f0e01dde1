"""The `InferenceService` spec as typed, frozen values.

`parse(body)` applies the CRD's defaults (`crd.apply_defaults`), then reads the spec into
the dataclasses below. The API server has already validated the object against the CRD;
`parse` re-checks only what it needs to build a coherent model (the cross-field rules),
so that an object that slipped past validation (CEL off on an old cluster, an edit
before the CRD was upgraded) becomes a `SpecError` with a message, never a crash.

Values taken from the spec that are dicts or lists (resources, tolerations, affinity,
env) are deep copies, and builders copy them again before emitting: nothing here is
shared with the caller's body.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from baton.operator import crd, quantity

WORKER_ROLES = ("prefill", "decode", "colocated")
ROLES_BY_MODE = {"disaggregated": ("prefill", "decode"), "colocated": ("colocated",)}
# Old spellings of a role's spec field, still accepted: `spec.worker` is `spec.colocated`.
ALIASES = {"worker": "colocated"}
# Per-pod targets when autoscaling.target is left out: a few queued requests per worker,
# a busy batch, or 80% of the KV pool.
DEFAULT_TARGETS = {"num_requests_waiting": 4.0, "num_requests_running": 32.0,
                   "kv_cache_usage_perc": 0.8}


class SpecError(ValueError):
    """The spec cannot be served as written; the message names the field and the fix."""


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str


@dataclass(frozen=True)
class ModelSource:
    """Exactly one of `claim_name`, `host_path`, `uri` is set (`kind` says which)."""

    kind: str  # "pvc" | "hostPath" | "uri"
    claim_name: str | None = None
    path: str = ""
    host_path: str | None = None
    uri: str | None = None
    credentials: SecretKeyRef | None = None
    size_limit: str | None = None


@dataclass(frozen=True)
class Model:
    source: ModelSource
    served_name: str
    dtype: str
    max_model_len: int | None
    quantization: str | None = None  # None: as the checkpoint's config.json says
    kv_cache_dtype: str = "auto"  # "auto" or "fp8" (the spec's "fp8_e4m3" is read as "fp8")


@dataclass(frozen=True)
class LoRAAdapter:
    name: str  # what clients send as `model`
    source: ModelSource  # fetched like the model's (pvc, hostPath or uri)


@dataclass(frozen=True)
class LoRA:
    """spec.lora: adapters every worker role serves from the start, and the engine's limits."""

    adapters: tuple[LoRAAdapter, ...]
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int | None = None


@dataclass(frozen=True)
class Engine:
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    gpu_memory_utilization: float
    enable_prefix_caching: bool
    num_gpu_blocks_override: int | None
    kv_cache_memory_gb: float | None
    extra_args: tuple[str, ...]
    tensor_parallel_size: int = 1
    speculative_config: str | None = None  # --speculative-config's JSON (vLLM's keys); None: off


@dataclass(frozen=True)
class Autoscaling:
    min_replicas: int
    max_replicas: int
    metric: str
    target: float


@dataclass(frozen=True)
class Placement:
    """Pod-template fields shared by every role; dict/list values are private copies."""

    resources: dict
    node_selector: dict
    tolerations: list
    affinity: dict | None
    env: list


@dataclass(frozen=True)
class Role:
    name: str  # "prefill" | "decode" | "colocated"
    replicas: int
    engine: Engine
    autoscaling: Autoscaling | None
    shm_size: str
    placement: Placement

    @property
    def gpus(self) -> int:
        """GPUs per pod, from the nvidia.com/gpu limit (0 when none; the worker builder sets
        it to `engine.tensor_parallel_size` above 1)."""
        value = self.placement.resources.get("limits", {}).get("nvidia.com/gpu", "0")
        return int(quantity.parse(value)[0])


@dataclass(frozen=True)
class Cells:
    """`spec.cells`: pods of `prefill_engines` prefill and `decode_engines` decode engines
    (`baton serve-cell`), `replicas` of them, scaled as units."""

    replicas: int
    gpus_per_engine: int  # 0: CPU engines; 1: engine k on the pod's GPU k
    prefill_engines: int
    decode_engines: int
    prefill: Engine
    decode: Engine
    autoscaling: Autoscaling | None
    shm_size: str
    placement: Placement

    @property
    def engines(self) -> int:
        return self.prefill_engines + self.decode_engines

    @property
    def gpus(self) -> int:
        """GPUs each cell's pod requests."""
        return self.engines * self.gpus_per_engine


# The longest child name of a service with cells (`NAME-cell-prefill`, a Service).
CELL_SUFFIX = "-cell-prefill"


@dataclass(frozen=True)
class Router:
    replicas: int
    image: str | None
    api_key: SecretKeyRef | None
    routing_policy: str
    max_queue: int
    service_type: str
    placement: Placement
    tool_call_parser: str | None = None  # None: tool_choice auto is refused
    trust_request_chat_template: bool = False  # False: a request's own chat_template is a 400


@dataclass(frozen=True)
class Rdma:
    resource_name: str
    count: int
    networks: tuple[str, ...]


@dataclass(frozen=True)
class KVTransfer:
    """`spec.kvTransfer`: the data plane, and UCX/RDMA settings where it uses UCX."""

    transport: str  # one of crd.TRANSPORTS
    ucx_tls: tuple[str, ...] = ()  # empty: UCX's own choice (or RDMA_TLS with rdma)
    ucx_net_devices: tuple[str, ...] = ()
    ucx_progress_mode: str | None = None
    rdma: Rdma | None = None

    @property
    def uses_ucx(self) -> bool:
        return self.transport in ("ucx", "auto")


@dataclass(frozen=True)
class InferenceService:
    """One InferenceService: identity (for owner references) plus its parsed spec."""

    name: str
    namespace: str
    uid: str
    generation: int
    model: Model
    image: str | None
    image_pull_policy: str | None
    image_pull_secrets: tuple[str, ...]
    mode: str
    roles: tuple[Role, ...]  # the worker fleets this mode runs, in a fixed order
    router: Router
    kv_transfer: KVTransfer
    autoscaling_engine: str
    network_policy: bool
    otlp_endpoint: str | None = None  # spec.tracing.otlpEndpoint; None: tracing off
    cells: Cells | None = None  # spec.cells (disaggregated mode); None: no cells
    lora: LoRA | None = None  # spec.lora; None: the workers run without LoRA
    # spec.compileCache as a pod volume's source ({"persistentVolumeClaim": ...} or
    # {"hostPath": ...}); None: an emptyDir
    compile_cache: dict | None = None

    @property
    def transport(self) -> str:
        return self.kv_transfer.transport

    def role(self, name: str) -> Role:
        for role in self.roles:
            if role.name == name:
                return role
        raise KeyError(f"{self.name} runs no {name} role in mode {self.mode}")

    @property
    def scaled(self) -> tuple[str, ...]:
        """The components (roles, "cell") with Deployments of their own, in build order."""
        return tuple(role.name for role in self.roles) + (("cell",) if self.cells else ())

    def autoscaling_of(self, component: str) -> Autoscaling | None:
        """The autoscaling block of a role or of the cells ("cell")."""
        return self.cells.autoscaling if component == "cell" and self.cells else self.role(component).autoscaling


def _field(data: Mapping[str, Any], key: str, path: str, kind: type | tuple[type, ...]) -> Any:
    if key not in data:
        raise SpecError(f"{path}.{key} is required")
    value = data[key]
    # bool is an int in Python; a boolean is never a valid count.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _types(kind)):
        raise SpecError(f"{path}.{key} has the wrong type ({type(value).__name__})")
    return value


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _optional(data: Mapping[str, Any], key: str, path: str, kind: type | tuple) -> Any:
    return _field(data, key, path, kind) if data.get(key) is not None else None


def _secret_ref(data: Mapping[str, Any] | None) -> SecretKeyRef | None:
    return None if data is None else SecretKeyRef(name=data["name"], key=data["key"])


def _source(data: Mapping[str, Any], where: str = "model.source") -> ModelSource:
    kinds = [kind for kind in ("pvc", "hostPath", "uri") if kind in data]
    if len(kinds) != 1:
        raise SpecError(f"set exactly one of {where}.pvc, {where}.hostPath, "
                        f"{where}.uri (found {', '.join(kinds) or 'none'})")
    credentials = _secret_ref(data.get("credentialsSecretRef"))
    if credentials and kinds[0] != "uri":
        raise SpecError(f"{where}.credentialsSecretRef applies only to uri sources")
    if kinds[0] == "pvc":
        pvc = data["pvc"]
        path = str(pvc.get("path", "")).strip("/")
        if ".." in path.split("/"):
            raise SpecError(f"{where}.pvc.path must stay inside the volume (no '..')")
        return ModelSource(kind="pvc", claim_name=pvc["claimName"], path=path)
    if kinds[0] == "hostPath":
        return ModelSource(kind="hostPath", host_path=data["hostPath"])
    limit = data.get("sizeLimit")
    return ModelSource(kind="uri", uri=data["uri"], credentials=credentials,
                       size_limit=_quantity(limit, f"spec.{where}.sizeLimit") if limit else None)


def _lora(data: Mapping[str, Any] | None, served_name: str) -> LoRA | None:
    if data is None:
        return None
    adapters = []
    for i, item in enumerate(data.get("adapters", ())):
        adapters.append(LoRAAdapter(item["name"], _source(item["source"], f"lora.adapters[{i}].source")))
    names = [a.name for a in adapters]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise SpecError(f"lora.adapters names must be distinct ({', '.join(duplicated)} repeats)")
    if served_name in names:
        raise SpecError(f"lora.adapters may not use the model's served name {served_name!r}")
    max_cpu = data.get("maxCpuLoras")
    if max_cpu is not None and max_cpu < data["maxLoras"]:
        raise SpecError(f"lora.maxCpuLoras ({max_cpu}) must be at least lora.maxLoras ({data['maxLoras']})")
    return LoRA(tuple(adapters), data["maxLoras"], data["maxLoraRank"], max_cpu)


def _engine(data: Mapping[str, Any], path: str) -> Engine:
    return Engine(
        block_size=_field(data, "blockSize", path, int),
        max_num_seqs=_field(data, "maxNumSeqs", path, int),
        max_num_batched_tokens=_field(data, "maxNumBatchedTokens", path, int),
        gpu_memory_utilization=float(_field(data, "gpuMemoryUtilization", path, (int, float))),
        enable_prefix_caching=_field(data, "enablePrefixCaching", path, bool),
        num_gpu_blocks_override=_optional(data, "numGpuBlocksOverride", path, int),
        kv_cache_memory_gb=_optional(data, "kvCacheMemoryGB", path, (int, float)),
        extra_args=tuple(str(arg) for arg in data.get("extraArgs", ())),
        tensor_parallel_size=_optional(data, "tensorParallelSize", path, int) or 1,
        speculative_config=_speculative(data.get("speculative"), f"{path}.speculative"),
    )


# engine.speculative's fields -> --speculative-config's keys (vLLM's)
_SPECULATIVE_KEYS = {"method": "method", "numSpeculativeTokens": "num_speculative_tokens", "model": "model",
                     "promptLookupMin": "prompt_lookup_min", "promptLookupMax": "prompt_lookup_max",
                     "shortenByBatchSize": "shorten_by_batch_size", "disableByBatchSize": "disable_by_batch_size"}


def _speculative(data: Mapping[str, Any] | None, path: str) -> str | None:
    """The JSON the workers' --speculative-config takes (keys sorted: a spec rolls pods only
    when it changes)."""
    if data is None:
        return None
    unknown = set(data) - set(_SPECULATIVE_KEYS)
    if unknown:
        raise SpecError(f"{path} has unknown fields {sorted(unknown)}")
    _field(data, "numSpeculativeTokens", path, int)
    config = {_SPECULATIVE_KEYS[k]: v for k, v in data.items() if v is not None}
    config.setdefault("method", "ngram")
    if (config["method"] == "draft_model") != ("model" in config):
        raise SpecError(f"{path}.model is required with method draft_model and refused with ngram")
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def _refuse_speculation(engine: Engine, path: str) -> None:
    """A prefill engine's requests end at their first token, which no draft speeds up: its
    engine.speculative is refused (as the CRD's CEL does), not ignored."""
    if engine.speculative_config is not None:
        raise SpecError(f"{path}.speculative is refused: prefill engines end each request at its first "
                        "token, so they never speculate (a draft model would only take memory); set it on "
                        f"{path.replace('prefill', 'decode')}.speculative")


def _autoscaling(data: Mapping[str, Any] | None, path: str) -> Autoscaling | None:
    if data is None:
        return None
    low = _field(data, "minReplicas", path, int)
    high = _field(data, "maxReplicas", path, int)
    if low > high:
        raise SpecError(f"{path}.minReplicas ({low}) must not exceed maxReplicas ({high})")
    metric = _field(data, "metric", path, str)
    if metric not in DEFAULT_TARGETS:
        raise SpecError(f"{path}.metric {metric!r} is not one of {', '.join(DEFAULT_TARGETS)}")
    target = data.get("target")
    target = DEFAULT_TARGETS[metric] if target is None else float(target)
    return Autoscaling(min_replicas=low, max_replicas=high, metric=metric, target=target)


def _quantity(value: Any, path: str) -> str:
    """Canonical form, so the API server stores exactly what the operator sends."""
    try:
        return quantity.canonical(value)
    except (ValueError, TypeError):
        raise SpecError(f"{path}: {value!r} is not a quantity (e.g. 2, 500m, 16Gi)") from None


def _resources(data: Mapping[str, Any] | None, path: str) -> dict:
    return {section: {name: _quantity(value, f"{path}.{section}.{name}")
                      for name, value in amounts.items()}
            for section, amounts in (data or {}).items() if section in ("limits", "requests")}


def _placement(data: Mapping[str, Any], path: str) -> Placement:
    return Placement(
        resources=_resources(data.get("resources"), f"{path}.resources"),
        node_selector=dict(data.get("nodeSelector") or {}),
        tolerations=copy.deepcopy(list(data.get("tolerations") or [])),
        affinity=copy.deepcopy(data.get("affinity")) or None,
        env=copy.deepcopy(list(data.get("env") or [])),
    )


def _role(name: str, key: str, data: Mapping[str, Any]) -> Role:
    """Role `name`, read from `spec.<key>` (`key` is the name or its old spelling)."""
    path = f"spec.{key}"
    role = Role(
        name=name,
        replicas=_field(data, "replicas", path, int),
        engine=_engine(data.get("engine", {}), f"{path}.engine"),
        autoscaling=_autoscaling(data.get("autoscaling"), f"{path}.autoscaling"),
        shm_size=_quantity(_field(data, "shmSize", path, str), f"{path}.shmSize"),
        placement=_placement(data, path),
    )
    if name == "prefill":
        _refuse_speculation(role.engine, f"{path}.engine")
    tp = role.engine.tensor_parallel_size
    if tp < 1:
        raise SpecError(f"{path}.engine.tensorParallelSize must be at least 1, got {tp}")
    if tp > 1 and "nvidia.com/gpu" in role.placement.resources.get("limits", {}) and role.gpus != tp:
        raise SpecError(f"{path}.resources.limits nvidia.com/gpu ({role.gpus}) differs from "
                        f"{path}.engine.tensorParallelSize ({tp}): each rank needs a GPU of its own; "
                        f"leave the limit out (the operator sets it) or make them equal")
    return role


def _cells(data: Mapping[str, Any] | None) -> Cells | None:
    if data is None:
        return None
    data = crd.apply_defaults(data, crd.node("spec", "cells"))
    path = "spec.cells"
    sides = {side: data.get(side, {}) for side in ("prefill", "decode")}
    engines = {side: _field(sides[side], "engines", f"{path}.{side}", int) for side in sides}
    if min(engines.values()) < 1 or sum(engines.values()) > crd.MAX_CELL_ENGINES:
        raise SpecError(f"{path}: a cell runs 1 to {crd.MAX_CELL_ENGINES - 1} engines of each side and at "
                        f"most {crd.MAX_CELL_ENGINES} in all (it has {engines['prefill']} prefill and "
                        f"{engines['decode']} decode)")
    placement = _placement(data, path)
    if any("nvidia.com/gpu" in placement.resources.get(s, {}) for s in ("limits", "requests")):
        raise SpecError(f"{path}.resources must not set nvidia.com/gpu: the operator requests one GPU "
                        "per engine (cells.gpusPerEngine)")
    gpus = _field(data, "gpusPerEngine", path, int)
    if gpus not in (0, 1):
        raise SpecError(f"{path}.gpusPerEngine must be 0 (CPU engines) or 1 (one GPU per engine), got {gpus}")
    prefill = _engine(sides["prefill"].get("engine", {}), f"{path}.prefill.engine")
    _refuse_speculation(prefill, f"{path}.prefill.engine")
    return Cells(
        replicas=_field(data, "replicas", path, int),
        gpus_per_engine=gpus,
        prefill_engines=engines["prefill"],
        decode_engines=engines["decode"],
        prefill=prefill,
        decode=_engine(sides["decode"].get("engine", {}), f"{path}.decode.engine"),
        autoscaling=_autoscaling(data.get("autoscaling"), f"{path}.autoscaling"),
        shm_size=_quantity(_field(data, "shmSize", path, str), f"{path}.shmSize"),
        placement=placement,
    )


def _router(data: Mapping[str, Any]) -> Router:
    return Router(
        replicas=_field(data, "replicas", "spec.router", int),
        image=data.get("image"),
        api_key=_secret_ref(data.get("apiKeySecretRef")),
        routing_policy=_field(data, "routingPolicy", "spec.router", str),
        max_queue=_field(data, "maxQueue", "spec.router", int),
        service_type=_field(data, "serviceType", "spec.router", str),
        placement=_placement(data, "spec.router"),
        tool_call_parser=data.get("toolCallParser"),
        trust_request_chat_template=bool(data.get("trustRequestChatTemplate", False)),
    )


def _compile_cache(data: Mapping[str, Any]) -> dict | None:
    if "pvc" in data and "hostPath" in data:
        raise SpecError("set at most one of spec.compileCache.pvc, spec.compileCache.hostPath")
    if "pvc" in data:
        return {"persistentVolumeClaim": {"claimName": _field(data["pvc"], "claimName",
                                                              "spec.compileCache.pvc", str)}}
    if "hostPath" in data:
        return {"hostPath": {"path": _field(data, "hostPath", "spec.compileCache", str),
                             "type": "DirectoryOrCreate"}}
    return None


def parse(body: Mapping[str, Any]) -> InferenceService:
    """Read an InferenceService object (as the API returns it) into typed values.

    Raises `SpecError` for anything the operator cannot serve as written. `body` is not
    changed.
    """
    meta = body.get("metadata") or {}
    if not isinstance(body.get("spec"), Mapping):
        raise SpecError("spec is required")
    spec = crd.apply_defaults(body["spec"], crd.node("spec"))
    try:
        return _parse_spec(meta, spec)
    except (KeyError, TypeError, AttributeError) as error:
        # The schema guarantees the shape; reaching here means it was bypassed.
        raise SpecError(f"spec does not match the InferenceService schema ({error!r}); "
                        "is the CRD in the cluster up to date?") from error


def _kv_transfer(data: Mapping[str, Any]) -> KVTransfer:
    transport = data["transport"]
    ucx, rdma = data.get("ucx"), data.get("rdma")
    if (ucx is not None or rdma is not None) and transport not in ("ucx", "auto"):
        raise SpecError(f"spec.kvTransfer.{'rdma' if rdma is not None else 'ucx'} needs "
                        f"kvTransfer.transport ucx or auto (it is {transport})")
    ucx = ucx or {}
    return KVTransfer(
        transport=transport,
        ucx_tls=tuple(ucx.get("tls") or ()),
        ucx_net_devices=tuple(ucx.get("netDevices") or ()),
        ucx_progress_mode=ucx.get("progressMode"),
        rdma=None if rdma is None else Rdma(
            resource_name=rdma["resourceName"], count=int(rdma["count"]),
            networks=tuple(rdma.get("networks") or ())),
    )


def _role_key(spec: Mapping[str, Any], name: str) -> str:
    """The spec field that describes role `name`: its name, or an old spelling in use."""
    given = [key for key, role in ALIASES.items() if role == name and key in spec]
    if given and name in spec:
        raise SpecError(f"set spec.{name} or its old spelling spec.{given[0]}, not both")
    return given[0] if given else name


def kv_cache_dtype(value: str) -> str:
    """One spelling per KV cache dtype: the workers read "fp8" and "fp8_e4m3" alike (e4m3),
    so both give the same flag, and changing one spelling for the other rolls no pod."""
    if value not in crd.KV_CACHE_DTYPES:
        raise SpecError(f"spec.model.kvCacheDtype {value!r} is not one of "
                        f"{', '.join(crd.KV_CACHE_DTYPES)}")
    return "fp8" if value == "fp8_e4m3" else value


def _parse_spec(meta: Mapping[str, Any], spec: dict) -> InferenceService:
    mode = spec["mode"]
    if mode not in ROLES_BY_MODE:
        raise SpecError(f"spec.mode {mode!r} is not one of {', '.join(ROLES_BY_MODE)}")
    longest = crd.max_name_length(mode)
    if len(meta["name"]) > longest:
        raise SpecError(f"metadata.name {meta['name']!r} is longer than {longest} characters, "
                        f"the most mode {mode} allows (child objects add "
                        f"{crd.SUFFIX_BY_MODE[mode]!r}): choose a shorter name")
    active = ROLES_BY_MODE[mode]
    stray = [key for key in (*WORKER_ROLES, *ALIASES)
             if key in spec and ALIASES.get(key, key) not in active]
    if stray:
        raise SpecError(f"spec.{stray[0]} does not apply to mode {mode} (it uses "
                        f"{' and '.join(active)})")
    roles = []
    for name in active:
        key = _role_key(spec, name)
        roles.append(_role(name, key, crd.apply_defaults(spec.get(key, {}),
                                                         crd.node("spec", key))))
    if spec.get("cells") is not None and mode != "disaggregated":
        raise SpecError("spec.cells applies only to mode disaggregated")
    cells = _cells(spec.get("cells"))
    if cells and len(meta["name"]) > 63 - len(CELL_SUFFIX):
        raise SpecError(f"metadata.name {meta['name']!r} is longer than {63 - len(CELL_SUFFIX)} "
                        f"characters, the most a service with cells allows (child objects add "
                        f"{CELL_SUFFIX!r}): choose a shorter name")
    engine = spec["autoscaling"]["engine"]
    scaled = [(f"spec.{role.name}", role.autoscaling) for role in roles]
    scaled += [("spec.cells", cells.autoscaling)] if cells else []
    for path, scaling in scaled:
        if scaling and scaling.min_replicas == 0 and engine != "keda":
            raise SpecError(f"{path}.autoscaling.minReplicas 0 needs "
                            "spec.autoscaling.engine keda: a HorizontalPodAutoscaler cannot "
                            "scale to zero")
    model = spec["model"]
    served_name = model.get("servedName") or meta["name"]
    return InferenceService(
        name=meta["name"],
        namespace=meta.get("namespace") or "default",
        uid=meta.get("uid", ""),
        generation=int(meta.get("generation") or 0),
        model=Model(
            source=_source(model["source"]),
            served_name=served_name,
            dtype=model["dtype"],
            max_model_len=model.get("maxModelLen"),
            quantization=model.get("quantization"),
            kv_cache_dtype=kv_cache_dtype(model["kvCacheDtype"]),
        ),
        image=spec.get("image"),
        image_pull_policy=spec.get("imagePullPolicy"),
        image_pull_secrets=tuple(ref["name"] for ref in spec.get("imagePullSecrets", ())),
        mode=mode,
        roles=tuple(roles),
        router=_router(spec["router"]),
        kv_transfer=_kv_transfer(spec["kvTransfer"]),
        autoscaling_engine=engine,
        network_policy=bool(spec["networkPolicy"]["enabled"]),
        otlp_endpoint=(spec.get("tracing") or {}).get("otlpEndpoint") or None,
        cells=cells,
        lora=_lora(spec.get("lora"), served_name),
        compile_cache=_compile_cache(spec.get("compileCache") or {}),
    )
