"""A cell's handoff: two engine processes, prefill in one, decode in the other.

Both processes run a real `AsyncLLMEngine` (on GPUs the Llama-3.1-8B-shaped random
checkpoint of `engine_workload.py`, on CPU the embedded tiny model). Where they run:

- `--gpus 1` (default): both on GPU0, two engines of one cell sharing a GPU;
- `--gpus 2`: prefill engine on cuda:0, decode engine on cuda:1, every GPU visible to both,
  exactly as `baton serve-cell --prefill 1 --decode 1` places them (engine k on GPU k): the
  KV crosses NVLink;
- `--device cpu`: both on the CPU (`ipc` by shared memory); there is no second device, so
  `--gpus 2` is refused.

`--prefill-tp 2` splits the prefill engine over two processes (NCCL over cuda:0 and cuda:1
with `--gpus 2`; gloo on the CPU) and keeps the decode engine at TP 1 (on cuda:1): a TP
engine hands off through its host pool in the whole model's layout (gathered from the
ranks when the prefill ends, which `prefill_ms` includes; docs/decisions.md, "Tensor
parallelism").

The decode process reserves blocks with an `auto` `KVReceiver`; the prefill process
prefills the prompt (`hold_kv=True`, one token) and pushes its KV with
`KVSender.push_held`, which picks `ipc` (CUDA IPC, or shared memory on CPU) because both
processes share the node. For each `--tokens` size, per rep:

- `handoff_ms`: decode-ready latency, from `push_held` being called to the end of the
  decode side's `complete()` (its engine may admit the request), from `perf_counter`
  stamps of the two processes on one host (as in `kv_transfer.py`); median, p10, p90;
- `prefill_ms`: the prefill of the prompt on the prefill engine, for scale.

The last rep of each size also decodes `--decode-tokens` greedily on the decode engine and
compares them with the prefill engine's own greedy run of the same prompt (`tokens_match`,
`matching_prefix`). On GPUs a torch copy of the same bytes (cuda:0 -> cuda:1, or within
cuda:0 with `--gpus 1`; `kv_common.peer_copy`) is timed in the same run, after the engines
stopped. JSON and a PNG.

    python bench/kv_cell.py --device cuda --gpus 2 --tokens 16,512,2048,8192 --reps 20
        # -> results/kv_cell-cuda-2gpu.json (.png)
    python bench/kv_cell.py --device cuda --gpus 2 --prefill-tp 2 --tokens 512,2048,8192
        # -> results/kv_cell-cuda-2gpu-prefill-tp2.json
    python bench/kv_cell.py --device cuda --tokens 2048 --reps 20   # one GPU: kv_cell-cuda.json
    python bench/kv_cell.py --device cpu --tokens 16,256 --reps 3   # the tiny model
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from kv_common import machine, peer_copy, spread  # noqa: E402 (bench/ is not a package)
from pipe_worker import Worker, serve_commands  # noqa: E402

TARGET = {"tokens": 2048, "handoff_ms": 1.0, "gpus": 2}  # issue 27: GPU0 -> GPU1, decode-ready


def _worker(conn, role: str, model_dir: str, device: str, num_blocks: int, max_len: int, tp: int) -> None:
    import asyncio

    asyncio.run(_serve(conn, role, model_dir, device, num_blocks, max_len, tp))


async def _serve(conn, role: str, model_dir: str, device: str, num_blocks: int, max_len: int, tp: int) -> None:

    import grpc

    from baton.engine import AsyncLLMEngine, EngineArgs, SamplingParams
    from baton.kvtransfer import KVReceiver, KVSender, Ticket
    from baton.rpc import server_options

    engine = AsyncLLMEngine.from_engine_args(EngineArgs(
        model=model_dir, device=device, num_gpu_blocks_override=num_blocks, max_model_len=max_len,
        max_num_batched_tokens=max_len, max_num_seqs=8, gpu_memory_utilization=0.45,
        enable_prefix_caching=False, tensor_parallel_size=tp))
    stamps: dict[str, float] = {}
    if role == "decode":
        server = grpc.aio.server(options=server_options())
        end = KVReceiver(engine, "auto", default_ttl_s=120)
        end.add_to_server(server)
        complete = end.complete

        def stamped_complete(slot):
            handoff = complete(slot)
            stamps["complete"] = time.perf_counter()
            return handoff

        end.complete = stamped_complete
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await end.start(port)
    else:
        end = KVSender(engine)

    def greedy(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    async def final(stream):
        """The last output of an engine stream."""
        out = None
        async for out in stream:  # noqa: B007 (the last one is the result)
            pass
        return out

    async def handle(cmd: str, kw: dict):
        if cmd == "reserve":
            return (await end.reserve(kw["rid"], kw["num_tokens"])).to_bytes()
        if cmd == "prefill_push":
            t0 = time.perf_counter()
            out = await final(engine.generate({"prompt_token_ids": kw["prompt"]}, greedy(1), kw["rid"], hold_kv=True))
            token = out.outputs[0].token_ids[0]
            t1 = time.perf_counter()
            result = await end.push_held(Ticket.from_bytes(kw["ticket"]), kw["rid"], token)
            return {"prefill_s": t1 - t0, "push_called": t1, "transport": result.transport, "token": token,
                    "bytes": result.num_bytes}
        if cmd == "wait":
            handoff = await end.wait(kw["ticket_id"], 120)
            if not kw["decode_tokens"]:
                await end.release(handoff)
                return {"complete": stamps["complete"], "tokens": None}
            out = await final(engine.generate_prefilled(kw["rid"], prompt_token_ids=kw["prompt"],
                                                        params=greedy(kw["decode_tokens"]),
                                                        **handoff.prefilled_kwargs()))
            return {"complete": stamps["complete"], "tokens": list(out.outputs[0].token_ids)}
        if cmd == "generate":
            out = await final(engine.generate({"prompt_token_ids": kw["prompt"]}, greedy(kw["n"]), kw["rid"]))
            return list(out.outputs[0].token_ids)
        if cmd == "ping":
            return True
        raise ValueError(cmd)

    await serve_commands(conn, handle)


def placement(args) -> tuple[str, str, str]:
    """(prefill device, decode device, description) for the run's flags."""
    ranks = "cuda:0 and cuda:1, NCCL" if args.device == "cuda" else "the CPU, gloo"
    tp = f", prefill engine at TP {args.prefill_tp} (ranks on {ranks})" if args.prefill_tp > 1 else ""
    if args.device == "cpu":
        return "cpu", "cpu", "CPU, two engine processes" + tp
    if args.gpus == 1:
        return "cuda:0", "cuda:0", "one GPU, two engine processes on cuda:0" + tp
    return "cuda:0", "cuda:1", "two GPUs, prefill engine on cuda:0, decode engine on cuda:1 (as a cell)" + tp


