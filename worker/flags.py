"""Worker command lines (`baton serve-prefill|serve-decode|serve-colocated`) -> typed options.

The flags are the contract with the operator (docs/operations.md, "Process command
lines"): engine flags map one to one onto `EngineArgs` fields (every field has a flag:
the common ones are written out here, the rest are derived from the dataclass), server
flags onto `WorkerOptions`. Building the parser imports the engine's config module (torch):
only worker processes do.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from baton.engine.quantization.schemes import KV_CACHE_DTYPES, METHOD_ALIASES
from baton.kvtransfer.config import UCX_PROGRESS_MODES
from baton.rpc import Keepalive

TRANSPORTS = ("grpc", "ucx", "tcp", "auto")

# flag dest -> EngineArgs field (same name unless noted)
_ENGINE_FIELDS = (
    "model", "served_model_name", "dtype", "device", "block_size", "max_num_seqs",
    "max_num_batched_tokens", "max_model_len", "gpu_memory_utilization",
    "num_gpu_blocks_override", "kv_cache_memory_gb", "enable_prefix_caching", "seed",
    "quantization", "kv_cache_dtype", "model_module", "tensor_parallel_size", "speculative_config",
    "enable_lora", "max_loras", "max_cpu_loras", "max_lora_rank",
)


@dataclass(frozen=True)
class WorkerOptions:
    """Everything about a worker process that is not the engine."""

    role: str  # "prefill", "decode" or "colocated"
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 9090
    kv_transfer: str = "grpc"
    kv_port: int = 50052
    kv_tcp_port: int = 50053
    advertise_host: str | None = None  # address peers use to reach this worker's KV port
    shutdown_grace_seconds: float = 30.0
    reservation_ttl_seconds: float = 30.0
    ucx_progress_mode: str | None = None  # None: UCXX's default ($UCXPY_PROGRESS_MODE or thread)
    warmup: str = "auto"  # run every reachable kernel shape before SERVING: auto (on CUDA), on, off
    otlp_traces_endpoint: str | None = None  # None: no traces (baton/tracing.py)
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, path) adapters served from the start
    cell: str = ""  # the cell this engine runs in (`baton serve-cell` sets it); reported by Info
    keepalive: Keepalive = Keepalive()  # the pings the gRPC server accepts (baton/rpc.py)

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode", "colocated"):
            raise ValueError(f"role must be prefill, decode or colocated, got {self.role!r}")
        if self.kv_transfer not in TRANSPORTS:
            raise ValueError(f"--kv-transfer must be one of {TRANSPORTS}, got {self.kv_transfer!r}")
        for name in ("port", "metrics_port", "kv_port", "kv_tcp_port"):
            value = getattr(self, name)
            if not 0 <= value < 65536:
                raise ValueError(f"--{name.replace('_', '-')} must be a TCP port, got {value}")
        if self.warmup not in ("auto", "on", "off"):
            raise ValueError(f"--warmup must be auto, on or off, got {self.warmup!r}")
        if self.shutdown_grace_seconds < 0:
            raise ValueError("--shutdown-grace-seconds must be >= 0")
        if self.reservation_ttl_seconds <= 0:
            raise ValueError("--reservation-ttl-seconds must be > 0")
        names = [name for name, _ in self.lora_modules]
        if len(set(names)) != len(names) or not all(name and path for name, path in self.lora_modules):
            raise ValueError("--lora-modules takes NAME=PATH pairs with distinct, non-empty names")
        if self.ucx_progress_mode not in (None, *UCX_PROGRESS_MODES):
            raise ValueError(f"--ucx-progress-mode must be one of {UCX_PROGRESS_MODES}, got {self.ucx_progress_mode!r}")


def _engine_field_flags(group, explicit: set[str]) -> list[str]:
    """Flags for the EngineArgs fields without a hand-written flag (`--enforce-eager`,
    `--attention-backend`, ...), so any engine setting can be passed (the operator's
    `extraArgs`). Returns their dest names."""
    import dataclasses

    from baton.engine.config import EngineArgs

    added = []
    for f in dataclasses.fields(EngineArgs):
        if f.name in explicit:
            continue
        kind = str(f.type)
        flag = "--" + f.name.replace("_", "-")
        if "bool" in kind:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            cast = int if "int" in kind else float if "float" in kind else str
            group.add_argument(flag, type=cast, default=f.default, metavar=f.name.upper())
        added.append(f.name)
    return added


def build_parser(prog: str, role: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=f"Run a Baton {role} worker.")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--model", default=None, help="Hugging Face model directory (default: the embedded tiny model)")
    engine.add_argument("--served-model-name", default=None, help="name reported to the router (default: directory name)")
    engine.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    engine.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    engine.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    engine.add_argument("--max-num-seqs", type=int, default=256, help="running sequences per step")
    engine.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per step")
    engine.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output (default: from config)")
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    engine.add_argument("--num-gpu-blocks-override", type=int, default=None, help="KV pool size in blocks (also on CPU)")
    engine.add_argument("--kv-cache-memory-gb", type=float, default=1.0, help="KV pool size on CPU without an override")
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    engine.add_argument("--seed", type=int, default=0, help="engine random seed (unseeded sampling)")
    engine.add_argument("--quantization", default=None, choices=sorted(METHOD_ALIASES),
                        help="default: as the checkpoint's config.json says; fp8 quantizes an unquantized one")
    engine.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                        help="fp8: an e4m3 KV cache (prefill and decode workers must agree)")
    engine.add_argument("--model-module", default=None, metavar="MODULE",
                        help="module name or .py path imported before the engine is built "
                             "(registers architectures with baton.engine.ModelRegistry)")
    engine.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="split the model over N processes, one per GPU (cuda:0..N-1 from --device's); "
                             "prefill and decode workers may differ (KV handoffs regroup the heads)")
    engine.add_argument("--speculative-config", default=None, metavar="JSON",
                        help='speculative decoding, as vLLM\'s: \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                             'or \'{"model": DRAFT_DIR, "num_speculative_tokens": 4}\' (decode and colocated '
                             'workers; a prefill worker refuses it: its requests end at their first token)')
    engine.add_argument("--enable-lora", action=argparse.BooleanOptionalAction, default=False,
                        help="serve LoRA adapters (--lora-modules, /v1/load_lora_adapter)")
    engine.add_argument("--max-loras", type=int, default=1, help="LoRA adapters in GPU slots (run at once)")
    engine.add_argument("--max-cpu-loras", type=int, default=None,
                        help="LoRA adapters kept in host memory when unused (default: --max-loras)")
    engine.add_argument("--max-lora-rank", type=int, default=16, help="largest LoRA rank served")
    engine.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                        help="LoRA adapters (PEFT directories) served from the start; requests name them "
                             "in the `model` field (needs --enable-lora)")
    parser.set_defaults(_engine_fields=list(_ENGINE_FIELDS) + _engine_field_flags(engine, set(_ENGINE_FIELDS)))
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="0.0.0.0", help="bind address")
    server.add_argument("--port", type=int, default=50051, help="gRPC port")
    server.add_argument("--metrics-port", type=int, default=9090, help="HTTP port of /metrics")
    server.add_argument("--shutdown-grace-seconds", type=float, default=30.0,
                        help="on SIGTERM, finish in-flight work for at most this long")
    server.add_argument("--warmup", default="auto", choices=["auto", "on", "off"],
                        help="before reporting ready, run every prefill size and decode batch size "
                             "traffic can reach, so their kernels compile first (auto: on CUDA only)")
    server.add_argument("--otlp-traces-endpoint", default=None, metavar="HOST:PORT",
                        help="send OpenTelemetry traces to this OTLP/gRPC collector (default: none)")
    server.add_argument("--cell", default="", help="the cell this worker runs in, reported to the router, which "
                        "pairs prefill and decode workers of one cell first (set by `baton serve-cell`)")
    # Colocated workers accept the KV flags too (one flag set for every role); they move no KV.
    kv = parser.add_argument_group("KV transfer" if role != "colocated" else "KV transfer (ignored here)")
    kv.add_argument("--kv-transfer", default="grpc", choices=list(TRANSPORTS),
                    help="KV data plane; auto: the fastest each prefill/decode pair can use "
                         "(ipc on one node, ucx with RDMA, else tcp)")
    kv.add_argument("--kv-port", type=int, default=50052, help="UCX listener port (decode workers)")
    kv.add_argument("--kv-tcp-port", type=int, default=50053,
                    help="KV TCP listener port with --kv-transfer tcp or auto (decode workers)")
    kv.add_argument("--ucx-progress-mode", default=None, choices=list(UCX_PROGRESS_MODES),
                    help="UCXX progress mode with --kv-transfer ucx (default: $UCXPY_PROGRESS_MODE or thread; "
                         "polling and thread-polling are fastest on GPU hosts, thread-polling spins a core)")
    kv.add_argument("--advertise-host", default=None,
                    help="address prefill workers use to reach this worker (default: $POD_IP or the bind address)")
    if role == "decode":
        kv.add_argument("--reservation-ttl-seconds", type=float, default=30.0,
                        help="a reservation not filled within this long is freed")
    return parser


def _lora_module(item: str) -> tuple[str, str]:
    name, sep, path = item.partition("=")
    if not sep:
        raise ValueError(f"--lora-modules: {item!r} is not NAME=PATH")
    return name.strip(), path.strip()


# The speculative decoding flags: vLLM's dict, and the seed's spelling (EngineArgs fields).
SPECULATIVE_FLAGS = ("speculative_config", "speculative_model", "num_speculative_tokens")


def _refuse_speculation(ns: argparse.Namespace) -> None:
    """A prefill worker's requests end at their first token, which no draft speeds up: a
    speculative setting there would only load a draft model, so it is refused, not ignored."""
    given = next((name for name in SPECULATIVE_FLAGS if getattr(ns, name) is not None), None)
    if given is not None:
        raise ValueError(f"--{given.replace('_', '-')} does not apply to a prefill worker: its requests end at "
                         "their first token, so it never speculates (a draft model would only take memory); "
                         "set it on the decode workers (baton serve-decode) or colocated workers")


def parse(argv: list[str], prog: str, role: str) -> tuple[Any, WorkerOptions]:
    """Returns (EngineArgs, WorkerOptions); argparse exits with status 2 on bad flags."""
    parser = build_parser(prog, role)
    ns = parser.parse_args(argv)
    try:
        options = WorkerOptions(
            role=role,
            host=ns.host,
            port=ns.port,
            metrics_port=ns.metrics_port,
            kv_transfer=ns.kv_transfer,
            kv_port=ns.kv_port,
            kv_tcp_port=ns.kv_tcp_port,
            advertise_host=ns.advertise_host,
            shutdown_grace_seconds=ns.shutdown_grace_seconds,
            reservation_ttl_seconds=getattr(ns, "reservation_ttl_seconds", 30.0),
            ucx_progress_mode=ns.ucx_progress_mode,
            warmup=ns.warmup,
            otlp_traces_endpoint=ns.otlp_traces_endpoint,
            cell=ns.cell,
            lora_modules=tuple(_lora_module(item) for item in ns.lora_modules),
        )
        if options.lora_modules and not ns.enable_lora:
            raise ValueError("--lora-modules needs --enable-lora")
        if role == "prefill":
            _refuse_speculation(ns)
    except ValueError as exc:
        parser.error(str(exc))
    from baton.engine.config import EngineArgs

    return EngineArgs(**{name: getattr(ns, name) for name in ns._engine_fields}), options
