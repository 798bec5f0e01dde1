"""`baton up`: the router and its workers as local processes, on one machine.

Starts the workers (prefill and decode, or colocated), each binding port 0 for gRPC,
/metrics and KV and printing the ports it got (`baton <role> worker ready: ...`), so no
two processes ever race for a port; then the router, given those addresses. It waits until
the router sees every worker healthy (`GET /ready`), prints the URL and a ready-to-paste
`curl`, and supervises: a child that exits is started again after a back-off (1 s,
doubling to 30 s; reset once it ran for a minute), as a kubelet would, on the ports it had.
A child that fails before it is ready fails the start, with its last lines of output.
On Ctrl-C (or SIGTERM) it stops the router first, then the workers, each with SIGTERM
(they finish what they serve) and SIGKILL after the grace period. Children die with
`baton up` even if it is killed outright (Linux parent-death signal), so nothing is left
behind. Each child's output is shown prefixed with its name.

The API key never travels in a command line and is never printed: `baton up` reads it from
$BATON_API_KEY (the router inherits it) or `--api-key-file` (the router reads the file).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from baton.router.config import add_chat_flags

READY_TIMEOUT_S = 600.0
BACKOFF_S = (1.0, 30.0)  # first and longest wait before a child is started again
STABLE_S = 60.0  # a child that ran this long starts again after the shortest wait
_WORKER_READY = re.compile(r"baton \S+ worker ready: grpc (\S+) metrics :(\d+)")


@dataclass
class Child:
    """One supervised process. Workers get `--port` and `--metrics-port` from `ports` (0 until
    the first start reported what it bound; the same ports afterwards, since the router and
    Prometheus know them); KV listeners always bind port 0 (tickets carry their addresses)."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] | None = None  # None for the router (its port is the user's)
    info: str = ""
    proc: subprocess.Popen | None = None
    pump: threading.Thread | None = field(default=None, repr=False)
    reported: threading.Event = field(default_factory=threading.Event, repr=False)
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20), repr=False)
    started_at: float = 0.0
    backoff: float = 0.0
    restart_at: float | None = None

    @property
    def is_worker(self) -> bool:
        return self.ports is not None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports['port']}"

    def command(self) -> list[str]:
        if not self.is_worker:
            return self.argv
        return [*self.argv, "--port", str(self.ports["port"]), "--metrics-port", str(self.ports["metrics_port"])]

    def why(self) -> str:
        lines = "".join(f"\n  {line}" for line in self.tail)
        return f"{self.name} exited with status {self.proc.returncode}" + (f"; its last output:{lines}" if lines else "")