def measure_size(prefill: Worker, decode: Worker, n: int, args, tag: str) -> dict:
    """`args.warmup` untimed and `args.reps` timed handoffs of an `n`-token prompt; the last
    one also decodes and is compared with the prefill engine's own greedy run."""
    import random

    from baton.kvtransfer import Ticket

    rng = random.Random(n)
    prompt = [rng.randrange(10, 30000 if args.device == "cuda" else 500) for _ in range(n)]
    rows, transports = [], set()
    for i in range(args.warmup + args.reps):
        last = i == args.warmup + args.reps - 1
        rid = f"{tag}-{n}-{i}"
        ticket = decode.call("reserve", rid=rid, num_tokens=len(prompt))
        decode.send("wait", ticket_id=Ticket.from_bytes(ticket).ticket_id, rid=rid, prompt=prompt,
                    decode_tokens=args.decode_tokens if last else 0)
        sent = prefill.call("prefill_push", ticket=ticket, rid=rid, prompt=prompt)
        got = decode.recv()
        transports.add(sent["transport"])
        if i >= args.warmup:
            rows.append({"handoff_s": got["complete"] - sent["push_called"], "prefill_s": sent["prefill_s"]})
        if last:
            reference = prefill.call("generate", rid=f"reference-{tag}-{n}", prompt=prompt, n=args.decode_tokens)
            decoded, nbytes = got["tokens"], sent["bytes"]
    handoff = spread([r["handoff_s"] * 1e3 for r in rows])
    prefix = next((k for k, (a, b) in enumerate(zip(decoded, reference)) if a != b), min(len(decoded), len(reference)))
    row = {
        "tokens": n,
        "bytes": nbytes,
        "reps": args.reps,
        "transports": sorted(transports),
        "handoff_ms": handoff,
        "effective_gbps": nbytes / (handoff["median"] / 1e3) / 1e9,
        "prefill_ms": statistics.median(r["prefill_s"] * 1e3 for r in rows),
        "tokens_match": decoded == reference,
        "matching_prefix": prefix,
        "samples_ms": [r["handoff_s"] * 1e3 for r in rows],
    }
    print(f"{n:5d} tokens ({nbytes / 2**20:.1f} MiB, {args.reps} reps, {'/'.join(row['transports'])}): handoff "
          f"median {handoff['median']:.3f} ms (p10 {handoff['p10']:.3f}, p90 {handoff['p90']:.3f}), "
          f"{row['effective_gbps']:.1f} GB/s, prefill {row['prefill_ms']:.1f} ms, tokens match {row['tokens_match']} "
          f"({prefix}/{args.decode_tokens})", flush=True)
    return row


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    sizes = sorted(result["by_tokens"], key=int)
    rows = [result["by_tokens"][n] for n in sizes]
    xs = [int(n) for n in sizes]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    med = [r["handoff_ms"]["median"] for r in rows]
    err = [[m - r["handoff_ms"]["p10"] for m, r in zip(med, rows)], [r["handoff_ms"]["p90"] - m for m, r in zip(med, rows)]]
    axes[0].errorbar(xs, med, yerr=err, fmt="o-", capsize=3, label="handoff, decode-ready (p10-p90)")
    axes[1].plot(xs, [r["effective_gbps"] for r in rows], "o-", label="handoff")
    if all(r.get("peer_copy") for r in rows):
        axes[0].plot(xs, [r["peer_copy"]["median_ms"] for r in rows], "k--", label="torch copy, same bytes")
        axes[1].plot(xs, [r["peer_copy"]["gbps"] for r in rows], "k--", label="torch copy, same bytes")
    if result["gpus"] == TARGET["gpus"] and result["prefill_tp"] == 1:
        axes[0].plot([TARGET["tokens"]], [TARGET["handoff_ms"]], "r*", ms=10, label=f"target {TARGET['handoff_ms']} ms")
    for ax, label in ((axes[0], "ms"), (axes[1], "GB/s")):
        ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel=label)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"KV handoff in a cell: {result['device']}\n{result['machine'][:110]}, {result['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--gpus", type=int, choices=[1, 2], default=1,
                        help="cuda: 1 = both engines on cuda:0; 2 = prefill on cuda:0, decode on cuda:1 (a cell)")
    parser.add_argument("--prefill-tp", type=int, choices=[1, 2], default=1,
                        help="the prefill engine's tensor_parallel_size (the decode engine stays at 1)")
    parser.add_argument("--tokens", default="2048", help="prompt lengths, comma-separated")
    parser.add_argument("--reps", type=int, default=20, help="timed handoffs per size")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--peer-copy-reps", type=int, default=20)
    parser.add_argument("--model-dir", default=None, help="where the random checkpoint is written, or "
                        "was (cuda; reused when complete)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default bench/results/kv_cell-<device>[-2gpu][-prefill-tp2].json)")
    args = parser.parse_args(argv)
    try:
        sizes = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        parser.error(f"--tokens {args.tokens!r}: give prompt lengths as integers, e.g. 16,512,2048")
    if any(n < 1 for n in sizes):
        parser.error("--tokens: every prompt length must be >= 1")
    if args.device == "cpu" and args.gpus != 1:
        parser.error("--gpus 2 needs --device cuda: on the CPU both engines share the one device "
                     "(the two-process path runs as is; leave --gpus out)")
    if args.device == "cuda":
        import torch

        visible = torch.cuda.device_count()
        need = max(args.gpus, args.prefill_tp)
        if visible < need:
            parser.error(f"--gpus {args.gpus} --prefill-tp {args.prefill_tp} needs {need} GPUs; {visible} visible")
        if args.prefill_tp > args.gpus:
            parser.error("--prefill-tp 2 needs --gpus 2 (the prefill ranks take cuda:0 and cuda:1)")
    from baton.engine.tiny_model import ensure_tiny_model

    if args.device == "cuda":
        from engine_workload import LLAMA31_8B, write_random_checkpoint

        model_dir = write_random_checkpoint(Path(args.model_dir or tempfile.mkdtemp(prefix="kv-cell-")),
                                            LLAMA31_8B, ensure_tiny_model())
        torch.cuda.empty_cache()  # the draws' cached blocks: the GPUs are for the engines
        model = "Llama-3.1-8B shape, random bf16 weights"
    else:
        model_dir, model = ensure_tiny_model(), "embedded tiny model"
    prefill_device, decode_device, where = placement(args)
    max_len = max(sizes) + args.decode_tokens + 64
    num_blocks = 4 * (-(-max_len // 16)) + 16
    started = time.perf_counter()
    decode = Worker(_worker, "decode", str(model_dir), decode_device, num_blocks, max_len, 1)
    prefill = Worker(_worker, "prefill", str(model_dir), prefill_device, num_blocks, max_len, args.prefill_tp)
    by_tokens = {}
    try:
        decode.call("ping")
        prefill.call("ping")
        print(f"engines ready in {time.perf_counter() - started:.0f} s: {where}", flush=True)
        for n in sizes:
            by_tokens[str(n)] = measure_size(prefill, decode, n, args, "cell")
    finally:
        decode.close()
        prefill.close()
    if args.device == "cuda":  # the same bytes by torch, the engines gone
        target = "cuda:1" if args.gpus == 2 else "cuda:0"
        for n, row in by_tokens.items():
            row["peer_copy"] = ref = peer_copy(row["bytes"], args.peer_copy_reps, "cuda:0", target)
            print(f"{int(n):5d} tokens: torch copy cuda:0 -> {target} {ref['median_ms']:.3f} ms "
                  f"(p10 {ref['p10_ms']:.3f}, p90 {ref['p90_ms']:.3f}), {ref['gbps']:.1f} GB/s", flush=True)
    result = {
        "benchmark": "kv_cell",
        "machine": machine(args.device),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": where,
        "gpus": args.gpus if args.device == "cuda" else 0,
        "prefill_tp": args.prefill_tp,
        "model": model,
        "decode_tokens": args.decode_tokens,
        "by_tokens": by_tokens,
        "handoff_ms": {n: r["handoff_ms"]["median"] for n, r in by_tokens.items()},
        "tokens_match": all(r["tokens_match"] for r in by_tokens.values()),
        "target": TARGET,
        "note": "handoff_ms = KVSender.push_held called on the prefill engine's process until the decode "
                "side's complete() ran (median, p10, p90 over reps); transport picked by auto; tokens_match: "
                "the decode engine's greedy continuation after the handoff equals the prefill engine's own "
                "greedy run (at prefill TP 2 in bf16 the ranks sum in another order, so a near-tie may part "
                "later: matching_prefix counts the tokens that agree); peer_copy: torch copy of the same "
                "bytes, CUDA events, after the engines stopped",
    }
    if args.device == "cuda" and args.gpus == TARGET["gpus"] and args.prefill_tp == 1 and str(TARGET["tokens"]) in by_tokens:
        result["meets_target"] = by_tokens[str(TARGET["tokens"])]["handoff_ms"]["median"] <= TARGET["handoff_ms"]
    suffix = (f"-{args.gpus}gpu" if args.device == "cuda" and args.gpus > 1 else "") + \
        (f"-prefill-tp{args.prefill_tp}" if args.prefill_tp > 1 else "")
    out = Path(args.out or Path(__file__).parent / "results" / f"kv_cell-{args.device}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("handoff_ms", "tokens_match")} | {
        "meets_target": result.get("meets_target")}))
    print(f"wrote {out}")
    try:
        plot(result, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
