"""`baton up`: the router and its workers as local processes, on one machine.

Starts the workers (prefill and decode, or colocated) and the router, waits until the
router sees every worker healthy (`GET /ready`), prints the URL and a ready-to-paste `curl`,
and on Ctrl-C (or SIGTERM) stops the router first, then the workers, each with SIGTERM
(they finish what they serve) and SIGKILL after the grace period. Children die with
`baton up` even if it is killed outright (Linux parent-death signal), so nothing is left
behind. Each child's output is shown prefixed with its name.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_S = 600.0


@dataclass
class Child:
    name: str
    argv: list[str]
    info: str = ""
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    pump: threading.Thread | None = field(default=None, repr=False)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _parent_death_signal() -> None:
    """In the child, before exec: die with SIGTERM when `baton up` dies (Linux only)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton up", description="Run Baton (router + workers) on this machine.")
    p.add_argument("--model", default=None, help="Hugging Face model directory (default: the embedded tiny model)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1", help="router bind address")
    p.add_argument("--port", type=int, default=8000, help="router port")
    p.add_argument("--mode", default="disaggregated", choices=["disaggregated", "colocated"])
    p.add_argument("--prefill", type=int, default=1, help="prefill workers (disaggregated)")
    p.add_argument("--decode", type=int, default=1, help="decode workers (disaggregated)")
    p.add_argument("--colocated", "--workers", dest="colocated", type=int, default=1,
                   help="colocated workers (--workers is an older spelling)")
    p.add_argument("--transport", default="grpc", choices=["grpc", "ucx", "tcp", "auto"],
                   help="KV data plane (auto: each prefill/decode pair picks; on one host, ipc)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (workers spread over the GPUs)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--num-gpu-blocks-override", type=int, default=None)
    p.add_argument("--kv-cache-memory-gb", type=float, default=None)
    p.add_argument("--routing-policy", default="load", choices=["load", "round-robin"])
    p.add_argument("--max-queue", type=int, default=None)
    p.add_argument("--shutdown-grace-seconds", type=float, default=10.0)
    p.add_argument("--quiet", action="store_true", help="hide the workers' and router's own output")
    return p


def _gpu_count(device: str) -> int:
    if device not in ("auto", "cuda"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan(args: argparse.Namespace, model_dir: Path) -> list[Child]:
    """The processes to start: workers first, the router last."""
    engine_flags = ["--model", str(model_dir), "--dtype", args.dtype]
    for flag in ("served_model_name", "max_model_len", "max_num_seqs", "num_gpu_blocks_override",
                 "kv_cache_memory_gb"):
        value = getattr(args, flag)
        if value is not None:
            engine_flags += [f"--{flag.replace('_', '-')}", str(value)]
    gpus = _gpu_count(args.device)
    roles = ([("prefill", args.prefill), ("decode", args.decode)] if args.mode == "disaggregated"
             else [("colocated", args.colocated)])
    # CPU workers share the cores instead of each starting one thread per core (which
    # oversubscribes them several times over); an explicit OMP_NUM_THREADS wins.
    env = {}
    if not gpus and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // sum(n for _, n in roles)))
    children, addresses = [], {}
    k = 0
    for role, count in roles:
        for i in range(count):
            port, metrics = free_port(), free_port()
            device = f"cuda:{k % gpus}" if gpus else args.device
            k += 1
            argv = ["serve-" + role, *engine_flags, "--device", device, "--host", "127.0.0.1",
                    "--port", str(port), "--metrics-port", str(metrics),
                    "--shutdown-grace-seconds", str(args.shutdown_grace_seconds)]
            if role != "colocated":
                argv += ["--kv-transfer", args.transport, "--kv-port", str(free_port()),
                         "--kv-tcp-port", str(free_port())]
            children.append(Child(f"{role}-{i}", argv, f"grpc 127.0.0.1:{port}  metrics http://127.0.0.1:{metrics}/metrics",
                                  env))
            addresses.setdefault(role, []).append(f"127.0.0.1:{port}")
    router = ["serve-router", "--model", str(model_dir), "--host", args.host, "--port", str(args.port),
              "--routing-policy", args.routing_policy,
              "--shutdown-grace-seconds", str(args.shutdown_grace_seconds)]
    for role, addrs in addresses.items():
        router += [f"--{role}", ",".join(addrs)]
    for flag in ("served_model_name", "api_key", "max_queue"):
        value = getattr(args, flag)
        if value is not None:
            router += [f"--{flag.replace('_', '-')}", str(value)]
    children.append(Child("router", router, f"http://{args.host}:{args.port}"))
    return children


def _pump(child: Child, quiet: bool) -> None:
    for line in child.proc.stdout:
        if not quiet:
            sys.stdout.write(f"[{child.name}] {line}")
            sys.stdout.flush()


def start(child: Child, quiet: bool) -> None:
    child.proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "baton.cli", *child.argv], env={**os.environ, **child.env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        errors="replace", start_new_session=True, preexec_fn=_parent_death_signal)
    child.pump = threading.Thread(target=_pump, args=(child, quiet), daemon=True)
    child.pump.start()