def _parent_death_signal() -> None:
    """In the child, before exec: die with SIGTERM when `baton up` dies (Linux only)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help already says it or there is none to show."""

    def _get_help_string(self, action):
        if "default:" in (action.help or "") or action.default is None or action.default is False \
                or action.default == []:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton up", description="Run Baton (router + workers) on this machine.",
                                formatter_class=_DefaultsHelp)
    p.add_argument("--model", default=None, help="Hugging Face model directory (default: the embedded tiny model)")
    p.add_argument("--served-model-name", default=None, help="NAME[,ALIAS...] clients put in 'model' "
                   "(default: the model directory's name)")
    p.add_argument("--model-module", default=None, metavar="MODULE",
                   help="module name or .py path each worker imports first (registers architectures)")
    p.add_argument("--enable-lora", action="store_true", help="workers serve LoRA adapters (requests name "
                   "them in 'model'; /v1/load_lora_adapter adds more)")
    p.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                   help="LoRA adapters (PEFT directories) every worker serves from the start (implies --enable-lora)")
    p.add_argument("--max-loras", type=int, default=None, help="LoRA adapters run at once per worker (GPU slots)")
    p.add_argument("--max-lora-rank", type=int, default=None, help="largest LoRA rank served")
    p.add_argument("--max-cpu-loras", type=int, default=None,
                   help="unused LoRA adapters kept in host memory per worker (default: --max-loras)")
    p.add_argument("--host", default="127.0.0.1", help="router bind address")
    p.add_argument("--port", type=int, default=8000, help="router port")
    p.add_argument("--mode", default="disaggregated", choices=["disaggregated", "colocated"],
                   help="separate prefill and decode workers, or workers that do both")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers (disaggregated)")
    p.add_argument("--decode", type=int, default=1, help="decode workers (disaggregated)")
    p.add_argument("--colocated", "--workers", dest="colocated", type=int, default=1,
                   help="colocated workers (--workers is an older spelling)")
    p.add_argument("--transport", default="grpc", choices=["grpc", "ucx", "tcp", "auto"],
                   help="KV data plane (auto: each prefill/decode pair picks; on one host, ipc)")
    p.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="file holding the bearer token /v1/* requires (or set $BATON_API_KEY; default: none)")
    p.add_argument("--api-key", default=None, help=argparse.SUPPRESS)  # refused: see main()
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (workers spread over the GPUs)")
    p.add_argument("--dtype", default="auto", help="weights and activations: auto (the checkpoint's; float32 "
                   "on CPU), bfloat16, float16 or float32")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="each worker splits the model over N processes, one per GPU (workers take N "
                        "consecutive GPUs each)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="sequences a worker runs at once "
                   "(default: the engine's, 256)")
    p.add_argument("--num-gpu-blocks-override", type=int, default=None,
                   help="KV blocks per worker (default: sized from memory)")
    p.add_argument("--kv-cache-memory-gb", type=float, default=None,
                   help="KV pool per CPU worker in GB (default: the engine's, 1)")
    p.add_argument("--task", default=None, choices=["generate", "embed"],
                   help="embed: the workers also serve /v1/embeddings (default: generate)")
    p.add_argument("--pooling-type", default=None, choices=["last", "mean", "cls"],
                   help="with --task embed: override the model's pooling (default: as its config says)")
    p.add_argument("--warmup", default="auto", choices=["auto", "on", "off"],
                   help="workers run every prefill size and decode batch size before they report ready "
                        "(auto: on CUDA only)")
    p.add_argument("--routing-policy", default="load", choices=["load", "round-robin"],
                   help="how the router picks workers")
    p.add_argument("--max-queue", type=int, default=None, help="streams that may wait per decode worker "
                   "before a 429 (default: one batch, from what the workers report)")
    p.add_argument("--max-failovers", type=int, default=None,
                   help="times a stream is resumed elsewhere after its decode worker is lost (default: the router's, 2)")
    p.add_argument("--local-prefill-tokens", type=int, default=None,
                   help="prompts shorter than this prefill on the decode worker (default: the router's, 0: off)")
    p.add_argument("--max-request-mb", type=float, default=None,
                   help="largest request body in MiB (default: the router's, 32)")
    add_chat_flags(p)
    p.add_argument("--shutdown-grace-seconds", type=float, default=10.0,
                   help="how long each process may finish what it serves on Ctrl-C")
    p.add_argument("--otlp-traces-endpoint", default=None, metavar="HOST:PORT",
                   help="router and workers send OpenTelemetry traces to this OTLP/gRPC collector")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help="speculative decoding on the decode (or colocated) workers, vLLM's dict: "
                        '\'{"method": "ngram", "num_speculative_tokens": 4}\' or a draft "model"')
    p.add_argument("--quiet", action="store_true", help="hide the workers' and router's own output")
    p.set_defaults(prog="baton up", engine_args=[], router_env={})  # set by `baton serve`
    return p


