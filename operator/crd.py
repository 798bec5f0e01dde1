"""The `InferenceService` CustomResourceDefinition, written once in Python.

`crds/baton.dev_inferenceservices.yaml` is rendered from this module
(`python -m baton.operator.crd write`), and a test fails when the file is stale, so the
schema has one source. The operator applies the schema's defaults itself
(`apply_defaults`) before it reads a spec, so a default lives only here.

The schema is structural (every node typed), carries defaults, enums and ranges, and
states in CEL (`x-kubernetes-validations`) what types alone cannot say.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from baton.kvtransfer.config import UCX_PROGRESS_MODES

GROUP = "baton.dev"
VERSION = "v1alpha1"
KIND = "InferenceService"
PLURAL = "inferenceservices"
API_VERSION = f"{GROUP}/{VERSION}"

# Child objects append a suffix to the name, the longest of each mode below, and Service
# names are DNS-1035 labels of at most 63 characters.
SUFFIX_BY_MODE = {"disaggregated": "-prefill", "colocated": "-colocated"}


def max_name_length(mode: str) -> int:
    """Longest metadata.name whose children's names still fit in 63 characters."""
    return 63 - len(SUFFIX_BY_MODE.get(mode, "-prefill"))


MAX_NAME_LENGTH = max_name_length("disaggregated")
METRICS = ("num_requests_waiting", "num_requests_running", "kv_cache_usage_perc")
# Worker flags the operator writes from typed fields; `extraArgs` may not set them.
TYPED_FLAGS = ("model", "tokenizer", "served-model-name", "dtype", "block-size",
               "quantization", "kv-cache-dtype", "kv-transfer", "host", "port",
               "metrics-port", "kv-port", "kv-tcp-port", "otlp-traces-endpoint",
               "tensor-parallel-size", "speculative-config", "speculative-model", "num-speculative-tokens",
               "enable-lora", "lora-modules", "max-loras", "max-lora-rank", "max-cpu-loras")
DEFAULT_BLOCK_SIZE = 16
# model.quantization and model.kvCacheDtype: the workers' --quantization and --kv-cache-dtype
# accept each (a test says so). fp8_e4m3 is the workers' other spelling of fp8.
QUANTIZATIONS = ("fp8", "awq", "gptq", "compressed-tensors")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
# The values of kvTransfer.transport; the workers' --kv-transfer accepts each (a test says so).
TRANSPORTS = ("grpc", "ucx", "tcp", "auto")
# The resource the RDMA shared device plugin's example configuration advertises.
DEFAULT_RDMA_RESOURCE = "rdma/hca_shared_devices_a"
QUANTITY_PATTERN = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"

HEADER = (
    "# Generated from operator/crd.py by `python -m baton.operator.crd write`.\n"
    "# Edit operator/crd.py, not this file: tests/operator checks that they agree.\n"
)


def _obj(properties: dict, *, description: str = "", required: tuple[str, ...] = (),
         default: Any = None, rules: tuple[tuple[str, str], ...] = ()) -> dict:
    node: dict[str, Any] = {"type": "object"}
    if description:
        node["description"] = description
    if required:
        node["required"] = list(required)
    if default is not None:
        node["default"] = default
    node["properties"] = properties
    if rules:
        node["x-kubernetes-validations"] = [{"rule": r, "message": m} for r, m in rules]
    return node


def _scalar(kind: str, description: str, **constraints: Any) -> dict:
    return {"type": kind, "description": description, **constraints}


def _quantity_map(description: str) -> dict:
    return {
        "type": "object",
        "description": description,
        "additionalProperties": {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        },
    }


def _secret_key_ref(description: str, default_key: str) -> dict:
    return _obj(
        {
            "name": _scalar("string", "Secret name, in the InferenceService's namespace.",
                            minLength=1, maxLength=253),
            "key": _scalar("string", "Key inside the Secret.", default=default_key,
                           minLength=1, maxLength=253),
        },
        description=description, required=("name",),
    )


