"""Real processes on loopback: `baton up` (or single workers) started and read like a user would."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import openai

# Small engines: a 64-block KV pool (1,024 tokens) per worker keeps startup and memory low.
ENGINE_FLAGS = ["--num-gpu-blocks-override", "64", "--device", "cpu"]
READY = "Baton is ready"
_LINE = re.compile(r"baton (?:up|serve): (\S+)\s+pid (\d+)\s+(.*)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Process:
    name: str
    pid: int
    grpc: str | None = None
    metrics_url: str | None = None

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        # A zombie (exited, not reaped) counts as gone.
        try:
            return Path(f"/proc/{self.pid}/stat").read_text().split()[2] != "Z"
        except OSError:
            return False


@dataclass
class Deployment:
    """A running `baton up` and what it printed about its processes."""

    proc: subprocess.Popen
    url: str
    api_key: str | None
    model: str = "tiny-llama-v1"
    processes: dict[str, Process] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused",
                             max_retries=0, timeout=kwargs.pop("timeout", 60), **kwargs)

    def async_client(self, **kwargs) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused",
                                  max_retries=0, timeout=kwargs.pop("timeout", 60), **kwargs)

    def workers(self) -> list[Process]:
        return [p for name, p in self.processes.items() if name != "router"]

    def metric(self, name: str, process: str) -> float:
        url = self.processes[process].metrics_url if process != "router" else f"{self.url}/metrics"
        return scrape(url, name)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 40) -> int:
        return stop_process(self.proc, sig, timeout)


def stop_process(proc: subprocess.Popen, sig: int, timeout: float) -> int:
    """Send `sig` (if it still runs) and return its exit status; SIGKILL and raise after `timeout`."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def kv_usage(dep: Deployment, name: str) -> float:
    """The share of the worker's KV pool in use (0.0: no block held)."""
    return dep.metric("baton:kv_cache_usage_perc", name)


def series_sum(url: str, name: str, label: str = "") -> float:
    """The sum of the samples of the labelled series `name` at a /metrics URL whose labels
    contain `label` (e.g. 'transport="ipc"'); 0 when there is none."""
    with urllib.request.urlopen(url, timeout=5) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{") and label in line)


def scrape(url: str, name: str) -> float:
    """The value of an unlabelled-by-us series `name` (first sample) at a /metrics URL."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name} not in {url}")


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it is true. One that raises OSError (a metrics scrape or a
    connection that timed out while a loaded machine starved the process) counts as not yet;
    the last such error is chained to the timeout."""
    deadline = time.monotonic() + timeout
    error = None
    while True:
        try:
            value = predicate()
        except OSError as exc:
            value, error = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}") from error
        time.sleep(interval)


def baton_up(*args: str, api_key: str | None = None, env: dict | None = None,
             timeout: float = 120, command: str = "up") -> Deployment:
    """Start `baton up` (or `baton serve`: `command`) with the test engine flags; return once
    it printed that it is ready."""
    port = free_port()
    argv = [sys.executable, "-m", "baton.cli", command, "--port", str(port),
            "--shutdown-grace-seconds", "5", *ENGINE_FLAGS, *args]
    env = {**os.environ, **(env or {})}
    env.pop("BATON_API_KEY", None)
    if api_key:
        env["BATON_API_KEY"] = api_key  # never a flag: argv shows in `ps`
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    dep = Deployment(proc, f"http://127.0.0.1:{port}", api_key)

    def read(line: str) -> bool:
        m = _LINE.match(line.strip())
        if m:
            name, pid, info = m.group(1), int(m.group(2)), m.group(3)
            grpc = re.search(r"grpc (\S+)", info)
            metrics = re.search(r"metrics (\S+)", info)
            dep.processes[name] = Process(name, pid, grpc.group(1) if grpc else None,
                                          metrics.group(1) if metrics else None)
        return READY in line

    follow(proc, dep.output, read, "baton up", timeout)
    return dep