def _gpu_count(device: str) -> int:
    if device not in ("auto", "cuda"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cpu_thread_env(num_workers: int) -> dict[str, str]:
    """Environment for CPU workers sharing this machine: they split the cores instead of
    each starting one thread per core (which oversubscribes them several times over); an
    explicit OMP_NUM_THREADS wins."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // num_workers))}


def plan(args: argparse.Namespace, model_dir: Path) -> list[Child]:
    """The workers to start (the router comes once they reported their ports)."""
    engine_flags = ["--model", str(model_dir), "--dtype", args.dtype, "--warmup", args.warmup]
    if args.served_model_name:  # a worker reports one name (in Info, as its metrics' model_name): the first
        engine_flags += ["--served-model-name", model_name(args, model_dir)]
    for flag in ("max_model_len", "max_num_seqs", "num_gpu_blocks_override",
                 "kv_cache_memory_gb", "task", "pooling_type", "max_loras", "max_lora_rank", "max_cpu_loras"):
        value = getattr(args, flag)
        if value is not None:
            engine_flags += [f"--{flag.replace('_', '-')}", str(value)]
    engine_flags += args.engine_args
    if args.model_module:  # workers may start elsewhere than here: a path is made absolute
        module = args.model_module
        engine_flags += ["--model-module", str(Path(module).resolve()) if module.endswith(".py") or "/" in module else module]
    if args.enable_lora or args.lora_modules:
        engine_flags.append("--enable-lora")
    if args.lora_modules:  # absolute paths: the workers' working directory is not the user's
        engine_flags += ["--lora-modules", *(f"{name}={Path(path).resolve()}" if sep else name for name, sep, path
                                             in (item.partition("=") for item in args.lora_modules))]
    gpus = _gpu_count(args.device)
    tp = args.tensor_parallel_size
    if tp > 1:
        engine_flags += ["--tensor-parallel-size", str(tp)]
    roles = ([("prefill", args.prefill), ("decode", args.decode)] if args.mode == "disaggregated"
             else [("colocated", args.colocated)])
    env = {} if gpus else cpu_thread_env(sum(n for _, n in roles) * tp)  # every rank a process
    children = []
    k = 0
    for role, count in roles:
        for i in range(count):
            device = f"cuda:{(k * tp) % (gpus - gpus % tp)}" if gpus else args.device
            k += 1
            argv = ["serve-" + role, *engine_flags, "--device", device, "--host", "127.0.0.1",
                    "--shutdown-grace-seconds", str(args.shutdown_grace_seconds)]
            if args.otlp_traces_endpoint:
                argv += ["--otlp-traces-endpoint", args.otlp_traces_endpoint]
            if args.speculative_config and role != "prefill":  # prefill requests end at their first token
                argv += ["--speculative-config", args.speculative_config]
            if role != "colocated":
                argv += ["--kv-transfer", args.transport, "--kv-port", "0", "--kv-tcp-port", "0"]
            children.append(Child(f"{role}-{i}", argv, env, {"port": 0, "metrics_port": 0}))
    return children


def router_child(args: argparse.Namespace, model_dir: Path, workers: list[Child]) -> Child:
    router = ["serve-router", "--model", str(model_dir), "--host", args.host, "--port", str(args.port),
              "--routing-policy", args.routing_policy,
              "--shutdown-grace-seconds", str(args.shutdown_grace_seconds)]
    addresses: dict[str, list[str]] = {}
    for worker in workers:
        addresses.setdefault(worker.name.rsplit("-", 1)[0], []).append(worker.address)
    for role, addrs in addresses.items():
        router += [f"--{role}", ",".join(addrs)]
    for flag in ("served_model_name", "api_key_file", "max_queue", "max_request_mb",
                 "otlp_traces_endpoint", "max_failovers", "local_prefill_tokens", "tool_call_parser",
                 "chat_template"):
        value = getattr(args, flag)
        if value is not None:
            router += [f"--{flag.replace('_', '-')}", str(value)]
    for switch in ("enable_auto_tool_choice", "trust_request_chat_template"):
        if getattr(args, switch):
            router.append(f"--{switch.replace('_', '-')}")
    return Child("router", router, dict(args.router_env), info=f"http://{args.host}:{args.port}")


def _pump(child: Child, quiet: bool) -> None:
    for line in child.proc.stdout:
        child.tail.append(line.rstrip())
        m = _WORKER_READY.search(line) if child.is_worker and not child.reported.is_set() else None
        if m:
            child.ports["port"] = int(m.group(1).rsplit(":", 1)[1])
            child.ports["metrics_port"] = int(m.group(2))
            child.info = f"grpc {child.address}  metrics http://127.0.0.1:{child.ports['metrics_port']}/metrics"
            child.reported.set()
        if not quiet:
            sys.stdout.write(f"[{child.name}] {line}")
            sys.stdout.flush()


def start(child: Child, quiet: bool) -> None:
    child.reported.clear()
    child.tail.clear()
    child.started_at = time.monotonic()
    child.restart_at = None
    child.proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "baton.cli", *child.command()], env={**os.environ, **child.env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        errors="replace", start_new_session=True, preexec_fn=_parent_death_signal)
    child.pump = threading.Thread(target=_pump, args=(child, quiet), daemon=True)
    child.pump.start()


def wait_reported(workers: list[Child], timeout: float) -> str | None:
    """None once every worker printed the ports it bound; otherwise why not."""
    deadline = time.monotonic() + timeout
    while not all(w.reported.is_set() for w in workers):
        for worker in workers:
            if worker.proc.poll() is not None and not worker.reported.is_set():
                worker.pump.join(timeout=2)
                return worker.why()
        if time.monotonic() > deadline:
            return f"the workers did not report their ports after {timeout:.0f}s"
        time.sleep(0.1)
    return None


def wait_ready(url: str, children: list[Child], timeout: float) -> str | None:
    """None when the router reports every worker it was given healthy (its `/ready` needs
    only one per role); otherwise why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children:
            if child.proc.poll() is not None:
                child.pump.join(timeout=2)
                return child.why()
        with contextlib.suppress(urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as response:
                body = json.load(response)
                if body.get("ready") and all(w["healthy"] == w["total"] for w in body["workers"].values()):
                    return None
        time.sleep(0.25)
    return f"not ready after {timeout:.0f}s"


def supervise(children: list[Child], quiet: bool, prog: str = "baton up") -> None:
    """One pass: a child that exited is started again after its back-off."""
    now = time.monotonic()
    for child in children:
        if child.proc is None or child.proc.poll() is None:
            continue
        if child.restart_at is None:
            ran = now - child.started_at
            child.backoff = BACKOFF_S[0] if ran >= STABLE_S or not child.backoff else min(2 * child.backoff, BACKOFF_S[1])
            child.restart_at = now + child.backoff
            print(f"{prog}: {child.why()}; starting it again in {child.backoff:.0f}s", file=sys.stderr, flush=True)
        elif now >= child.restart_at:
            start(child, quiet)
            print(f"{prog}: {child.name:<12} pid {child.proc.pid:<8} {child.info}  (restarted)", flush=True)


def stop(children: list[Child], grace: float) -> None:
    """Router first (no new requests), then the workers; SIGKILL whatever outlives the grace."""
    for group in ([c for c in children if c.name == "router"], [c for c in children if c.name != "router"]):
        live = [c for c in group if c.proc is not None and c.proc.poll() is None]
        for child in live:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace + 5
        for child in live:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
    for child in children:
        if child.pump is not None:
            child.pump.join(timeout=2)


def curl_example(url: str, model: str, key_source: str | None, tiny: bool = False) -> str:
    """A request to paste; the key appears as a shell expansion, never itself. The tiny
    model's random weights often pick end-of-sequence first: its example ignores it."""
    request = {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}
    body = json.dumps({**request, "ignore_eos": True} if tiny else request)
    auth = f' -H "Authorization: Bearer {key_source}"' if key_source else ""
    return f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'"


def main(argv: list[str]) -> int:
    return run(build_parser().parse_args(argv))


def prepare(args: argparse.Namespace) -> tuple[Path, str | None] | None:
    """Check `args` (this parser's namespace) and find the model: (its directory, where the
    API key comes from as the curl example writes it, or None without a key); None after
    printing why `args` cannot be served (exit status 2). Writes the embedded tiny model
    when no --model is given."""
    prog = args.prog
    if args.api_key is not None:
        print(f"{prog}: --api-key would show the key to anyone who runs `ps`; put it in $BATON_API_KEY "
              "or in a file given with --api-key-file", file=sys.stderr)
        return None
    if args.mode == "disaggregated" and (args.prefill < 1 or args.decode < 1):
        print(f"{prog}: --prefill and --decode must be >= 1", file=sys.stderr)
        return None
    if args.mode == "colocated" and args.colocated < 1:
        print(f"{prog}: --colocated must be >= 1", file=sys.stderr)
        return None
    if args.tensor_parallel_size < 1:
        print(f"{prog}: --tensor-parallel-size must be >= 1", file=sys.stderr)
        return None
    gpus = _gpu_count(args.device)
    if 0 < gpus < args.tensor_parallel_size:
        print(f"{prog}: --tensor-parallel-size {args.tensor_parallel_size} needs that many GPUs per "
              f"worker; this machine has {gpus}", file=sys.stderr)
        return None
    if args.api_key_file is not None:
        if not Path(args.api_key_file).is_file():
            print(f"{prog}: --api-key-file {args.api_key_file} is not a readable file", file=sys.stderr)
            return None
        args.api_key_file = str(Path(args.api_key_file).resolve())
    from baton import settings

    key_source = (f"$(cat {args.api_key_file})" if args.api_key_file
                  else "$BATON_API_KEY" if settings.api_key() else None)
    if args.model:
        model_dir = Path(args.model).resolve()
        if not (model_dir / "config.json").exists():
            print(f"{prog}: {model_dir} is not a model directory (no config.json)", file=sys.stderr)
            return None
    else:
        from baton.engine.tiny_model import ensure_tiny_model

        model_dir = ensure_tiny_model()  # once, before any worker starts
    return model_dir, key_source


def model_name(args: argparse.Namespace, model_dir: Path) -> str:
    return (args.served_model_name or model_dir.name).split(",")[0]


def ready_banner(url: str, name: str, layout: str, key_source: str | None, tiny: bool) -> str:
    """What is printed once Baton serves: the URL, the layout, a request to paste."""
    lines = ["", f"Baton is ready: {url}/v1  (model {name!r}, {layout})"]
    if tiny:
        lines.append("This is the embedded tiny model: its weights are random, so its text is random.")
    lines += ["", "  " + curl_example(url, name, key_source, tiny=tiny), "", "Press Ctrl-C to stop.", ""]
    return "\n".join(lines)


def local_url(host: str, port: int) -> str:
    """The URL to reach a server bound to `host` from this machine."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"


def run(args: argparse.Namespace) -> int:
    """Start, wait until ready, supervise until Ctrl-C or SIGTERM. `args` is this parser's
    namespace; `baton serve` (baton/serve.py) fills one from vLLM's flags, with
    `engine_args` (more worker flags), `router_env` and `prog` (the name in messages)."""
    prog = args.prog
    prepared = prepare(args)
    if prepared is None:
        return 2
    model_dir, key_source = prepared
    children = plan(args, model_dir)

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    # SIGINT too, explicitly: started from a script (`baton up &`, nohup) it inherits SIGINT
    # ignored, and Python then installs no KeyboardInterrupt for it, so kill -INT did nothing.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    url = local_url(args.host, args.port)
    try:
        for child in children:
            start(child, args.quiet)
        problem = wait_reported(children, READY_TIMEOUT_S)
        if problem is not None:
            print(f"{prog}: failed to start: {problem}", file=sys.stderr)
            return 1
        for child in children:
            print(f"{prog}: {child.name:<12} pid {child.proc.pid:<8} {child.info}", flush=True)
        children.append(router_child(args, model_dir, children))
        start(children[-1], args.quiet)
        print(f"{prog}: {'router':<12} pid {children[-1].proc.pid:<8} {children[-1].info}", flush=True)
        problem = wait_ready(url, children, READY_TIMEOUT_S)
        if problem is not None:
            print(f"{prog}: failed to start: {problem}", file=sys.stderr)
            return 1
        layout = (f"{args.prefill} prefill + {args.decode} decode, transport {args.transport}"
                  if args.mode == "disaggregated" else f"{args.colocated} colocated worker(s)")
        print(ready_banner(url, model_name(args, model_dir), f"{args.mode}: {layout}", key_source, not args.model),
              flush=True)
        while True:
            supervise(children, args.quiet, prog)
            time.sleep(0.5)
    except KeyboardInterrupt:
        print(f"\n{prog}: stopping", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with contextlib.suppress(KeyboardInterrupt):
            stop(children, args.shutdown_grace_seconds)