def _placement() -> dict:
    """Scheduling and environment fields every pod template takes."""
    toleration = _obj({
        "key": _scalar("string", "Taint key; empty with operator Exists matches all."),
        "operator": _scalar("string", "Exists or Equal.", enum=["Exists", "Equal"]),
        "value": _scalar("string", "Taint value for operator Equal."),
        "effect": _scalar("string", "Taint effect to match; empty matches all.",
                          enum=["", "NoSchedule", "PreferNoSchedule", "NoExecute"]),
        "tolerationSeconds": _scalar("integer", "How long a NoExecute taint is tolerated.",
                                     format="int64"),
    })
    env_var = _obj(
        {
            "name": _scalar("string", "Variable name.", minLength=1),
            "value": _scalar("string", "Literal value."),
            "valueFrom": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                          "description": "A core/v1 EnvVarSource (secretKeyRef, fieldRef, ...)."},
        },
        required=("name",),
    )
    return {
        "resources": _obj(
            {"limits": _quantity_map("Limits, e.g. nvidia.com/gpu: 1, memory: 32Gi."),
             "requests": _quantity_map("Requests; default to the limits.")},
            description="Container resources (core/v1 ResourceRequirements without claims).",
        ),
        "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"},
                         "description": "Node labels the pods must match."},
        "tolerations": {"type": "array", "items": toleration, "maxItems": 64,
                        "description": "Taints the pods tolerate (e.g. GPU node taints)."},
        "affinity": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                     "description": "A core/v1 Affinity, copied into the pod template."},
        "env": {"type": "array", "items": env_var, "maxItems": 128,
                "description": "Extra environment variables for the main container."},
    }


def _engine() -> dict:
    return _obj(
        {
            "blockSize": _scalar("integer", "Tokens per KV block (--block-size); prefill and "
                                 "decode must agree.",
                                 enum=[8, 16, 32, 64, 128], default=DEFAULT_BLOCK_SIZE),
            "maxNumSeqs": _scalar("integer", "Running sequences per step (--max-num-seqs).",
                                  minimum=1, maximum=65536, default=256),
            "maxNumBatchedTokens": _scalar(
                "integer", "Token budget per step (--max-num-batched-tokens).",
                minimum=16, maximum=1048576, default=2048),
            "gpuMemoryUtilization": _scalar(
                "number", "Share of GPU memory for weights and KV (--gpu-memory-utilization).",
                minimum=0.05, maximum=0.99, default=0.9),
            "enablePrefixCaching": _scalar("boolean", "Automatic prefix caching.",
                                           default=True),
            "numGpuBlocksOverride": _scalar(
                "integer", "KV pool size in blocks (--num-gpu-blocks-override).",
                minimum=1, maximum=16777216),
            "kvCacheMemoryGB": _scalar("number", "KV pool size on CPU (--kv-cache-memory-gb).",
                                       exclusiveMinimum=True, minimum=0, maximum=4096),
            "tensorParallelSize": _scalar(
                "integer", "GPUs one engine splits the model over, one process each "
                "(--tensor-parallel-size); above 1 the pod requests that many nvidia.com/gpu. "
                "Prefill and decode may differ (KV handoffs regroup the heads).", minimum=1, maximum=16, default=1),
            "speculative": _speculative(),
            "extraArgs": {"type": "array", "items": {"type": "string", "maxLength": 4096},
                          "maxItems": 64,
                          "description": "Flags appended to the worker's command line (not "
                                         "those the operator sets from typed fields)."},
        },
        description="Engine settings, passed to the worker as flags.", default={},
        rules=((f"!has(self.extraArgs) || self.extraArgs.all(a, !({_sets_typed_flag('a')}))",
                "engine.extraArgs must not set a flag the operator sets from the spec (--"
                + ", --".join(TYPED_FLAGS) + "): use the typed field"),),
    )


def _speculative() -> dict:
    """engine.speculative: the workers' --speculative-config (engine/spec_decode/config.py)."""
    count = dict(minimum=1, maximum=1024)
    return _obj(
        {
            "method": _scalar("string", "ngram: drafts looked up in the sequence's own tokens; "
                              "draft_model: drafts by a small model with the same tokenizer.",
                              enum=["ngram", "draft_model"], default="ngram"),
            "numSpeculativeTokens": _scalar("integer", "Tokens drafted per sequence and step.",
                                            minimum=1, maximum=16),
            "model": _scalar("string", "draft_model: the draft model's directory in the worker "
                             "pod (for example in the model's volume).", minLength=1,
                             maxLength=4096),
            "promptLookupMin": _scalar("integer", "ngram: shortest n-gram looked up.", minimum=1,
                                       maximum=64),
            "promptLookupMax": _scalar("integer", "ngram: longest n-gram looked up.", minimum=1,
                                       maximum=64),
            "shortenByBatchSize": _scalar("integer", "From this many decoding sequences on, "
                                          "draft half as many tokens.", **count),
            "disableByBatchSize": _scalar("integer", "From this many decoding sequences on, "
                                          "draft none.", **count),
        },
        description="Speculative decoding (--speculative-config); off while unset.",
        required=("numSpeculativeTokens",),
        rules=(("(has(self.method) && self.method == 'draft_model') == has(self.model)",
                "speculative.model is required with method draft_model and refused with ngram"),
               ("!has(self.method) || self.method == 'ngram' || "
                "(!has(self.promptLookupMin) && !has(self.promptLookupMax))",
                "promptLookupMin/promptLookupMax apply to method ngram only")),
    )