def follow(proc: subprocess.Popen, output: list[str], read, what: str, timeout: float) -> None:
    """Keep appending `proc`'s output lines to `output` (a thread); return once `read(line)`
    said a line means ready. Kills `proc` and raises, with its last lines, if it exits first
    or `timeout` passes."""
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            output.append(line)
            if read(line):
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{what} did not become ready:\n" + "".join(output[-60:]))


_ENGINE_READY = re.compile(r"^\[(\S+)\] baton \S+ worker ready: grpc \S+:(\d+) metrics :(\d+)")


@dataclass
class Cell:
    """A running `baton serve-cell` (engines on free ports) and its engines by name."""

    proc: subprocess.Popen
    name: str
    engines: dict[str, Process] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)
    health_port: int | None = None

    def addresses(self, role: str) -> list[str]:
        return [p.grpc for n, p in self.engines.items() if n.startswith(role)]

    def metric(self, engine: str, name: str, label: str = "") -> float:
        return series_sum(self.engines[engine].metrics_url, name, label)

    def stop(self, timeout: float = 40) -> int:
        return stop_process(self.proc, signal.SIGTERM, timeout)


def serve_cell(name: str, *args: str, prefill: int = 1, decode: int = 1, timeout: float = 120,
               engine_flags: tuple[str, ...] = tuple(ENGINE_FLAGS)) -> Cell:
    """Start `baton serve-cell` on free ports with `engine_flags` (small CPU engines by
    default); return once ready."""
    argv = [sys.executable, "-m", "baton.cli", "serve-cell", "--cell", name, "--prefill", str(prefill),
            "--decode", str(decode), "--host", "127.0.0.1", "--port", "0", "--engine-port", "0",
            "--engine-metrics-port", "0", "--engine-kv-port", "0", "--engine-kv-tcp-port", "0",
            "--shutdown-grace-seconds", "5", *engine_flags, *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    cell = Cell(proc, name)

    def read(line: str) -> bool:
        m = _ENGINE_READY.match(line.strip())
        if m:
            engine = m.group(1)
            cell.engines[engine] = Process(engine, 0, f"127.0.0.1:{m.group(2)}",
                                           f"http://127.0.0.1:{m.group(3)}/metrics")
        m = re.search(r"baton cell ready: cell \S+ health :(\d+)", line)
        if m:
            cell.health_port = int(m.group(1))
        return m is not None

    follow(proc, cell.output, read, "baton serve-cell", timeout)
    return cell


@dataclass
class Router:
    proc: subprocess.Popen
    url: str
    output: list[str] = field(default_factory=list)  # its log lines, for a failing test to show

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                             timeout=kwargs.pop("timeout", 60), **kwargs)

    def counter(self, name: str, label: str) -> float:
        """A router counter's samples whose labels contain `label` (e.g. 'pairing="same_cell"')."""
        return series_sum(f"{self.url}/metrics", name, label)

    def stop(self, timeout: float = 30) -> int:
        return stop_process(self.proc, signal.SIGTERM, timeout)


def serve_router(model_dir: Path, *args: str, timeout: float = 60) -> Router:
    """`baton serve-router` on a free port; returns once `/ready` says every worker is healthy."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "baton.cli", "serve-router", "--model", str(model_dir),
                             "--host", "127.0.0.1", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    router = Router(proc, f"http://127.0.0.1:{port}")
    threading.Thread(target=lambda: router.output.extend(proc.stdout), daemon=True).start()

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{router.url}/ready", timeout=2) as response:
                body = json.load(response)
        except (OSError, ValueError):
            return False
        return body.get("ready") and all(w["healthy"] == w["total"] for w in body["workers"].values())

    try:
        wait_until(ready, timeout=timeout, interval=0.2, what="the router to see every worker")
    except AssertionError:
        proc.kill()
        raise
    return router
