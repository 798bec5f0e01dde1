"""Real processes on loopback: `baton up` (or single workers) started and read like a user would."""

from __future__ import annotations

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
_LINE = re.compile(r"baton up: (\S+)\s+pid (\d+)\s+(.*)")


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
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


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
             timeout: float = 120) -> Deployment:
    """Start `baton up` with the test engine flags; return once it printed that it is ready."""
    port = free_port()
    argv = [sys.executable, "-m", "baton.cli", "up", "--port", str(port),
            "--shutdown-grace-seconds", "5", *ENGINE_FLAGS, *args]
    env = {**os.environ, **(env or {})}
    env.pop("BATON_API_KEY", None)
    if api_key:
        env["BATON_API_KEY"] = api_key  # never a flag: argv shows in `ps`
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    dep = Deployment(proc, f"http://127.0.0.1:{port}", api_key)
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            dep.output.append(line)
            m = _LINE.match(line.strip())
            if m:
                name, pid, info = m.group(1), int(m.group(2)), m.group(3)
                grpc = re.search(r"grpc (\S+)", info)
                metrics = re.search(r"metrics (\S+)", info)
                dep.processes[name] = Process(name, pid, grpc.group(1) if grpc else None,
                                              metrics.group(1) if metrics else None)
            if READY in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("baton up did not become ready:\n" + "".join(dep.output[-60:]))
    return dep
