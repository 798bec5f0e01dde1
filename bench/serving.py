"""Serving benchmark: a load generator against Baton's OpenAI API, disaggregated vs colocated.

For each mode it starts `baton up` (mode `in-process`: `baton serve`, the router and one
colocated engine in one process; or uses --url), then for each request rate sends
--num-requests streaming completions with Poisson arrivals (rate `inf`: all at once), at
most --max-concurrency in flight, random token prompts of about --prompt-len tokens and
exactly --output-len output tokens (ignore_eos). It reports request throughput, output
tokens/s, TTFT, TPOT and end-to-end latency (mean, p50, p90, p99), and goodput: the requests
per second that met both --slo-ttft and --slo-tpot (a request refused or failed meets
neither), as JSON plus a PNG.

    python bench/serving.py                                  # CPU, tiny model, both modes
    python bench/serving.py --up-args "--model /models/llama --device cuda" --prompt-len 1024

One prefill + one decode GPU against two colocated GPUs (`--device cuda` gives worker k
GPU k), a long-prompt mix (`bench/multi_gpu.sh` runs this and a chat mix):

    python bench/serving.py --up-args "--model DIR --device cuda --transport auto --max-model-len 8192" \
        --disaggregated-args "--prefill 1 --decode 1" --colocated-args "--colocated 2" \
        --prompt-len 4096 --output-len 256 --request-rates 2,4,6,8 --num-requests 80 --mix long

Timings are wall-clock on the client: TTFT is the time to the first streamed token, TPOT
the mean time between the following tokens of a request, e2e the time to the last byte.
With both modes, `comparison` puts disaggregated beside colocated per rate (goodput ratio,
p99 TPOT ratio) and the best goodput of each over the rates. The JSON is written after
every rate, so a run stopped by a time limit keeps what it measured; SIGTERM stops
`baton up` (and its workers) before the script exits.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Sample:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def pct(p: float) -> float:
        k = (len(ordered) - 1) * p / 100
        lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {"mean": statistics.fmean(ordered), "p50": pct(50), "p90": pct(90), "p99": pct(99)}


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int], output_len: int) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft = None
    usage = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return Sample(False, error=f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    return Sample(False, error=data["error"].get("message", "error"))
                if data.get("choices") and ttft is None:
                    ttft = time.perf_counter() - start
                if data.get("usage"):
                    usage = data["usage"]
    except httpx.HTTPError as exc:
        return Sample(False, error=repr(exc))
    e2e = time.perf_counter() - start
    if ttft is None or usage is None:
        return Sample(False, error="stream ended without tokens or usage")
    return Sample(True, ttft, e2e, usage["completion_tokens"], usage["prompt_tokens"])


def goodput(samples: list[Sample], duration: float, slo_ttft: float, slo_tpot: float) -> dict:
    """Requests per second that met both targets, and the share of all requests that did."""
    met = sum(1 for s in samples if s.ok and s.ttft <= slo_ttft and (s.tpot is None or s.tpot <= slo_tpot))
    return {"goodput_rps": met / duration if duration > 0 else 0.0,
            "slo_attainment": met / len(samples) if samples else 0.0}


async def run_load(url: str, model: str, rate: float, args, api_key: str | None) -> dict:
    rng = random.Random(args.seed)
    low, high = int(args.prompt_len * (1 - args.prompt_len_spread)), int(args.prompt_len * (1 + args.prompt_len_spread))
    prompts = [[rng.randrange(4, args.vocab) for _ in range(rng.randint(max(1, low), max(1, high)))]
               for _ in range(args.num_requests)]
    gaps = [0.0 if rate == float("inf") else rng.expovariate(rate) for _ in prompts]
    limit = asyncio.Semaphore(args.max_concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(600.0, connect=10.0)
    limits = httpx.Limits(max_connections=args.max_concurrency + 8, max_keepalive_connections=args.max_concurrency + 8)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as client:
        for _ in range(args.warmup):
            warm = await one_request(client, model, prompts[0], min(8, args.output_len))
            if not warm.ok:  # a misconfigured run stops here rather than timing failures
                raise RuntimeError(f"a warm-up request failed: {warm.error}")

        async def bounded(prompt):
            async with limit:
                return await one_request(client, model, prompt, args.output_len)

        tasks = []
        start = time.perf_counter()
        for prompt, gap in zip(prompts, gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.ensure_future(bounded(prompt)))
        samples = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    good = [s for s in samples if s.ok]
    out_tokens = sum(s.output_tokens for s in good)
    return {
        "request_rate": "inf" if rate == float("inf") else rate,
        "num_requests": len(samples),
        "completed": len(good),
        "failed": len(samples) - len(good),
        "errors": sorted({s.error for s in samples if not s.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(good) / duration,
        "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(s.prompt_tokens for s in good)) / duration,
        "mean_prompt_tokens": statistics.fmean(s.prompt_tokens for s in good) if good else 0,
        "ttft_s": percentiles([s.ttft for s in good]),
        "tpot_s": percentiles([s.tpot for s in good if s.tpot is not None]),
        "e2e_s": percentiles([s.e2e for s in good]),
        "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
        **goodput(samples, duration, args.slo_ttft, args.slo_tpot),
    }


def served_model(url: str, api_key: str | None) -> str:
    """The first model the server lists."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    reply = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
    reply.raise_for_status()
    return reply.json()["data"][0]["id"]