def _sets_typed_flag(arg: str) -> str:
    """CEL: `arg` is `--FLAG` or `--FLAG=...` for a flag in TYPED_FLAGS. Plain comparisons,
    not a regular expression, keep the rule's estimated cost far below the API server's
    limit (64 arguments of up to 4096 characters)."""
    return " || ".join(f"{arg} == '--{flag}' || {arg}.startsWith('--{flag}=')"
                       for flag in TYPED_FLAGS)


def _autoscaling() -> dict:
    return _obj(
        {
            "minReplicas": _scalar("integer", "Fewest replicas; 0 needs autoscaling.engine keda.",
                                   minimum=0, maximum=1000, default=1),
            "maxReplicas": _scalar("integer", "Most replicas.", minimum=1, maximum=1000),
            "metric": _scalar("string", "Worker metric (baton:<metric>) averaged per pod.",
                              enum=list(METRICS), default="num_requests_waiting"),
            "target": _scalar(
                "number", "Per-pod average to hold; defaults to 4 waiting requests, "
                "32 running requests or 0.8 KV usage.", exclusiveMinimum=True, minimum=0),
        },
        description="Scale this role on a worker metric. While set, the operator no longer "
                    "writes the Deployment's replicas.",
        required=("maxReplicas",),
        rules=(
            ("self.minReplicas <= self.maxReplicas",
             "autoscaling.minReplicas must not exceed autoscaling.maxReplicas"),
            ("self.metric != 'kv_cache_usage_perc' || !has(self.target) || "
             "double(self.target) <= 1.0",
             "kv_cache_usage_perc is a fraction: autoscaling.target must be at most 1"),
        ),
    )


def _role(description: str) -> dict:
    return _obj(
        {
            "replicas": _scalar("integer", "Desired pods while autoscaling is off.",
                                minimum=0, maximum=1000, default=1),
            "engine": _engine(),
            "autoscaling": _autoscaling(),
            "shmSize": _scalar("string", "Size of /dev/shm (memory-backed).",
                               pattern=QUANTITY_PATTERN, default="1Gi"),
            **_placement(),
        },
        description=description,
    )


# Engines per cell: a node's GPUs (at most 8 on today's GPU nodes), one engine each.
MAX_CELL_ENGINES = 8


def _cell_side(role: str) -> dict:
    return _obj(
        {"engines": _scalar("integer", f"{role.capitalize()} engines per cell.", minimum=1,
                            maximum=MAX_CELL_ENGINES - 1, default=1),
         "engine": _engine()},
        description=f"The cell's {role} engines and their engine settings.", default={},
    )


def _cells() -> dict:
    return _obj(
        {
            "replicas": _scalar("integer", "Cells while autoscaling is off (each a pod with "
                                "every engine of the cell).", minimum=0, maximum=1000, default=1),
            "gpusPerEngine": _scalar(
                "integer", "GPUs per engine: 1 (engine k on the pod's GPU k; the pod requests "
                "nvidia.com/gpu = engines) or 0 (CPU engines, for development).",
                enum=[0, 1], default=1),
            "prefill": _cell_side("prefill"),
            "decode": _cell_side("decode"),
            "autoscaling": _autoscaling(),
            "shmSize": _scalar("string", "Size of /dev/shm (memory-backed); CPU engines keep "
                               "their KV pools there.", pattern=QUANTITY_PATTERN, default="1Gi"),
            **_placement(),
        },
        description="Cells (disaggregated mode): pods running prefill and decode engines side "
                    "by side (baton serve-cell), KV between them by CUDA IPC; scaled as units, "
                    "beside the prefill and decode fleets.",
        rules=(
            (f"self.prefill.engines + self.decode.engines <= {MAX_CELL_ENGINES}",
             f"a cell runs at most {MAX_CELL_ENGINES} engines (cells.prefill.engines + "
             "cells.decode.engines)"),
            ("!has(self.resources) || ((!has(self.resources.limits) || "
             "!('nvidia.com/gpu' in self.resources.limits)) && (!has(self.resources.requests) || "
             "!('nvidia.com/gpu' in self.resources.requests)))",
             "cells.resources must not set nvidia.com/gpu: the operator requests one GPU per "
             "engine (cells.gpusPerEngine)"),
        ),
    )


