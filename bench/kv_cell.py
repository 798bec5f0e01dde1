"""A cell's handoff: two engine processes on one device, prefill in one, decode in the other.

Both processes run a real `AsyncLLMEngine` (on GPUs the Llama-3.1-8B-shaped random
checkpoint of `engine_workload.py`, on CPU the embedded tiny model) on the same device, as
two engines of one cell sharing a GPU. The decode process reserves blocks with an `auto`
`KVReceiver`; the prefill process prefills the prompt (`hold_kv=True`, one token) and pushes
its KV with `KVSender.push_held`, which picks `ipc` (CUDA IPC, or shared memory on CPU)
because both processes share the node. Per rep:

- `handoff_ms`: decode-ready latency, from `push_held` being called to the end of the
  decode side's `complete()` (its engine may admit the request), from `perf_counter`
  stamps of the two processes on one host (as in `kv_transfer.py`);
- `prefill_ms`: the prefill of the prompt on the prefill engine, for scale.

The last rep also decodes `--decode-tokens` greedily on the decode engine and compares them
with the prefill engine's own greedy run of the same prompt (`tokens_match`).

    python bench/kv_cell.py --device cuda --tokens 2048 --reps 20   # -> results/kv_cell-cuda.json
    python bench/kv_cell.py --device cpu --tokens 256 --reps 5      # the tiny model
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from pipe_worker import Worker, serve_commands  # noqa: E402 (bench/ is not a package)


def _worker(conn, role: str, model_dir: str, device: str, num_blocks: int, max_len: int) -> None:
    import asyncio

    asyncio.run(_serve(conn, role, model_dir, device, num_blocks, max_len))


async def _serve(conn, role: str, model_dir: str, device: str, num_blocks: int, max_len: int) -> None:

    import grpc

    from baton.engine import AsyncLLMEngine, EngineArgs, SamplingParams
    from baton.kvtransfer import KVReceiver, KVSender, Ticket
    from baton.rpc import server_options

    engine = AsyncLLMEngine.from_engine_args(EngineArgs(
        model=model_dir, device=device, num_gpu_blocks_override=num_blocks, max_model_len=max_len,
        max_num_batched_tokens=max_len, max_num_seqs=8, gpu_memory_utilization=0.45,
        enable_prefix_caching=False))
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


def machine(device: str) -> str:
    import platform

    import torch

    desc = f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}"
    if device == "cuda":
        desc = f"{torch.cuda.get_device_name(0)}; " + desc
    return desc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tokens", type=int, default=2048, help="prompt length")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--model-dir", default=None, help="where the random checkpoint is written (cuda)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/kv_cell-<device>.json)")
    args = parser.parse_args(argv)
    from baton.engine.tiny_model import ensure_tiny_model

    if args.device == "cuda":
        from engine_workload import LLAMA31_8B, write_random_checkpoint

        model_dir = write_random_checkpoint(Path(args.model_dir or tempfile.mkdtemp(prefix="kv-cell-")),
                                            LLAMA31_8B, ensure_tiny_model())
        import torch

        torch.cuda.empty_cache()  # the draws' cached blocks: the GPU is for the two engines
        model, device = "Llama-3.1-8B shape, random bf16 weights", "cuda:0"
    else:
        model_dir, model, device = ensure_tiny_model(), "embedded tiny model", "cpu"
    max_len = args.tokens + args.decode_tokens + 64
    num_blocks = 4 * (-(-max_len // 16)) + 16
    decode = Worker(_worker, "decode", str(model_dir), device, num_blocks, max_len)
    prefill = Worker(_worker, "prefill", str(model_dir), device, num_blocks, max_len)
    rows, transports = [], set()
    try:
        decode.call("ping")
        prefill.call("ping")
        import random

        rng = random.Random(0)
        prompt = [rng.randrange(10, 30000 if args.device == "cuda" else 500) for _ in range(args.tokens)]
        from baton.kvtransfer import Ticket

        for i in range(args.warmup + args.reps):
            last = i == args.warmup + args.reps - 1
            rid = f"cell-{i}"
            ticket = decode.call("reserve", rid=rid, num_tokens=len(prompt))
            decode.send("wait", ticket_id=Ticket.from_bytes(ticket).ticket_id, rid=rid, prompt=prompt,
                        decode_tokens=args.decode_tokens if last else 0)
            sent = prefill.call("prefill_push", ticket=ticket, rid=rid, prompt=prompt)
            got = decode.recv()
            transports.add(sent["transport"])
            if i >= args.warmup:
                rows.append({"handoff_s": got["complete"] - sent["push_called"], "prefill_s": sent["prefill_s"]})
            if last:
                reference = prefill.call("generate", rid="reference", prompt=prompt, n=args.decode_tokens)
                decoded, nbytes = got["tokens"], sent["bytes"]
    finally:
        decode.close()
        prefill.close()
    handoff = [r["handoff_s"] * 1e3 for r in rows]
    med = statistics.median(handoff)
    result = {
        "benchmark": "kv_cell",
        "machine": machine(args.device),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": "one GPU, two engine processes" if args.device == "cuda" else "CPU, two engine processes",
        "model": model,
        "tokens": args.tokens,
        "bytes": nbytes,
        "reps": args.reps,
        "transports": sorted(transports),
        "handoff_ms": med,
        "decode_ready_ms": med,
        "handoff_ms_min": min(handoff),
        "handoff_ms_max": max(handoff),
        "effective_gbps": nbytes / (med / 1e3) / 1e9,
        "prefill_ms": statistics.median(r["prefill_s"] * 1e3 for r in rows),
        "decode_tokens": args.decode_tokens,
        "tokens_match": decoded == reference,
        "note": "handoff_ms = KVSender.push_held called on the prefill engine's process until the decode "
                "side's complete() ran; both engines on one device; transport picked by auto",
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"kv_cell-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("transports", "handoff_ms", "effective_gbps", "prefill_ms",
                                              "tokens_match")}))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
