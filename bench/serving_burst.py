"""Burst load on `baton up`: N streaming chats opened at once, and one huge request.

For each mode it starts `baton up` (tiny model unless --up-args says otherwise), then:

1. burst: opens --streams concurrent streaming chat completions (`max_tokens`
   --max-tokens) at the same moment and follows each to its end. Every stream must either
   complete (`[DONE]` after a finish reason) or be refused with a 429 before it starts;
   a 5xx, an error event inside a stream, a dropped connection or a stream still open
   after --stream-timeout is a failure. Meanwhile `GET /health` is timed every 50 ms.
   Afterwards every worker's KV usage, the decode workers' reserved blocks and the router's
   running and queued streams must return to 0 (within --drain-timeout).
2. large: one chat whose message is --large-mb MB of text, with `/health` timed every
   20 ms while the router reads, validates and tokenises it. A trivial HTTP server in a
   process of its own is timed the same way at the same time (the control): on a busy
   machine the scheduler alone delays some answers, and a slow `/health` whose control
   probes were fast meanwhile is the router's own doing. For the slowest probes it also
   says how long the probe process itself and the router's threads waited on the CPU run
   queue meanwhile (Linux schedstat): a probe whose time went there is the machine's doing.

Writes bench/results/serving-burst-<tag>.json and a PNG of completions and 429s over time.

    python bench/serving_burst.py                       # both modes, 2,000 streams
    python bench/serving_burst.py --streams 200 --modes colocated --tag smoke
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
_CHILD = re.compile(r"baton up: (\S+)\s+pid (\d+)\s+(.*)")


@dataclass
class Stream:
    start: float  # seconds since the burst began
    status: int = 0
    end: float = 0.0
    first_token: float | None = None
    tokens: int = 0
    outcome: str = "hang"  # completed, refused, server_error, client_error, stream_error, dropped, hang
    detail: str = ""


@dataclass
class Deployment:
    proc: subprocess.Popen
    url: str
    metrics: dict[str, str]  # process name -> /metrics URL (the router's included)
    output: list[str]
    pids: dict[str, int] = field(default_factory=dict)  # process name -> pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(mode: str, up_args: str, timeout: float = 300) -> Deployment:
    port = free_port()
    argv = [sys.executable, "-m", "baton.cli", "up", "--mode", mode, "--port", str(port), "--quiet",
            *shlex.split(up_args)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    dep = Deployment(proc, url, {"router": f"{url}/metrics"}, [])
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            dep.output.append(line)
            m = _CHILD.match(line.strip())
            if m:
                dep.pids[m.group(1)] = int(m.group(2))
            metrics = re.search(r"metrics (\S+)", m.group(3)) if m else None
            if metrics:
                dep.metrics[m.group(1)] = metrics.group(1)
            if "Baton is ready" in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(timeout):
        proc.kill()
        raise RuntimeError(f"baton up --mode {mode} did not start:\n" + "".join(dep.output[-40:]))
    return dep


def stop(dep: Deployment) -> None:
    dep.proc.send_signal(signal.SIGINT)
    try:
        dep.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        dep.proc.kill()


def gauges(url: str) -> dict[str, float]:
    """Every `baton:` gauge sample at a /metrics URL, summed over label sets."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("baton:") and "_bucket" not in line:
            name = line.split("{", 1)[0].split(" ", 1)[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def leftovers(dep: Deployment) -> dict[str, dict[str, float]]:
    """What is still held: KV usage and reserved blocks on workers, streams on the router."""
    held = {}
    for name, url in dep.metrics.items():
        g = gauges(url)
        keys = (("baton:num_requests_running", "baton:num_requests_waiting") if name == "router" else
                ("baton:kv_cache_usage_perc", "baton:kv_transfer_reserved_blocks", "baton:num_requests_running",
                 "baton:num_requests_waiting"))
        held[name] = {k: g[k] for k in keys if k in g}
    return held


# Each line: sent (monotonic s), latency (s), then over the probe's time the CPU run-queue
# wait (s) of the probe itself, of process pid's main thread (the router's event loop) and
# the most any other thread of pid waited (0 when no pid or not Linux).
_PROBE = """
import glob, sys, time, http.client
host, port, interval, pid = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
def waited(path):
    try:
        return int(open(path).read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0
def threads():
    return {path: waited(path) for path in glob.glob(f"/proc/{pid}/task/*/schedstat")} if pid else {}
own, main = "/proc/thread-self/schedstat", f"/proc/{pid}/task/{pid}/schedstat"
conn = None
while True:
    t0, own0, before = time.monotonic(), waited(own), threads()
    try:
        conn = conn or http.client.HTTPConnection(host, port, timeout=60)
        conn.request("GET", "/health")
        conn.getresponse().read()
        latency = time.monotonic() - t0
    except OSError:
        conn, latency = None, "inf"
    waits = {path: waited(path) - w for path, w in before.items()}
    print(t0, latency, waited(own) - own0, waits.pop(main, 0.0), max(waits.values(), default=0.0), flush=True)
    time.sleep(interval)
"""

# The control: answers every GET at once, from a process of its own.
_CONTROL = """
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in two writes
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a probe stopped mid-request
server = Server(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


class HealthProbe:
    """`GET /health` every `interval` seconds from a process of its own, so that neither the
    load generator's event loop nor its GIL delays the probe; latencies in seconds."""

    def __init__(self, url: str, interval: float, server_pid: int = 0):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self._proc = subprocess.Popen([sys.executable, "-c", _PROBE, host, port, str(interval), str(server_pid)],
                                      stdout=subprocess.PIPE, text=True)
        self._lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self._lines.extend(self._proc.stdout), daemon=True)
        self._reader.start()

    def stop(self) -> list[float]:
        """The latencies, in seconds."""
        return [probe[1] for probe in self.stop_timed()]

    def stop_timed(self) -> list[tuple[float, ...]]:
        """(when the probe was sent, on the monotonic clock; its latency; the run-queue wait
        of the probe and of the server's thread meanwhile), in seconds."""
        self._proc.terminate()
        self._proc.wait(timeout=10)
        self._reader.join(timeout=10)
        return [tuple(float(x) for x in line.split()) for line in self._lines if line.strip()]