def describe_machine(up_args: str) -> str:
    """CPU and cores; with `--device cuda` in the `baton up` arguments, the GPUs too."""
    desc = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
    if "cuda" in up_args:
        try:
            gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=30).stdout.split("\n")
            names = [g.strip() for g in gpus if g.strip()]
            if names:
                desc = f"{len(names)} x {names[0]}, " + desc
        except (OSError, subprocess.SubprocessError):
            pass
    return desc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_baton(mode: str, up_args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = ["serve"] if mode == "in-process" else ["up", "--mode", mode]
    argv = [sys.executable, "-m", "baton.cli", *command, "--port", str(port), "--quiet", *shlex.split(up_args)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    for line in proc.stdout:
        print(f"[baton {command[0]} {mode}] {line}", end="", flush=True)  # its own lines: what started where, or why not
        if "Baton is ready" in line:
            # Keep reading (a full pipe would block `baton up`): restarts and its stop show in the log.
            threading.Thread(target=lambda: [print(f"[baton {command[0]} {mode}] {x}", end="", flush=True)
                                             for x in proc.stdout],
                             daemon=True).start()
            return proc, f"http://127.0.0.1:{port}"
    raise RuntimeError(f"{' '.join(command)} ({mode}) failed to start (status {proc.wait()}); its output is above")


def stop_baton(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def compare(modes: dict) -> dict:
    """Disaggregated beside colocated at each rate both ran: goodput ratio (disaggregated /
    colocated, above 1 is better) and p99 TPOT ratio (colocated / disaggregated, above 1:
    disaggregated's tail is lower); and each mode's best goodput over the rates."""
    dis, col = modes.get("disaggregated", []), modes.get("colocated", [])
    by_rate = {str(r["request_rate"]): r for r in col}
    rows = {}
    for run in dis:
        other = by_rate.get(str(run["request_rate"]))
        if other is None:
            continue
        p99_d, p99_c = run["tpot_s"].get("p99"), other["tpot_s"].get("p99")
        rows[str(run["request_rate"])] = {
            "goodput_ratio": run["goodput_rps"] / other["goodput_rps"] if other["goodput_rps"] else None,
            "p99_tpot_ratio": p99_c / p99_d if p99_c and p99_d else None,
            "p99_ttft_ratio": (other["ttft_s"]["p99"] / run["ttft_s"]["p99"]
                               if run["ttft_s"].get("p99") and other["ttft_s"].get("p99") else None),
        }
    best = {m: max((r["goodput_rps"] for r in runs), default=0.0) for m, runs in modes.items()}
    out = {"by_rate": rows, "best_goodput_rps": best}
    if best.get("colocated"):
        out["best_goodput_ratio"] = best.get("disaggregated", 0.0) / best["colocated"]
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(22, 4.2))
    panels = [("output_token_throughput", None, "output tokens/s"), ("goodput_rps", None, "goodput (req/s in SLO)"),
              ("ttft_s", "p50", "TTFT p50 / p99 (s)"),
              ("tpot_s", "p50", "TPOT p50 / p99 (s)"), ("e2e_s", "p50", "end-to-end p50 / p99 (s)")]
    for ax, (key, stat, title) in zip(axes, panels):
        for mode, runs in results["modes"].items():
            rates = [r["request_rate"] for r in runs]
            xs = list(range(len(rates)))
            if stat is None:
                ax.plot(xs, [r.get(key, float("nan")) for r in runs], marker="o", label=mode)
            else:
                line, = ax.plot(xs, [r[key].get("p50", float("nan")) for r in runs], marker="o", label=f"{mode} p50")
                ax.plot(xs, [r[key].get("p99", float("nan")) for r in runs], marker="x", linestyle="--",
                        color=line.get_color(), label=f"{mode} p99")
            ax.set_xticks(xs, [str(r) for r in rates])
        slo = {"ttft_s": results["config"]["slo"]["ttft_s"], "tpot_s": results["config"]["slo"]["tpot_s"]}.get(key)
        if slo:
            ax.axhline(slo, color="r", lw=0.8, label="SLO")
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    cfg = results["config"]
    mix = f"{cfg['mix']} mix, " if cfg.get("mix") else ""
    fig.suptitle(f"Baton serving: {cfg['model']} on {results['machine']['description']}, {mix}prompt "
                 f"~{cfg['prompt_len']} tokens, output {cfg['output_len']}, concurrency <= {cfg['max_concurrency']}, "
                 f"{results['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="disaggregated,colocated")
    p.add_argument("--url", default=None, help="benchmark a running server instead (one mode, named by --modes)")
    p.add_argument("--model-name", default=None, help="the model requests name (default: the first the server "
                   "lists at /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--up-args", default="--device cpu --num-gpu-blocks-override 1024",
                   help="extra `baton up` arguments (model, device, workers...)")
    p.add_argument("--disaggregated-args", default="", help="`baton up` arguments for the disaggregated mode only")
    p.add_argument("--colocated-args", default="", help="`baton up` arguments for the colocated mode only")
    p.add_argument("--in-process-args", default="", help="`baton serve` arguments for the in-process mode only "
                   "(--up-args go to it too: use the flags both take)")
    p.add_argument("--slo-ttft", type=float, default=0.5, help="goodput's TTFT target, seconds")
    p.add_argument("--slo-tpot", type=float, default=0.03, help="goodput's TPOT target, seconds")
    p.add_argument("--request-rates", default="4,8,16,inf", help="requests per second, comma-separated")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--prompt-len-spread", type=float, default=0.25, help="prompt lengths vary by +-this share")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--vocab", type=int, default=500, help="prompt token ids are drawn below this")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench/results/serving-cpu.json"))
    p.add_argument("--png", default=None, help="default: --out with .png")
    p.add_argument("--machine", default=None, help="machine description recorded with the figures")
    p.add_argument("--mix", default=None, help="a name for this prompt/output mix, recorded (e.g. long, chat)")
    args = p.parse_args()
    rates = [float(r) for r in args.request_rates.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(modes) - {"disaggregated", "colocated", "in-process"}:
        p.error(f"--modes: unknown mode(s) {sorted(unknown)}: disaggregated, colocated, in-process")
    results = {
        "benchmark": "serving",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "machine": {"description": args.machine or describe_machine(args.up_args), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "load_average_at_start": os.getloadavg()},
        "config": {"model": args.model_name, "mix": args.mix, "up_args": args.up_args,
                   "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
                   "mode_args": {"disaggregated": args.disaggregated_args, "colocated": args.colocated_args,
                                 "in-process": args.in_process_args}, "num_requests": args.num_requests,
                   "max_concurrency": args.max_concurrency, "prompt_len": args.prompt_len,
                   "prompt_len_spread": args.prompt_len_spread, "output_len": args.output_len},
        "modes": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        if {"disaggregated", "colocated"} <= set(results["modes"]):
            results["comparison"] = compare(results["modes"])
        out.write_text(json.dumps(results, indent=2) + "\n")

    def on_sigterm(signum, frame):  # e.g. a time limit: stop `baton up` in `finally`, keep the JSON
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    for mode in modes:
        proc = None
        url = args.url
        if url is None:
            proc, url = start_baton(mode, f"{args.up_args} {getattr(args, mode.replace('-', '_') + '_args')}")
        try:
            if args.model_name is None:
                args.model_name = served_model(url, args.api_key)
                results["config"]["model"] = args.model_name
            runs = results["modes"][mode] = []
            for rate in rates:
                run = asyncio.run(run_load(url, args.model_name, rate, args, args.api_key))
                runs.append(run)
                print(f"{mode:>14} rate {run['request_rate']!s:>5}: {run['request_throughput']:.2f} req/s, "
                      f"{run['output_token_throughput']:.0f} out tok/s, TTFT p50 {run['ttft_s'].get('p50', 0) * 1e3:.1f} ms, "
                      f"TPOT p50 {run['tpot_s'].get('p50', 0) * 1e3:.2f} ms, e2e p99 {run['e2e_s'].get('p99', 0):.2f} s, "
                      f"goodput {run['goodput_rps']:.2f} req/s ({100 * run['slo_attainment']:.0f} % in SLO), "
                      f"failed {run['failed']}", flush=True)
                save()
        finally:
            if proc is not None:
                stop_baton(proc)
    save()
    if "comparison" in results:
        print(f"disaggregated against colocated: {json.dumps(results['comparison'])}", flush=True)
    png = Path(args.png) if args.png else out.with_suffix(".png")
    plot(results, png)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