def _router() -> dict:
    return _obj(
        {
            "replicas": _scalar("integer", "Router pods.", minimum=0, maximum=100, default=1),
            "image": _scalar("string", "Router image; defaults to the operator's control image.",
                             minLength=1),
            "apiKeySecretRef": _secret_key_ref(
                "Secret holding the bearer token clients must send (env BATON_API_KEY).",
                "api-key"),
            "routingPolicy": _scalar("string", "How workers are picked.",
                                     enum=["load", "round-robin"], default="load"),
            "maxQueue": _scalar("integer", "Waiting requests per decode worker before 429.",
                                minimum=1, maximum=100000, default=64),
            "toolCallParser": _scalar("string", "How tool_choice auto reads the model's tool calls "
                                      "(the router's --tool-call-parser with --enable-auto-tool-choice); "
                                      "unset: auto is refused, required and named choices still work.",
                                      enum=["hermes", "llama3_json"]),
            "trustRequestChatTemplate": _scalar(
                "boolean", "Render a request's own chat_template (the router's "
                "--trust-request-chat-template); false: such a request is a 400.", default=False),
            "serviceType": _scalar("string", "Type of the router's Service.",
                                   enum=["ClusterIP", "NodePort", "LoadBalancer"],
                                   default="ClusterIP"),
            **_placement(),
        },
        description="The OpenAI-compatible router in front of the workers.", default={},
    )


def _source(where: str, what: str) -> dict:
    """A `source` node (pvc, hostPath or uri) of `what`, at `where` in the spec (for messages)."""
    return _obj(
        {
            "pvc": _obj(
                {
                    "claimName": _scalar("string", f"PersistentVolumeClaim holding the {what}.",
                                         minLength=1, maxLength=253),
                    "path": _scalar("string", f"{what.capitalize()} directory inside the volume.",
                                    default="", maxLength=4096),
                },
                required=("claimName",),
                rules=(("!self.path.startsWith('/') && !self.path.matches('(^|/)[.][.](/|$)')",
                        f"{where}.pvc.path is relative to the volume and has no '..'"),),
            ),
            "hostPath": _scalar("string", f"Absolute {what} directory on every node.",
                                pattern="^/", maxLength=4096),
            "uri": _scalar(
                "string", "hf://ORG/NAME[@REVISION] or an http(s):// .tar/.tar.gz/.tgz archive; "
                "fetched by an init container into an emptyDir.",
                pattern="^(hf://[^/@]+/[^/@]+(@.+)?|https?://.+)$", maxLength=4096),
            "credentialsSecretRef": _secret_key_ref(
                "Secret with a token for uri sources (HF_TOKEN, or a bearer token for https).",
                "token"),
            "sizeLimit": _scalar("string", "Size limit of the emptyDir a uri source fills.",
                                 pattern=QUANTITY_PATTERN),
        },
        description="Where the weights come from: exactly one of pvc, hostPath, uri.",
        rules=(("[has(self.pvc), has(self.hostPath), has(self.uri)].filter(x, x).size() == 1",
                f"set exactly one of {where}.pvc, {where}.hostPath, {where}.uri"),
               ("!has(self.credentialsSecretRef) || has(self.uri)",
                f"{where}.credentialsSecretRef applies only to uri sources")),
    )