async def one_stream(session: aiohttp.ClientSession, url: str, model: str, max_tokens: int, t0: float,
                     timeout: float, i: int) -> Stream:
    s = Stream(start=time.monotonic() - t0)
    body = {"model": model, "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"Tell me a story, number {i}."}]}
    try:
        async with asyncio.timeout(timeout):
            async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                s.status = response.status
                if response.status != 200:
                    s.detail = (await response.text())[:300]
                    s.outcome = ("refused" if response.status == 429 else
                                 "server_error" if response.status >= 500 else "client_error")
                    if response.status == 429 and "Retry-After" not in response.headers:
                        s.outcome, s.detail = "client_error", "429 without Retry-After"
                    return s
                finished = False
                async for raw in response.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        s.outcome = "completed" if finished else "stream_error"
                        if not finished:
                            s.detail = "[DONE] without a finish reason"
                        return s
                    event = json.loads(data)
                    if "error" in event:
                        s.outcome, s.detail = "stream_error", json.dumps(event)[:300]
                        continue
                    for choice in event.get("choices", []):
                        if choice.get("delta", {}).get("content"):
                            s.tokens += 1
                            if s.first_token is None:
                                s.first_token = time.monotonic() - t0
                        finished = finished or choice.get("finish_reason") is not None
                s.outcome, s.detail = "dropped", "the stream ended without [DONE]"
    except TimeoutError:
        s.outcome = "hang"
    except aiohttp.ClientError as exc:
        s.outcome, s.detail = "dropped", repr(exc)[:300]
    finally:
        s.end = time.monotonic() - t0
    return s


async def burst(dep: Deployment, model: str, streams: int, max_tokens: int, timeout: float) -> dict:
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        probe = HealthProbe(dep.url, 0.05)
        t0 = time.monotonic()
        results = await asyncio.gather(*(one_stream(session, dep.url, model, max_tokens, t0, timeout, i)
                                         for i in range(streams)))
        wall = time.monotonic() - t0
        health = probe.stop()
    counts: dict[str, int] = {}
    for s in results:
        counts[s.outcome] = counts.get(s.outcome, 0) + 1
    return {"streams": streams, "max_tokens": max_tokens, "wall_s": round(wall, 2), "outcomes": counts,
            "status_5xx": sum(1 for s in results if s.status >= 500),
            "health_ms": latency_summary(health),
            "failures": [asdict(s) for s in results if s.outcome not in ("completed", "refused")][:20],
            "timeline": [[round(s.end, 3), s.outcome] for s in results]}


def latency_summary(samples: list[float]) -> dict:
    if not samples:
        return {}
    ordered = sorted(samples)
    pick = lambda p: round(1000 * ordered[min(len(ordered) - 1, int(p * len(ordered)))], 1)  # noqa: E731
    return {"count": len(ordered), "p50": pick(0.5), "p99": pick(0.99), "max": round(1000 * ordered[-1], 1)}


async def large_request(dep: Deployment, model: str, megabytes: float) -> dict:
    """One chat of `megabytes` MB, sent by curl (a process of its own), while /health is timed."""
    words = "lorem ipsum dolor sit amet consectetur adipiscing elit "
    text = (words * int(megabytes * 1e6 / len(words) + 1))[: int(megabytes * 1e6)]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": text}]}, f)
    # A session of its own, as `baton up` gives the router: where the kernel schedules sessions
    # as groups, one shared with the probes would be woken more promptly than the router.
    control = subprocess.Popen([sys.executable, "-c", _CONTROL], stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    control_url = f"http://127.0.0.1:{control.stdout.readline().strip()}"
    try:
        # The same probes with nothing else running first: on a shared machine the scheduler
        # alone delays some answers, and this says by how much.
        probe, control_probe = HealthProbe(dep.url, 0.02), HealthProbe(control_url, 0.02)
        await asyncio.sleep(5)
        idle, control_idle = probe.stop(), control_probe.stop()
        probe, control_probe = HealthProbe(dep.url, 0.02, dep.pids.get("router", 0)), HealthProbe(control_url, 0.02)
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        curl = await asyncio.create_subprocess_exec(
            "curl", "-s", "-o", "-", "-w", "\\n%{http_code}", "-H", "Content-Type: application/json",
            "--data-binary", f"@{f.name}", f"{dep.url}/v1/chat/completions", stdout=asyncio.subprocess.PIPE)
        out, _ = await curl.communicate()
        elapsed = time.monotonic() - t0
        health, control_health = probe.stop_timed(), control_probe.stop_timed()
    finally:
        os.unlink(f.name)
        control.terminate()
        control.wait(timeout=10)
    answer, _, status = out.decode().rpartition("\n")
    return {"megabytes": megabytes, "status": int(status), "answer": answer[:300], "seconds": round(elapsed, 2),
            "health_ms": latency_summary([p[1] for p in health]),
            "control_ms": latency_summary([p[1] for p in control_health]),
            "slowest": slowest(health, control_health, t0),
            "health_ms_idle_before": latency_summary(idle), "control_ms_idle_before": latency_summary(control_idle)}


def slowest(probes: list[tuple[float, ...]], control: list[tuple[float, ...]], t0: float,
            count: int = 5) -> list[dict]:
    """The `count` slowest probes: when they were sent (seconds after `t0`), how long they
    took, the slowest control probe that overlapped them (a slow control means the machine,
    not the server, held both), and how long the probe process and the router's loop thread
    waited on the CPU run queue meanwhile (runnable, but another task had the core), and the
    most any other router thread waited (one holding the GIL stalls the loop meanwhile)."""
    out = []
    for sent, latency, probe_wait, loop_wait, thread_wait in sorted(probes, key=lambda p: p[1], reverse=True)[:count]:
        overlapping = [c[1] for c in control if c[0] < sent + latency and c[0] + c[1] > sent]
        out.append({"at_s": round(sent - t0, 2), "ms": round(1000 * latency, 1),
                    "control_ms": round(1000 * max(overlapping, default=0.0), 1),
                    "probe_runqueue_ms": round(1000 * probe_wait, 1),
                    "router_loop_runqueue_ms": round(1000 * loop_wait, 1),
                    "router_other_thread_runqueue_ms": round(1000 * thread_wait, 1)})
    return out


async def drained(dep: Deployment, timeout: float) -> tuple[bool, float, dict]:
    t0 = time.monotonic()
    while True:
        held = leftovers(dep)
        if all(v == 0 for g in held.values() for v in g.values()):
            return True, time.monotonic() - t0, held
        if time.monotonic() - t0 > timeout:
            return False, time.monotonic() - t0, held
        await asyncio.sleep(0.5)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in results["modes"] if "burst" in results["modes"][m]]
    if not modes:
        return
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        timeline = results["modes"][mode]["burst"]["timeline"]
        for outcome, color in (("completed", "tab:green"), ("refused", "tab:orange"), ("server_error", "tab:red"),
                               ("stream_error", "tab:purple"), ("hang", "black"), ("dropped", "tab:brown")):
            ends = sorted(t for t, o in timeline if o == outcome)
            if ends:
                ax.step(ends, range(1, len(ends) + 1), where="post", color=color,
                        label=f"{outcome} ({len(ends)})")
        ax.set_title(f"{mode}: {len(timeline)} concurrent streams")
        ax.set_xlabel("seconds since the burst began")
        ax.set_ylabel("streams ended (cumulative)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


async def run_mode(mode: str, args) -> dict:
    dep = start(mode, args.up_args)
    try:
        out: dict = {}
        if args.streams:
            out["burst"] = await burst(dep, args.model, args.streams, args.max_tokens, args.stream_timeout)
            ok, seconds, held = await drained(dep, args.drain_timeout)
            out["burst"]["drained"] = ok
            out["burst"]["drain_s"] = round(seconds, 2)
            out["burst"]["held_after"] = held
        if args.large_mb:
            out["large"] = await large_request(dep, args.model, args.large_mb)
        out["router_errors_logged"] = [line for line in dep.output if "unexpected error" in line][:5]
        return out
    finally:
        stop(dep)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", default="disaggregated,colocated")
    p.add_argument("--streams", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--stream-timeout", type=float, default=600, help="a stream open longer is a hang")
    p.add_argument("--drain-timeout", type=float, default=60)
    p.add_argument("--large-mb", type=float, default=20)
    p.add_argument("--model", default="tiny-llama-v1", help="the served model name")
    p.add_argument("--up-args", default="", help="extra `baton up` arguments")
    p.add_argument("--tag", default="cpu")
    args = p.parse_args()
    results = {"command": " ".join(["python", *sys.argv]),
               "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "load_avg_at_start": os.getloadavg()},
               "modes": {}}
    for mode in args.modes.split(","):
        results["modes"][mode] = asyncio.run(run_mode(mode, args))
        summary = {k: v for k, v in results["modes"][mode].get("burst", {}).items() if k != "timeline"}
        print(mode, json.dumps({**summary, "large": results["modes"][mode].get("large")}, indent=1))
    out = ROOT / "bench" / "results" / f"serving-burst-{args.tag}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out}")
    bad = [m for m, r in results["modes"].items()
           if "burst" in r and (set(r["burst"]["outcomes"]) - {"completed", "refused"} or not r["burst"]["drained"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
