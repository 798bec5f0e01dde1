"""`baton serve-cell`: a cell, the prefill and decode engines of one pod, as one process tree.

A cell is node-local P/D (docs/decisions.md, "Cells"): `--prefill N --decode M` engine
processes (`baton serve-prefill` / `serve-decode`), engine k on GPU k (`--device cuda`;
with fewer GPUs than engines, GPU k mod their number, and each engine's
`--gpu-memory-utilization` must leave room for the others; on the CPU every engine is a
CPU engine), all with `--kv-transfer auto` and `--cell NAME`.
Flags the cell does not take go to every engine: the model's, and LoRA's (`--enable-lora
--lora-modules ...`), so prefill and decode engines serve the same adapters. Speculative
decoding's flags are refused there (and in `--prefill-args`): prefill engines never speculate,
so they go in `--decode-args`.
Every engine serves its own gRPC role, so the router addresses it like any worker; the
cell name it reports lets the router pair a prefill engine with a decode engine of the same
cell, whose handoff `auto` then moves by `ipc` (CUDA IPC between the pod's GPUs, shared
memory on the CPU).

Ports: engine k listens on `--engine-port + k` (gRPC), `--engine-metrics-port + k`
(/metrics), `--engine-kv-port + k` (UCX) and `--engine-kv-tcp-port + k` (KV TCP and `ipc`
control); a base of 0 lets each engine take free ports (several cells on one machine). The
cell itself answers `grpc.health.v1` on `--port`: SERVING only while every engine is.

Supervision (the cell is the unit the kubelet restarts): the cell starts the engines with
`baton up`'s process code (output prefixed per engine, children die with the cell), prints
`baton cell ready: ...` once every engine reported its ports, and then
- on SIGTERM or SIGINT forwards SIGTERM to every engine (each drains its streams) and exits
  0 once they stopped;
- when an engine exits on its own, stops the others the same way and exits 1, so the pod
  restarts whole: peers of a dead engine hold mappings of its KV pool, which only their own
  exit releases, and the restart count shows in `kubectl get pods`.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import socket
import sys
import threading
import time
from concurrent import futures

from baton.up import READY_TIMEOUT_S, Child, cpu_thread_env, start, stop, wait_reported

HEALTH_POLL_S = 1.0
# A prefill engine refuses these (baton/worker/flags.py): the cell refuses them before any engine starts.
SPECULATIVE_FLAGS = ("--speculative-config", "--speculative-model", "--num-speculative-tokens")
FIRST_CHECK_S = 10.0  # the first health check of every engine, before `baton cell ready`


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="baton serve-cell", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Run a cell: prefill and decode engine processes of one pod, KV between them by ipc. "
                    "Flags not listed here are passed to every engine (baton serve-prefill --help).")
    p.add_argument("--prefill", type=int, default=1, help="prefill engines")
    p.add_argument("--decode", type=int, default=1, help="decode engines")
    p.add_argument("--cell", default=None, help="the name engines report to the router (default: the host name, "
                   "which is the pod's name in Kubernetes)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto (cuda if available), cpu or cuda: engine k runs on GPU k "
                   "(k mod the GPUs visible, when there are fewer)")
    p.add_argument("--host", default="0.0.0.0", help="bind address of the cell and its engines")
    p.add_argument("--port", type=int, default=50051, help="the cell's gRPC health port (0: a free port)")
    p.add_argument("--engine-port", type=int, default=50100, help="gRPC port of engine 0 (engine k: +k; 0: free ports)")
    p.add_argument("--engine-metrics-port", type=int, default=9100, help="/metrics port of engine 0 (0: free ports)")
    p.add_argument("--engine-kv-port", type=int, default=50200, help="UCX port of engine 0 (0: free ports)")
    p.add_argument("--engine-kv-tcp-port", type=int, default=50300, help="KV TCP port of engine 0 (0: free ports)")
    p.add_argument("--prefill-args", default="", metavar="ARGS", help="extra flags for the prefill engines only")
    p.add_argument("--decode-args", default="", metavar="ARGS", help="extra flags for the decode engines only (e.g. --speculative-config)")
    p.add_argument("--shutdown-grace-seconds", type=float, default=30.0,
                   help="on SIGTERM, how long each engine may finish its streams")
    p.add_argument("--quiet", action="store_true", help="hide the engines' own output")
    return p


def _gpu_count(device: str) -> int:
    if device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _port(base: int, k: int) -> int:
    return base + k if base else 0


def plan(args: argparse.Namespace, engine_argv: list[str], gpus: int) -> list[Child]:
    """The engine processes: prefill engines first, engine k on GPU k mod `gpus` (0: CPU)."""
    roles = ["prefill"] * args.prefill + ["decode"] * args.decode
    env = {} if gpus else cpu_thread_env(len(roles))
    children = []
    for k, role in enumerate(roles):
        index = k if role == "prefill" else k - args.prefill
        argv = ["serve-" + role, *engine_argv, "--device", f"cuda:{k % gpus}" if gpus else "cpu",
                "--host", args.host, "--cell", args.cell, "--kv-transfer", "auto",
                "--kv-port", str(_port(args.engine_kv_port, k)),
                "--kv-tcp-port", str(_port(args.engine_kv_tcp_port, k)),
                "--shutdown-grace-seconds", str(args.shutdown_grace_seconds),
                *shlex.split(args.prefill_args if role == "prefill" else args.decode_args)]
        ports = {"port": _port(args.engine_port, k), "metrics_port": _port(args.engine_metrics_port, k)}
        children.append(Child(f"{role}-{index}", argv, env, ports))
    return children


class CellHealth:
    """`grpc.health.v1` for the pod: SERVING while every engine's own health says SERVING
    (polled every HEALTH_POLL_S), NOT_SERVING otherwise and while stopping."""

    def __init__(self, host: str, port: int, engines: list[Child]):
        import grpc
        from grpc_health.v1 import health, health_pb2_grpc

        self.engines = engines
        self.servicer = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot listen on {address} (is the port in use?)")
        self._stop = threading.Event()
        self._channels = [grpc.insecure_channel(engine.address) for engine in engines]
        # The first answer is true already: wait (bounded) for every engine's first reply.
        self._set(self._engines_serving(timeout=FIRST_CHECK_S, wait_for_ready=True))
        self.server.start()
        self._thread = threading.Thread(target=self._poll, name="cell-health", daemon=True)
        self._thread.start()

    def _set(self, serving: bool) -> None:
        from grpc_health.v1 import health_pb2

        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.servicer.set("", status)

    def _engines_serving(self, timeout: float = HEALTH_POLL_S, wait_for_ready: bool = False) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        for channel in self._channels:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout,
                                                                 wait_for_ready=wait_for_ready)
            except grpc.RpcError:
                return False
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                return False
        return True

    def _poll(self) -> None:
        try:
            while not self._stop.wait(HEALTH_POLL_S):
                serving = self._engines_serving()
                if not self._stop.is_set():
                    self._set(serving)
        finally:
            for channel in self._channels:
                channel.close()

    def close(self) -> None:
        self._stop.set()
        self._set(False)
        self._thread.join(timeout=2 * HEALTH_POLL_S + 1)
        self.server.stop(grace=0.5)


def main(argv: list[str]) -> int:
    args, engine_argv = build_parser().parse_known_args(argv)
    if args.prefill < 1 or args.decode < 1:
        print("baton serve-cell: a cell needs --prefill >= 1 and --decode >= 1 "
              "(a single role is a fleet: baton serve-prefill / serve-decode)", file=sys.stderr)
        return 2
    for flag in ("--port", "--metrics-port", "--kv-port", "--kv-tcp-port", "--device", "--cell", "--kv-transfer"):
        if any(a == flag or a.startswith(flag + "=") for a in engine_argv):
            print(f"baton serve-cell: {flag} is set per engine by the cell; use its --engine-* or cell flags",
                  file=sys.stderr)
            return 2
    prefill_argv = [*engine_argv, *shlex.split(args.prefill_args)]
    speculative = next((a.split("=", 1)[0] for a in prefill_argv if a.split("=", 1)[0] in SPECULATIVE_FLAGS), None)
    if speculative is not None:
        # Flags outside --decode-args reach the prefill engines, which never speculate.
        print(f"baton serve-cell: {speculative} would reach the prefill engines, whose requests end at their "
              f"first token (they never speculate); pass it to the decode engines only: --decode-args "
              f"'{speculative} ...'", file=sys.stderr)
        return 2
    args.cell = args.cell or socket.gethostname()
    count = args.prefill + args.decode
    gpus = _gpu_count(args.device)
    if args.device == "cuda" and not gpus:
        print("baton serve-cell: --device cuda, but no GPU is visible (all of the cell's GPUs must be visible "
              "to the cell: its engines map each other's KV pools by CUDA IPC)", file=sys.stderr)
        return 2
    if gpus and gpus < count:
        print(f"baton serve-cell: {count} engines share {gpus} GPU(s); give each a --gpu-memory-utilization "
              "that leaves room for the others", file=sys.stderr, flush=True)
    if "--model" not in engine_argv and not any(a.startswith("--model=") for a in engine_argv):
        from baton.engine.tiny_model import ensure_tiny_model

        engine_argv = ["--model", str(ensure_tiny_model()), *engine_argv]  # once, not per engine
    engines = plan(args, engine_argv, gpus)
    stopping = threading.Event()

    def on_signal(signum, frame):
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    health = None
    status = 0
    try:
        for engine in engines:
            start(engine, args.quiet)
        # Short waits, so that a SIGTERM during a long start (warm-up on GPUs) is heard.
        deadline = time.monotonic() + READY_TIMEOUT_S
        problem = "stopped"
        while not stopping.is_set():
            problem = wait_reported(engines, 0.5)
            if problem is None or any(e.proc.poll() is not None for e in engines) or time.monotonic() > deadline:
                break
        if stopping.is_set():
            return 0
        if problem is not None:
            dead = next((e for e in engines if e.proc.poll() is not None), None)
            if dead is not None:
                dead.pump.join(timeout=2)
                problem = dead.why()
            print(f"baton serve-cell: failed to start: {problem}", file=sys.stderr)
            return 1
        health = CellHealth(args.host, args.port, engines)
        listed = " ".join(f"{e.name}={e.address.rsplit(':', 1)[1]}/{e.ports['metrics_port']}" for e in engines)
        print(f"baton cell ready: cell {args.cell} health :{health.port} engines {listed}", flush=True)
        while not stopping.is_set():
            dead = next((e for e in engines if e.proc.poll() is not None), None)
            if dead is not None:
                dead.pump.join(timeout=2)
                print(f"baton serve-cell: {dead.why()}; stopping the cell", file=sys.stderr, flush=True)
                status = 1
                break
            stopping.wait(0.5)
        return status
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if health is not None:
            health.close()
        with contextlib.suppress(KeyboardInterrupt):
            stop(engines, args.shutdown_grace_seconds)