def wait_ready(url: str, children: list[Child], timeout: float) -> str | None:
    """None when the router reports every worker it was given healthy (its `/ready` needs
    only one per role); otherwise why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children:
            if child.proc.poll() is not None:
                return f"{child.name} exited with status {child.proc.returncode}"
        with contextlib.suppress(urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as response:
                body = json.load(response)
                if body.get("ready") and all(w["healthy"] == w["total"] for w in body["workers"].values()):
                    return None
        time.sleep(0.25)
    return f"not ready after {timeout:.0f}s"


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


def curl_example(url: str, model: str, api_key: str | None) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32})
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    return f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'"


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.mode == "disaggregated" and (args.prefill < 1 or args.decode < 1):
        print("baton up: --prefill and --decode must be >= 1", file=sys.stderr)
        return 2
    if args.mode == "colocated" and args.colocated < 1:
        print("baton up: --colocated must be >= 1", file=sys.stderr)
        return 2
    if args.model:
        model_dir = Path(args.model).resolve()
        if not (model_dir / "config.json").exists():
            print(f"baton up: {model_dir} is not a model directory (no config.json)", file=sys.stderr)
            return 2
    else:
        from baton.engine.tiny_model import ensure_tiny_model

        model_dir = ensure_tiny_model()  # once, before any worker starts
    model_name = (args.served_model_name or model_dir.name).split(",")[0]
    children = plan(args, model_dir)
    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    url = f"http://{host}:{args.port}"
    try:
        for child in children:
            start(child, args.quiet)
            print(f"baton up: {child.name:<10} pid {child.proc.pid:<8} {child.info}", flush=True)
        problem = wait_ready(url, children, READY_TIMEOUT_S)
        if problem is not None:
            print(f"baton up: failed to start: {problem}", file=sys.stderr)
            return 1
        layout = (f"{args.prefill} prefill + {args.decode} decode, transport {args.transport}"
                  if args.mode == "disaggregated" else f"{args.colocated} colocated worker(s)")
        lines = [
            "",
            f"Baton is ready: {url}/v1  (model {model_name!r}, {args.mode}: {layout})",
        ]
        if not args.model:
            lines.append("This is the embedded tiny model: its weights are random, so its text is random.")
        lines += ["", "  " + curl_example(url, model_name, args.api_key), "", "Press Ctrl-C to stop.", ""]
        print("\n".join(lines), flush=True)
        reported: set[str] = set()
        while True:
            for child in children:
                if child.proc.poll() is None or child.name in reported:
                    continue
                if child.name == "router":
                    print(f"baton up: the router exited with status {child.proc.returncode}; stopping",
                          file=sys.stderr)
                    return 1
                # The router routes around a dead worker; keep serving with the others.
                reported.add(child.name)
                print(f"baton up: {child.name} exited with status {child.proc.returncode}",
                      file=sys.stderr, flush=True)
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nbaton up: stopping", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with contextlib.suppress(KeyboardInterrupt):
            stop(children, args.shutdown_grace_seconds)