def _lora() -> dict:
    adapter = _obj(
        {
            "name": _scalar("string", "Adapter name: what clients send as `model`.",
                            pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$", maxLength=128),
            "source": _source("lora.adapters[].source", "adapter"),
        },
        required=("name", "source"),
    )
    return _obj(
        {
            "adapters": {"type": "array", "items": adapter, "maxItems": 64,
                         "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                         "description": "PEFT LoRA adapter directories every worker role fetches and "
                                        "serves from the start (--lora-modules); more can be loaded "
                                        "through the router's /v1/load_lora_adapter."},
            "maxLoras": _scalar("integer", "Adapters a worker runs at once (--max-loras, its GPU "
                                "slots).", minimum=1, maximum=256, default=4),
            "maxLoraRank": _scalar("integer", "Largest adapter rank (--max-lora-rank); every slot "
                                   "is this wide.", minimum=1, maximum=512, default=16),
            "maxCpuLoras": _scalar("integer", "Unused adapters kept in host memory "
                                   "(--max-cpu-loras); default maxLoras.", minimum=1, maximum=4096),
        },
        description="Multi-LoRA: the workers run with --enable-lora and serve these adapters.",
        rules=(("!has(self.maxCpuLoras) || self.maxCpuLoras >= self.maxLoras",
                "lora.maxCpuLoras must be at least lora.maxLoras"),),
    )


def _model() -> dict:
    return _obj(
        {
            "source": _source("model.source", "model"),
            "servedName": _scalar("string", "Model name clients send; defaults to the "
                                  "InferenceService name.", pattern=r"^[^,\s]+$", maxLength=253),
            "dtype": _scalar("string", "Weights and activations dtype.",
                             enum=["auto", "float32", "bfloat16", "float16"], default="auto"),
            "maxModelLen": _scalar("integer", "Longest prompt plus output, in tokens.",
                                   minimum=16, maximum=1048576),
            "quantization": _scalar(
                "string", "Quantized weights (--quantization) for every role; left out, as the "
                "checkpoint's config.json says. fp8 also quantizes an unquantized checkpoint.",
                enum=list(QUANTIZATIONS)),
            "kvCacheDtype": _scalar(
                "string", "KV cache dtype (--kv-cache-dtype) for every role: auto (the model "
                "dtype) or fp8 (e4m3; fp8_e4m3 is the same). Part of the KV layout, so one "
                "value for prefill and decode.", enum=list(KV_CACHE_DTYPES), default="auto"),
        },
        description="The model to serve.", required=("source",),
    )


def _has_min_zero(role: str) -> str:
    return (f"(!has(self.{role}) || !has(self.{role}.autoscaling) || "
            f"self.{role}.autoscaling.minReplicas >= 1)")


def _kv_transfer() -> dict:
    ucx = _obj(
        {
            "tls": _string_list("UCX transports (UCX_TLS), e.g. [rc, cuda_copy]; default: "
                                "UCX's choice, or with rdma the RDMA set without tcp.",
                                r"^\^?[a-z0-9_]+$"),
            "netDevices": _string_list("Devices UCX may use (UCX_NET_DEVICES), e.g. "
                                       "[mlx5_0:1]; default: all.", r"^[A-Za-z0-9_.:-]+$"),
            "progressMode": _scalar("string", "UCXX progress mode (--ucx-progress-mode).",
                                    enum=list(UCX_PROGRESS_MODES)),
        },
        description="UCX settings of prefill and decode workers (transport ucx or auto).",
    )
    rdma = _obj(
        {
            "resourceName": _scalar(
                "string", "Extended resource of the RDMA device plugin each prefill and "
                "decode pod requests.", default=DEFAULT_RDMA_RESOURCE,
                pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*"
                        r"[A-Za-z0-9])?$", maxLength=253),
            "count": _scalar("integer", "How many of that resource each pod requests.",
                             minimum=1, maximum=64, default=1),
            "networks": _string_list(
                "Secondary networks (Multus NetworkAttachmentDefinitions, [NAMESPACE/]NAME) "
                "for the RDMA interfaces: the k8s.v1.cni.cncf.io/networks annotation.",
                r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
        },
        description="UCX over RDMA between nodes: the RDMA device each prefill and decode pod "
                    "requests, IPC_LOCK to pin memory, and UCX kept off TCP.",
    )
    return _obj(
        {"transport": _scalar("string", "Data plane for KV blocks: auto picks the fastest "
                              "each prefill/decode pair can use (ucx with RDMA, else tcp, else "
                              "grpc); or one of them by name.", enum=list(TRANSPORTS),
                              default="auto"),
         "ucx": ucx, "rdma": rdma},
        description="How prefill workers hand KV blocks to decode workers.", default={},
        rules=(("!has(self.ucx) || self.transport in ['ucx', 'auto']",
                "kvTransfer.ucx applies to transport ucx or auto"),
               ("!has(self.rdma) || self.transport in ['ucx', 'auto']",
                "kvTransfer.rdma needs transport ucx or auto: RDMA is reached through UCX")),
    )


def _string_list(description: str, pattern: str) -> dict:
    return {"type": "array", "description": description, "maxItems": 32,
            "items": {"type": "string", "pattern": pattern, "maxLength": 64}}


def _has(path: str) -> str:
    """CEL: `self.<path>` is set, and every field on the way to it ("a.b": nested paths)."""
    parts = path.split(".")
    return " && ".join(f"has(self.{'.'.join(parts[:i + 1])})" for i in range(len(parts)))


def _engine_field(path: str, name: str, default: int) -> str:
    """CEL: `self.<path>.engine.<name>`, or `default` when unset."""
    return f"({_has(f'{path}.engine.{name}')} ? self.{path}.engine.{name} : {default})"


def _block_size(path: str) -> str:
    return _engine_field(path, "blockSize", DEFAULT_BLOCK_SIZE)


def _tensor_parallel(path: str) -> str:
    return _engine_field(path, "tensorParallelSize", 1)


def _spec() -> dict:
    min_zero = " && ".join(_has_min_zero(role)
                           for role in ("prefill", "decode", "colocated", "worker", "cells"))
    return _obj(
        {
            "model": _model(),
            "lora": _lora(),
            "image": _scalar("string", "Worker image; defaults to the operator's worker image.",
                             minLength=1),
            "imagePullPolicy": _scalar("string", "Pull policy of every container.",
                                       enum=["Always", "IfNotPresent", "Never"]),
            "imagePullSecrets": {
                "type": "array", "maxItems": 16, "description": "Secrets for private registries.",
                "items": _obj({"name": _scalar("string", "Secret name.", minLength=1)},
                              required=("name",)),
            },
            "mode": _scalar("string", "disaggregated: prefill and decode fleets; colocated: one "
                            "fleet of workers doing both.",
                            enum=["disaggregated", "colocated"], default="disaggregated"),
            "prefill": _role("Prefill workers (disaggregated mode)."),
            "decode": _role("Decode workers (disaggregated mode)."),
            "colocated": _role("Colocated workers (colocated mode): each pod runs prefill "
                               "and decode in one engine."),
            "worker": _role("The old spelling of colocated, still accepted (set one of the "
                            "two, not both)."),
            "cells": _cells(),
            "router": _router(),
            "kvTransfer": _kv_transfer(),
            "autoscaling": _obj(
                {"engine": _scalar("string", "hpa: HorizontalPodAutoscaler on Pods metrics from "
                                   "the metrics adapter; keda: KEDA ScaledObject on Prometheus.",
                                   enum=["hpa", "keda"], default="hpa")},
                description="How roles with an autoscaling block are scaled.", default={}),
            "compileCache": _obj(
                {"pvc": _obj({"claimName": _scalar("string", "PersistentVolumeClaim (ReadWriteMany "
                                                   "when pods of several nodes share it).",
                                                   minLength=1, maxLength=253)},
                             required=("claimName",)),
                 "hostPath": _scalar("string", "Absolute directory on every node.", pattern="^/",
                                     maxLength=4096)},
                description="Where the engines keep their compiled kernels (Triton, TorchInductor), "
                "so that a new pod loads them instead of compiling before it is ready: at most one "
                "of pvc, hostPath; unset: an emptyDir, which lives as long as its pod.",
                rules=(("!(has(self.pvc) && has(self.hostPath))",
                        "set at most one of spec.compileCache.pvc, spec.compileCache.hostPath"),)),
            "tracing": _obj(
                {"otlpEndpoint": _scalar(
                    "string", "OTLP/gRPC collector (host:port, http:// or https:// URL) the "
                    "router and every worker send OpenTelemetry traces to "
                    "(--otlp-traces-endpoint).", minLength=1, maxLength=2048,
                    pattern=r"^\S+$")},
                description="OpenTelemetry traces; off while otlpEndpoint is unset."),
            "networkPolicy": _obj(
                {"enabled": _scalar("boolean", "Admit only router→workers and prefill→decode "
                                    "traffic (metrics stay open).", default=False)},
                description="Optional NetworkPolicies for the workers.", default={}),
        },
        description="What to serve and how.",
        required=("model",),
        rules=(
            ("self.mode == 'disaggregated' || (!has(self.prefill) && !has(self.decode))",
             "prefill and decode apply only to mode disaggregated; describe colocated workers "
             "under colocated"),
            ("self.mode == 'colocated' || (!has(self.colocated) && !has(self.worker))",
             "colocated (or its old spelling worker) applies only to mode colocated; describe "
             "disaggregated fleets under prefill and decode"),
            ("!has(self.colocated) || !has(self.worker)",
             "set colocated or its old spelling worker, not both"),
            (f"self.mode != 'disaggregated' || {_block_size('prefill')} == "
             f"{_block_size('decode')}",
             "prefill.engine.blockSize and decode.engine.blockSize must be equal: KV blocks "
             "are copied from prefill to decode as they are"),
            ("self.mode == 'disaggregated' || !has(self.cells)",
             "cells apply only to mode disaggregated"),
            (f"!has(self.cells) || ({_tensor_parallel('cells.prefill')} == 1 && "
             f"{_tensor_parallel('cells.decode')} == 1)",
             "cells' engine.tensorParallelSize above 1 is not supported yet: a cell runs one GPU per engine"),
            (f"!has(self.cells) || ({_block_size('cells.prefill')} == {_block_size('prefill')} "
             f"&& {_block_size('cells.decode')} == {_block_size('prefill')})",
             "cells.prefill.engine.blockSize and cells.decode.engine.blockSize must equal "
             "prefill.engine.blockSize: any prefill engine may hand KV to any decode engine"),
            *((f"!({_has(f'{side}.engine.speculative')})",
               f"{side}.engine.speculative is refused: prefill engines end each request at its first token, "
               f"so they never speculate (a draft model would only take memory); set it on "
               f"{side.replace('prefill', 'decode')}.engine.speculative")
              for side in ("prefill", "cells.prefill")),
            (f"self.autoscaling.engine == 'keda' || ({min_zero})",
             "autoscaling.minReplicas 0 needs autoscaling.engine keda: a "
             "HorizontalPodAutoscaler cannot scale to zero"),
        ),
    )


def _replica_status() -> dict:
    return _obj({
        "replicas": _scalar("integer", "Desired pods (the Deployment's spec.replicas)."),
        "readyReplicas": _scalar("integer", "Pods passing their readiness probe."),
        "ready": _scalar("string", "readyReplicas/replicas, for kubectl get."),
    })


def _status() -> dict:
    condition = _obj(
        {
            "type": _scalar("string", "Ready, PrefillReady, DecodeReady, ColocatedReady, "
                            "CellsReady, RouterReady or KVTransferReady."),
            "status": _scalar("string", "True, False or Unknown.",
                              enum=["True", "False", "Unknown"]),
            "reason": _scalar("string", "CamelCase reason; docs/operator.md lists each."),
            "message": _scalar("string", "What is wrong and what to do."),
            "lastTransitionTime": _scalar("string", "When status last changed.",
                                          format="date-time"),
            "observedGeneration": _scalar("integer", "Generation the condition describes.",
                                          format="int64"),
        },
        required=("type", "status"),
    )
    return _obj(
        {
            "observedGeneration": _scalar("integer", "Last generation the operator acted on.",
                                          format="int64"),
            "url": _scalar("string", "In-cluster URL of the router (OpenAI API base)."),
            "prefill": _replica_status(),
            "decode": _replica_status(),
            "colocated": _replica_status(),
            "router": _replica_status(),
            "cell": _replica_status(),
            "kvTransfer": _obj({
                "transport": _scalar("string", "Transport the workers report using (the "
                                     "spec's when they report none)."),
                "handoffs": _scalar("integer", "Handoffs started since the previous read."),
                "failures": _scalar("integer", "Of those, failed (clients going away and "
                                    "draining workers not counted)."),
                "layoutMismatches": _scalar("integer", "Of those, failed because the prefill "
                                            "and decode KV layouts differ."),
            }, description="KV handoff health read from the workers' metrics (disaggregated "
                           "mode); the KVTransferReady condition sums it up."),
            "conditions": {"type": "array", "items": condition,
                           "x-kubernetes-list-type": "map",
                           "x-kubernetes-list-map-keys": ["type"]},
        },
        description="Observed state, written by the operator.",
    )


def _printer_columns() -> list[dict]:
    ready = '.status.conditions[?(@.type=="Ready")]'
    return [
        {"name": "Mode", "type": "string", "jsonPath": ".spec.mode"},
        {"name": "Prefill", "type": "string", "jsonPath": ".status.prefill.ready",
         "description": "ready/desired prefill workers"},
        {"name": "Decode", "type": "string", "jsonPath": ".status.decode.ready",
         "description": "ready/desired decode workers"},
        {"name": "Colocated", "type": "string", "jsonPath": ".status.colocated.ready",
         "description": "ready/desired colocated workers", "priority": 1},
        {"name": "Router", "type": "string", "jsonPath": ".status.router.ready", "priority": 1},
        {"name": "Ready", "type": "string", "jsonPath": f"{ready}.status"},
        {"name": "Reason", "type": "string", "jsonPath": f"{ready}.reason", "priority": 1},
        {"name": "KV", "type": "string", "priority": 1,
         "jsonPath": '.status.conditions[?(@.type=="KVTransferReady")].reason',
         "description": "KV handoff health (KVTransferReady reason)"},
        {"name": "URL", "type": "string", "jsonPath": ".status.url"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def build() -> dict:
    """The CustomResourceDefinition as a plain dict (a fresh copy on every call)."""
    colocated = max_name_length("colocated")
    name_rule = (f"self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && "
                 f"self.metadata.name.size() <= {MAX_NAME_LENGTH} && "
                 f"(self.spec.mode != 'colocated' || self.metadata.name.size() <= {colocated})")
    root = _obj(
        {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": _spec(),
            "status": _status(),
        },
        description="A model served by prefill and decode fleets (or colocated workers) "
                    "behind an OpenAI-compatible router.",
        required=("spec",),
        rules=((name_rule, f"metadata.name must be a DNS label (a-z, 0-9, '-', starting with "
                           f"a letter) of at most {MAX_NAME_LENGTH} characters ({colocated} in "
                           f"mode colocated): child objects add a role suffix"),),
    )
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}",
                     "labels": {"app.kubernetes.io/name": "baton",
                                "app.kubernetes.io/part-of": "baton"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL,
                      "singular": "inferenceservice", "shortNames": ["bisvc"],
                      "categories": ["baton"]},
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": _printer_columns(),
                "schema": {"openAPIV3Schema": root},
            }],
        },
    }


