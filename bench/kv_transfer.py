"""KV handoff latency and effective bandwidth, Llama-3-8B-sized KV (128 KiB a token).

Two processes, a sender (prefill side) and a receiver (decode side), each with a synthetic
block-major KV pool of the right shape (32 layers x 8 KV heads x 128 x bf16, 16-token
blocks) and the real `KVSender` / `KVReceiver` / transports; no model. On GPUs the sender's
pool is on GPU0 and the receiver's on GPU1, and a plain torch peer copy of the same bytes is
measured in the same run.

A handoff's latency (`handoff_ms`, `decode_ready_ms`) runs from the sender's
`KVSender.push` call to the end of the receiver's `complete()`: the bytes are verified and
the decode engine may admit the request (reservation not included). Both processes run on
one host, so their `time.perf_counter()` (CLOCK_MONOTONIC) stamps compare. `push_roundtrip_ms`
is until `push` returned in the sender (the decode side's confirmation came back).
`stages_ms` splits a UCX handoff at the transport's stamps (`ucx_transport.stamps`, on in
these processes only): sends posted, header received, receives posted, data received,
device synced, completed, reply sent, reply received.

    python bench/kv_transfer.py --device cpu                  # bench/results/kv_transfer-cpu.json
    python bench/kv_transfer.py --device cuda --transports ucx,grpc   # -> kv_transfer-cuda.json
    python bench/kv_transfer.py --device cuda --transports ucx --max-message-mib 0,64,32 \
        --ucx-progress-modes thread-polling,thread-polling+UCXPY_ENABLE_DELAYED_SUBMISSION=0
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

TARGET = {"tokens": 2048, "handoff_ms": 1.5, "effective_gbps": 180.0}
LAYOUT_ARGS = dict(model="llama-3-8b", num_layers=32, num_kv_heads=8, head_dim=128, block_size=16,
                   dtype="bfloat16")


# -- the two worker processes ----------------------------------------------------------------


def parse_variant(variant: str | None) -> tuple[str | None, dict[str, str]]:
    """`MODE[+NAME=VALUE...]` -> (UCXX progress mode, environment for both processes)."""
    if not variant:
        return None, {}
    mode, *assignments = variant.split("+")
    env = dict(a.split("=", 1) for a in assignments)
    return mode or None, env


def _worker(conn, role: str, device: str, num_blocks: int, gpu_order: str | None, variant: str | None) -> None:
    if gpu_order is not None:  # own GPU first; both visible, as UCX CUDA IPC wants
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_order
    mode, env = parse_variant(variant)
    os.environ.update(env)  # before UCX loads
    import asyncio

    asyncio.run(_serve(conn, role, device, num_blocks, mode))


async def _serve(conn, role: str, device: str, num_blocks: int, mode: str | None) -> None:
    import asyncio
    import dataclasses
    import hashlib

    import grpc
    import torch
    from prometheus_client import CollectorRegistry

    from baton.kvtransfer import (
        KVLayout,
        KVReceiver,
        KVSender,
        TensorPool,
        Ticket,
        TransferConfig,
        ucx_transport,
    )

    ucx_transport.stamps = stamps = []  # this process's stage stamps (one handoff at a time)

    layout = KVLayout(**LAYOUT_ARGS)
    pool = TensorPool(layout, num_blocks, device=device)
    config = TransferConfig(chunk_bytes=4 << 20, window_chunks=8, push_timeout_s=120, ucx_progress_mode=mode)
    registry = CollectorRegistry()
    if role == "sender":
        gen = torch.Generator(device=device).manual_seed(0)
        pool.kv.copy_(torch.randn(pool.kv.shape, generator=gen, device=device, dtype=torch.float32))
        end = KVSender(pool, config=config, registry=registry)
    else:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20)])
        end = KVReceiver(pool, "ucx", default_ttl_s=120, config=config, registry=registry)
        end.add_to_server(server)
        complete = end.complete

        def stamped_complete(slot):  # the gRPC transport has no stamps: this stage for it
            handoff = complete(slot)
            stamps.append(("complete_returned", time.perf_counter()))
            return handoff

        end.complete = stamped_complete
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await end.start(port)
    if device != "cpu":
        torch.cuda.synchronize()
    loop = asyncio.get_running_loop()

    def digest(ids) -> str:
        rows = pool.kv[list(ids)]
        return hashlib.sha256(rows.view(torch.uint8).cpu().numpy().tobytes()).hexdigest()

    async def handle(cmd: str, kw: dict):
        if cmd == "push":
            ticket = Ticket.from_bytes(kw["ticket"])
            if kw["transport"] != ticket.transport:
                ticket = dataclasses.replace(ticket, transport=kw["transport"])
            n = len(ticket.block_ids)
            src = list(range(0, 2 * n, 2)) if kw["scattered"] else list(range(n))
            if end.config.max_message_bytes != kw["max_message_bytes"]:
                end.config = dataclasses.replace(end.config, max_message_bytes=kw["max_message_bytes"])
            stamps.clear()
            t0 = time.perf_counter()
            await end.push(ticket, src, 1)
            t1 = time.perf_counter()
            return [("push_called", t0), *stamps, ("push_returned", t1)]
        if cmd == "reserve":
            stamps.clear()
            if not kw["scattered"]:
                return (await end.reserve("bench", kw["tokens"])).to_bytes()
            # Every other block: the reservation is as fragmented as a pool can be.
            blocks = -(-kw["tokens"] // layout.block_size)
            hold = await pool.reserve(2 * blocks * layout.block_size)
            await pool.release(hold[1::2])
            ticket = await end.reserve("bench", kw["tokens"])
            await pool.release(hold[::2])
            return ticket.to_bytes()
        if cmd == "wait_release":
            handoff = await end.wait(kw["ticket_id"], 60)
            out = digest(handoff.block_ids) if kw.get("digest") else None
            await end.release(handoff)
            return out, list(stamps)
        if cmd == "digest":
            return digest(kw["block_ids"])
        if cmd == "ping":
            return True
        raise ValueError(cmd)

    while True:
        msg = await loop.run_in_executor(None, conn.recv)
        if msg is None:
            return
        cmd, kw = msg
        try:
            conn.send((True, await handle(cmd, kw)))
        except Exception as exc:  # report, keep serving
            conn.send((False, f"{type(exc).__name__}: {exc}"))


class Worker:
    def __init__(self, role: str, device: str, num_blocks: int, gpu_order: str | None, mode: str | None):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, role, device, num_blocks, gpu_order, mode),
                                daemon=True)
        self.proc.start()

    def call(self, cmd: str, **kw):
        self.conn.send((cmd, kw))
        ok, value = self.conn.recv()
        if not ok:
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


# -- measurements --------------------------------------------------------------------------


# A handoff's stages in order (sender and receiver stamps; the UCX transport's names).
STAGES = ("push_called", "sends_posted", "header_received", "receives_posted", "data_received",
          "data_synced", "complete_returned", "completed", "reply_sent", "reply_received", "push_returned")


def measure_handoffs(sender: Worker, receiver: Worker, transport: str, tokens: int, reps: int,
                     warmup: int, scattered: bool = False, max_message_bytes: int = 0) -> dict:
    """Medians of `reps` handoffs after `warmup`; the last one's bytes are compared.

    `median_ms` is the decode-ready latency (push called -> receiver's complete() done)."""
    from baton.kvtransfer import Ticket

    ready, roundtrip, stages = [], [], {}
    for i in range(warmup + reps):
        ticket = receiver.call("reserve", tokens=tokens, scattered=scattered)
        sent = sender.call("push", ticket=ticket, transport=transport, scattered=scattered,
                           max_message_bytes=max_message_bytes)
        last = i == warmup + reps - 1
        got, received = receiver.call("wait_release", ticket_id=Ticket.from_bytes(ticket).ticket_id, digest=last)
        if i < warmup:
            continue
        at = dict(sent) | dict(received)
        ready.append(at.get("completed", at["complete_returned"]) - at["push_called"])
        roundtrip.append(at["push_returned"] - at["push_called"])
        names = [n for n in STAGES if n in at]
        for a, b in zip(names, names[1:]):
            stages.setdefault(f"{a}->{b}", []).append(at[b] - at[a])
    blocks = -(-tokens // LAYOUT_ARGS["block_size"])
    src = list(range(0, 2 * blocks, 2)) if scattered else list(range(blocks))
    if got != sender.call("digest", block_ids=src):
        raise RuntimeError(f"{transport} {tokens} tokens: the received bytes differ from the sent ones")
    nbytes = blocks * LAYOUT_ARGS["block_size"] * 128 * 1024
    med, med_rt = statistics.median(ready), statistics.median(roundtrip)
    return {
        "bytes": nbytes,
        "reps": reps,
        "median_ms": med * 1e3,
        "decode_ready_ms": med * 1e3,
        "min_ms": min(ready) * 1e3,
        "max_ms": max(ready) * 1e3,
        "effective_gbps": nbytes / med / 1e9,
        "push_roundtrip_ms": med_rt * 1e3,
        "push_roundtrip_gbps": nbytes / med_rt / 1e9,
        "stages_ms": {k: statistics.median(v) * 1e3 for k, v in stages.items() if len(v) == reps},
        "verified": True,
    }


def peer_copy(nbytes: int, reps: int) -> dict:
    """A plain torch copy GPU0 -> GPU1 of `nbytes` (the reference)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0").random_(0, 255)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    if not torch.equal(src[:4096].cpu(), dst[:4096].cpu()):
        raise RuntimeError("peer copy check failed")
    med = statistics.median(times)
    return {"median_ms": med * 1e3, "gbps": nbytes / med / 1e9}


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{os.cpu_count()} x {cpu}, Python {platform.python_version()}"
    import grpc
    import torch

    desc += f", torch {torch.__version__}, grpcio {grpc.__version__}"
    try:
        import ucxx

        desc += f", ucxx {ucxx.__version__}"
    except ImportError:
        pass
    if device == "cuda":
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        desc = f"{len(names)} x {names[0]}; " + desc
    return desc


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for transport, rows in result["by_transport"].items():
        toks = sorted(rows, key=int)
        ax.plot([int(t) for t in toks], [rows[t]["effective_gbps"] for t in toks], "o-", label=transport)
    if result.get("peer_copy_gbps"):
        toks = sorted(result["peer_copy_gbps"], key=int)
        ax.plot([int(t) for t in toks], [result["peer_copy_gbps"][t] for t in toks], "k--", label="torch peer copy")
        ax.axhline(TARGET["effective_gbps"], color="r", lw=0.8, label="target (2k tokens)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens (128 KiB of KV each)")
    ax.set_ylabel("effective GB/s")
    ax.set_title(f"KV handoff, {result['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_pair(args, tokens: list[int], transports: list[str], mode: str | None) -> dict:
    """Start a sender and a receiver (UCX variant `mode`: progress mode and environment), time
    every transport and size; UCX under each `--max-message-mib` too."""
    num_blocks = max(max(tokens), 2 * args.scattered_tokens) // LAYOUT_ARGS["block_size"] + 8
    device = "cpu" if args.device == "cpu" else "cuda:0"  # each process sees its own GPU first
    gpus = ("0,1", "1,0") if args.device == "cuda" else (None, None)
    sender = Worker("sender", device, num_blocks, gpus[0], mode)
    receiver = Worker("receiver", device, num_blocks, gpus[1], mode)
    out: dict = {"by_transport": {}, "scattered": {}, "errors": {}, "ucx_by_max_message_mib": {}}
    try:
        sender.call("ping")
        receiver.call("ping")
        for transport in transports:
            variants = args.mibs if transport == "ucx" else args.mibs[:1]
            for mib in variants:
                tag = f"{transport}{'' if mib == args.mibs[0] else f' <={mib}MiB'}"
                rows = {}
                if mib == args.mibs[0]:
                    out["by_transport"][transport] = rows
                if transport == "ucx":
                    out["ucx_by_max_message_mib"][str(mib)] = rows
                try:
                    for n in tokens:
                        reps = args.reps or (min(200, max(5, 40960 // n)) if transport == "ucx" else max(3, 8192 // n))
                        t0 = time.perf_counter()
                        rows[str(n)] = row = measure_handoffs(sender, receiver, transport, n, reps, args.warmup,
                                                              max_message_bytes=mib << 20)
                        print(f"{tag} [{mode or 'default'}] {n:5d} tokens: ready {row['median_ms']:8.3f} ms "
                              f"{row['effective_gbps']:7.2f} GB/s, round trip {row['push_roundtrip_ms']:8.3f} ms "
                              f"({reps} reps, {time.perf_counter() - t0:.1f}s)", flush=True)
                        print("    " + ", ".join(f"{k} {v:.3f}" for k, v in row["stages_ms"].items()), flush=True)
                    if args.scattered_tokens and mib == args.mibs[0]:
                        n = args.scattered_tokens
                        row = measure_handoffs(sender, receiver, transport, n, 5, args.warmup, scattered=True,
                                               max_message_bytes=mib << 20)
                        out["scattered"].setdefault(transport, {})[str(n)] = row
                        print(f"{tag} [{mode or 'default'}] {n:5d} tokens, every other block: ready "
                              f"{row['median_ms']:8.3f} ms {row['effective_gbps']:7.2f} GB/s", flush=True)
                except Exception as exc:  # record it and go on with the next transport
                    out["errors"][tag] = f"{type(exc).__name__}: {exc}"
                    print(f"{tag} [{mode}] failed: {exc}", flush=True)
    finally:
        sender.close()
        receiver.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--transports", default="ucx,grpc")
    parser.add_argument("--tokens", default="512,2048,8192")
    parser.add_argument("--reps", type=int, default=0, help="timed handoffs per size (default: by size)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--scattered-tokens", type=int, default=2048,
                        help="also time this size with every other block on both ends (0: skip)")
    parser.add_argument("--ucx-progress-modes", default="",
                        help="comma list: time UCX under each UCXX progress mode, report the fastest; an "
                             "entry MODE+NAME=VALUE[+...] also sets environment variables in both processes "
                             "(e.g. thread-polling+UCXPY_ENABLE_DELAYED_SUBMISSION=0)")
    parser.add_argument("--max-message-mib", default="0",
                        help="comma list: time UCX with each TransferConfig.max_message_bytes (MiB; 0: one "
                             "message per region); the first is the main result")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/kv_transfer-<device>.json)")
    parser.add_argument("--machine", default=None, help="machine description to record")
    args = parser.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    transports = args.transports.split(",")
    modes = [m for m in args.ucx_progress_modes.split(",") if m] or [None]
    args.mibs = [int(m) for m in args.max_message_mib.split(",")]
    out = Path(args.out or Path(__file__).parent / "results" / f"kv_transfer-{args.device}.json")
    result = {
        "benchmark": "kv_transfer",
        "device": "2 GPUs, GPU0 -> GPU1, two processes" if args.device == "cuda" else "CPU, loopback, two processes",
        "machine": args.machine or machine(args.device),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "kv_bytes_per_token": 128 * 1024,
        "layout": LAYOUT_ARGS,
        "target": TARGET,
        "transport": transports[0],
        "note": "handoff_ms / decode_ready_ms = KVSender.push called (sender) until the receiver's "
                "complete() ran (bytes verified, the decode engine may admit the request), from "
                "perf_counter stamps of both processes on one host; push_roundtrip_ms = until push "
                "returned (the decode side's confirmation arrived); stages_ms = medians between "
                "stamps; contiguous blocks on both ends unless under 'scattered' (every other "
                "block: UCX gathers into one message and scatters it)",
        "max_message_mib": args.mibs[0],
    }
    runs = {}
    for i, mode in enumerate(modes):  # other transports only once
        runs[mode] = run_pair(args, tokens, transports if i == 0 else ["ucx"], mode)
    first = runs[modes[0]]
    result["by_transport"], result["scattered"], result["errors"] = first["by_transport"], first["scattered"], first["errors"]
    if "ucx" in transports and len(modes) > 1:
        mid = str(TARGET["tokens"] if TARGET["tokens"] in tokens else tokens[len(tokens) // 2])

        def speed(mode):
            row = runs[mode]["by_transport"].get("ucx", {}).get(mid)
            return row["median_ms"] if row else float("inf")

        best = min(modes, key=speed)
        result["ucx_by_progress_mode"] = {m: runs[m]["by_transport"].get("ucx", {}) for m in modes}
        result["ucx_progress_mode"] = best
        result["by_transport"]["ucx"] = runs[best]["by_transport"]["ucx"]
        result["scattered"]["ucx"] = runs[best]["scattered"].get("ucx", {})
        for m in modes:
            for tag, err in runs[m]["errors"].items():
                result["errors"].setdefault(f"{tag} [{m}]", err)
    if "ucx" in transports and len(args.mibs) > 1:
        best_run = runs[result.get("ucx_progress_mode", modes[0])]
        result["ucx_by_max_message_mib"] = best_run["ucx_by_max_message_mib"]
    main_rows = result["by_transport"][transports[0]]
    result["handoff_ms"] = {t: r["median_ms"] for t, r in main_rows.items()}
    result["effective_gbps"] = {t: r["effective_gbps"] for t, r in main_rows.items()}
    result["push_roundtrip_ms"] = {t: r["push_roundtrip_ms"] for t, r in main_rows.items()}
    result["stages_ms"] = {t: r["stages_ms"] for t, r in main_rows.items()}
    if args.device == "cuda":
        result["peer_copy_gbps"], result["peer_copy_ms"] = {}, {}
        for n in tokens:
            ref = peer_copy(n * 128 * 1024, 20)
            result["peer_copy_gbps"][str(n)] = ref["gbps"]
            result["peer_copy_ms"][str(n)] = ref["median_ms"]
            print(f"torch peer copy {n:5d} tokens: {ref['median_ms']:9.3f} ms {ref['gbps']:8.2f} GB/s", flush=True)
        hit = result["handoff_ms"].get(str(TARGET["tokens"]))
        result["meets_target"] = hit is not None and hit <= TARGET["handoff_ms"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    try:
        plot(result, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
