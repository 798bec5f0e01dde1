"""The router's command line (`baton serve-router`) and its typed, frozen configuration.

The flags are the contract with the operator (docs/operations.md, "Process command
lines"). The mode follows from the workers given: colocated workers (`--colocated`,
`--colocated-service`; the older `--worker`, `--worker-service` are accepted too) or prefill
and decode workers, never both.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from baton.router.routing import POLICIES
from baton.router.tool_parsers import PARSERS
from baton.rpc import Keepalive


@dataclass(frozen=True)
class RouterConfig:
    model_dir: Path
    served_model_names: tuple[str, ...]
    host: str = "0.0.0.0"
    port: int = 8000
    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    colocated: tuple[str, ...] = ()
    discovery: str = "static"
    namespace: str = "default"
    services: dict[str, tuple[str, ...]] = field(default_factory=dict)  # role -> its Services' names
    routing_policy: str = "load"
    max_queue: int | None = None  # streams waiting per worker; None: one batch (admission.py)
    api_key: str | None = field(default=None, repr=False)
    poll_interval: float = 0.5
    shutdown_grace_seconds: float = 30.0
    max_request_mb: float = 32.0  # request bodies above this are a 413
    otlp_traces_endpoint: str | None = None  # None: no traces (baton/tracing.py)
    max_failovers: int = 2  # resumptions of one output stream after losing its worker
    local_prefill_tokens: int = 0  # disaggregated: prompts shorter than this prefill on decode; 0: off
    keepalive: Keepalive = Keepalive()  # pings on the channels to workers (baton/rpc.py)
    tool_call_parser: str | None = None  # reads tool_choice auto's output (router/tool_parsers.py)
    enable_auto_tool_choice: bool = False  # tool_choice auto allowed (needs the parser)
    chat_template: str | None = field(default=None, repr=False)  # Jinja text replacing the model's
    trust_request_chat_template: bool = False  # a request's own chat_template is rendered (else a 400)

    def __post_init__(self) -> None:
        if self.discovery not in ("static", "kubernetes"):
            raise ValueError(f"--discovery must be static or kubernetes, got {self.discovery!r}")
        if self.routing_policy not in POLICIES:
            raise ValueError(f"--routing-policy must be one of {sorted(POLICIES)}")
        if not self.max_request_mb > 0:
            raise ValueError("--max-request-mb must be > 0")
        if self.max_failovers < 0:
            raise ValueError("--max-failovers must be >= 0")
        if self.local_prefill_tokens < 0:
            raise ValueError("--local-prefill-tokens must be >= 0")
        if self.max_queue is not None and self.max_queue < 1:
            raise ValueError("--max-queue must be >= 1")
        if not self.served_model_names:
            raise ValueError("--served-model-name needs at least one name")
        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            raise ValueError(f"--tool-call-parser must be one of {', '.join(PARSERS)}, got {self.tool_call_parser!r}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser: the parser reads the model's calls")
        roles = set(self.roles)
        if self.discovery == "static":
            given = {r for r in ("prefill", "decode", "colocated") if self.addresses[r]}
        else:
            given = set(self.services)
        if given != roles:
            raise ValueError(
                "give colocated workers (--colocated / --colocated-service) or both prefill and decode "
                "workers (--prefill and --decode / --prefill-service and --decode-service), not both")
        for role in ("prefill", "decode", "colocated"):
            for address in self.addresses[role]:
                host, _, port = address.rpartition(":")
                if not host or not port.isdigit():
                    raise ValueError(f"worker address must be host:port, got {address!r}")

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * (1 << 20))

    @property
    def disaggregated(self) -> bool:
        if self.discovery == "kubernetes":
            return "colocated" not in self.services
        return not self.colocated

    @property
    def roles(self) -> tuple[str, ...]:
        return ("prefill", "decode") if self.disaggregated else ("colocated",)

    @property
    def addresses(self) -> dict[str, tuple[str, ...]]:
        return {"prefill": self.prefill, "decode": self.decode, "colocated": self.colocated}


def _split(values: list[str] | None) -> tuple[str, ...]:
    out: list[str] = []
    for value in values or []:
        out += [v.strip() for v in value.split(",") if v.strip()]
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton serve-router",
                                description="Run the OpenAI-compatible router in front of Baton workers.")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=None, help="model directory: tokenizer and chat template (default: the tiny model)")
    p.add_argument("--served-model-name", default=None, help="NAME[,ALIAS...] accepted in 'model' (default: directory name)")
    p.add_argument("--prefill", action="append", metavar="ADDR[,ADDR...]", help="static prefill workers, host:port")
    p.add_argument("--decode", action="append", metavar="ADDR[,ADDR...]", help="static decode workers")
    p.add_argument("--colocated", "--worker", dest="colocated", action="append", metavar="ADDR[,ADDR...]",
                   help="static colocated workers (--worker is an older spelling)")
    p.add_argument("--discovery", default="static", choices=["static", "kubernetes"])
    p.add_argument("--namespace", default=None, help="namespace of the EndpointSlices (default: the pod's)")
    p.add_argument("--prefill-service", action="append", metavar="NAME[,NAME...]",
                   help="Services of the prefill workers (a fleet's and a cell's: the router pools them)")
    p.add_argument("--decode-service", action="append", metavar="NAME[,NAME...]",
                   help="Services of the decode workers")
    p.add_argument("--colocated-service", "--worker-service", dest="colocated_service", action="append",
                   metavar="NAME[,NAME...]", help="Services of the colocated workers (--worker-service is an "
                   "older spelling)")
    p.add_argument("--routing-policy", default="load", choices=sorted(POLICIES))
    p.add_argument("--max-queue", type=int, default=None,
                   help="output streams that may wait per decode (or colocated) worker before a 429 "
                        "(default: one batch, what the worker can run at once by its max_num_seqs and KV)")
    p.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="file holding the bearer token /v1/* requires (default: $BATON_API_KEY; none: open)")
    p.add_argument("--api-key", default=None, help=argparse.SUPPRESS)  # refused: argv shows in `ps`
    p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between worker load polls")
    p.add_argument("--shutdown-grace-seconds", type=float, default=30.0)
    p.add_argument("--otlp-traces-endpoint", default=None, metavar="HOST:PORT",
                   help="send OpenTelemetry traces to this OTLP/gRPC collector (default: none)")
    p.add_argument("--max-request-mb", type=float, default=32.0,
                   help="largest request body in MiB; a larger one is a 413 before it is read")
    p.add_argument("--max-failovers", type=int, default=2,
                   help="times one output stream is resumed on another worker after its decode (or "
                        "colocated) worker is lost mid-stream; 0: the stream ends with an error")
    p.add_argument("--local-prefill-tokens", type=int, default=0,
                   help="disaggregated: prompts shorter than this many tokens, and prompts whose leading "
                        "blocks a decode worker prefilled itself before, are prefilled on the decode "
                        "worker (no handoff); 0: every prompt goes to a prefill worker")
    add_chat_flags(p)
    return p


def add_chat_flags(parser) -> None:
    """The router's chat flags, which `baton up` and `baton serve` pass on as they are."""
    parser.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                        help="how tool_choice auto reads the model's tool calls: llama3_json (Llama 3.1+) or "
                             "hermes (Hermes, Qwen 2.5/3); without one, auto is refused")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="allow tool_choice auto (the default when a request gives tools); "
                             "needs --tool-call-parser")
    parser.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                        help="a Jinja chat template (a file, or the template itself) used instead of the "
                             "model's own")
    parser.add_argument("--trust-request-chat-template", action="store_true",
                        help="render a chat template a request gives (chat_template) in the Jinja sandbox; "
                             "without it such requests are a 400 (a template can loop for long on the "
                             "router's CPU)")