_SCHEMA = build()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def schema() -> dict:
    """The openAPIV3Schema of the served version (a copy: callers may change it)."""
    return copy.deepcopy(_SCHEMA)


def node(*properties: str) -> Mapping[str, Any]:
    """The schema node reached through `properties` from the root, e.g. node("spec", "router").

    Shared, not copied: read it, never change it (use `schema()` for a copy).
    """
    current: Mapping[str, Any] = _SCHEMA
    for key in properties:
        current = current["properties"][key]
    return current


def apply_defaults(value: Any, node: Mapping[str, Any] | None = None) -> Any:
    """Return `value` with the schema's defaults filled in, as the API server does.

    Structural defaulting: a missing property with a `default` gets a copy of it (itself
    defaulted, so `default: {}` fills nested defaults); present objects are walked
    recursively, array items too. `value` is not changed. `node` defaults to the root.
    """
    node = _SCHEMA if node is None else node
    if isinstance(value, Mapping) and node.get("type") == "object":
        result = dict(value)
        for key, sub in node.get("properties", {}).items():
            if key not in result and "default" in sub:
                result[key] = copy.deepcopy(sub["default"])
            if key in result:
                result[key] = apply_defaults(result[key], sub)
        return result
    if isinstance(value, list) and node.get("type") == "array" and "items" in node:
        return [apply_defaults(item, node["items"]) for item in value]
    return copy.deepcopy(value)