def chat_template(value: str | None) -> str | None:
    """--chat-template's text: a file's contents, or the value itself when it is a Jinja
    template (it holds `{{` or `{%`). ValueError otherwise."""
    if value is None:
        return None
    path = Path(value)
    if "{{" not in value and "{%" not in value:
        try:
            return path.read_text()
        except OSError as exc:
            raise ValueError(f"--chat-template: {value!r} is neither a readable file nor a Jinja template ({exc})") from None
    return value


def _api_key(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> str | None:
    """The key from --api-key-file or $BATON_API_KEY; never from a flag's value, which any
    user of the machine can read in the process list."""
    from baton import settings

    if ns.api_key is not None:
        parser.error("--api-key would show the key to anyone who runs `ps`; set $BATON_API_KEY "
                     "or give a file with --api-key-file")
    if ns.api_key_file is None:
        return settings.api_key()
    try:
        key = Path(ns.api_key_file).read_text().strip()
    except OSError as exc:
        parser.error(f"--api-key-file: {exc}")
    if not key:
        parser.error(f"--api-key-file {ns.api_key_file} is empty")
    return key


def parse(argv: list[str]) -> RouterConfig:
    parser = build_parser()
    ns = parser.parse_args(argv)
    from baton import settings

    if ns.model:
        model_dir = Path(ns.model)
    else:
        from baton.engine.tiny_model import ensure_tiny_model  # imports torch, only here

        model_dir = ensure_tiny_model()
    names = _split([ns.served_model_name]) if ns.served_model_name else (model_dir.name,)
    services = {role: _split(names) for role, names in (("prefill", ns.prefill_service),
                                                         ("decode", ns.decode_service),
                                                         ("colocated", ns.colocated_service)) if names}
    try:
        return RouterConfig(
            model_dir=model_dir,
            served_model_names=names,
            host=ns.host,
            port=ns.port,
            prefill=_split(ns.prefill),
            decode=_split(ns.decode),
            colocated=_split(ns.colocated),
            discovery=ns.discovery,
            namespace=ns.namespace or settings.pod_namespace() or "default",
            services=services,
            routing_policy=ns.routing_policy,
            max_queue=ns.max_queue,
            api_key=_api_key(parser, ns),
            poll_interval=ns.poll_interval,
            shutdown_grace_seconds=ns.shutdown_grace_seconds,
            max_request_mb=ns.max_request_mb,
            otlp_traces_endpoint=ns.otlp_traces_endpoint,
            max_failovers=ns.max_failovers,
            local_prefill_tokens=ns.local_prefill_tokens,
            tool_call_parser=ns.tool_call_parser,
            enable_auto_tool_choice=ns.enable_auto_tool_choice,
            chat_template=chat_template(ns.chat_template),
            trust_request_chat_template=ns.trust_request_chat_template,
        )
    except ValueError as exc:
        parser.error(str(exc))