def render_yaml(document: Mapping[str, Any] | None = None) -> str:
    """The CRD as the YAML text kept in crds/ (deterministic: no key sorting)."""
    body = yaml.safe_dump(dict(document or build()), sort_keys=False, width=100)
    return HEADER + body


def peering_crds() -> list[dict]:
    """kopf's peering resources, needed only by `baton operator --peering NAME`.

    Several operator replicas agree through them which one is active; the schema is
    kopf's: an open status where each replica records its priority and lifetime.
    """
    crds = []
    for kind, scope in (("ClusterKopfPeering", "Cluster"), ("KopfPeering", "Namespaced")):
        plural = kind.lower() + "s"
        status = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        crds.append({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.kopf.dev"},
            "spec": {
                "group": "kopf.dev", "scope": scope,
                "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                "versions": [{
                    "name": "v1", "served": True, "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object",
                                                   "properties": {"status": status}}},
                }],
            },
        })
    return crds


# The files in crds/ (the chart's crds/ is a link to that folder) and what each holds.
REPO_FILES: dict[str, Any] = {
    f"{GROUP}_{PLURAL}.yaml": lambda: render_yaml(),
    "kopf.dev_peerings.yaml": lambda: HEADER + yaml.safe_dump_all(
        peering_crds(), sort_keys=False, width=100),
}


def main(argv: list[str] | None = None) -> int:
    """`python -m baton.operator.crd [write]`: print the CRD, or rewrite crds/."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["write"]:
        for name, render in REPO_FILES.items():
            (Path("crds") / name).write_text(render())
            print(f"wrote crds/{name}")
        return 0
    if argv:
        print("usage: python -m baton.operator.crd [write]  (run from the repository root)",
              file=sys.stderr)
        return 2
    sys.stdout.write(render_yaml())
    return 0


if __name__ == "__main__":
    sys.exit(main())
