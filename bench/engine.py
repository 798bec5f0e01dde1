"""H100 engine benchmark: batch-1 decode, decode against the bandwidth floor, prefill MFU,
offline throughput, and `transformers` on the same workload.

    python bench/engine.py --out bench/results/engine-h100.json --png bench/results/engine-h100.png
    python bench/engine.py --tensor-parallel-size 2   # two GPUs: bench/results/engine-tp2-h100.json

Tensor parallelism against TP 1, the figures of the multi-GPU issue only (`--sections` picks
what runs; `--baseline` puts each figure beside the TP 1 run's, as `vs_baseline`):

    python bench/engine.py --sections batch1,decode,prefill,offline --decode-batches 1,64 \
        --prefill-lengths 2048 --hf-requests 0 --out tp1.json
    python bench/engine.py --tensor-parallel-size 2 --sections batch1,decode,prefill,offline \
        --decode-batches 1,64 --prefill-lengths 2048 --hf-requests 0 --baseline tp1.json --out tp2.json

`--device cpu` runs the same code paths on the embedded tiny model (gloo at TP > 1) with
small settings: a check that the script works, its figures say nothing (floors and MFU are
against the H100's datasheet).

Llama-3.1-8B-shaped model with random bf16 weights drawn on the GPU (`engine_workload.py`).
Every figure is a wall-clock time of the engine's own code path, medians of repeated runs
after warm-up: batch-1 TPOT, decode steps (`decode`) and the offline run through
`LLMEngine.step` with the engine's defaults (on CUDA: asynchronous scheduling; the
synchronous figures beside them), prefill through `ModelRunner.execute`. `decode_parts`
splits a synchronous decode step: `ModelRunner.execute`, the graph replay on the GPU alone,
input preparation and sampling on the host.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_workload import (  # noqa: E402
    LLAMA31_8B,
    PEAK_BF16_FLOPS,
    decode_floor_s,
    offline_requests,
    prefill_flops,
    write_awq_checkpoint,
    write_random_checkpoint,
)

from baton.engine.config import EngineArgs  # noqa: E402
from baton.engine.llm_engine import LLMEngine  # noqa: E402
from baton.engine.scheduler import ScheduledBatch  # noqa: E402
from baton.engine.sequence import Sequence  # noqa: E402
from baton.sampling_params import SamplingParams  # noqa: E402

GREEDY = dict(temperature=0, ignore_eos=True, detokenize=False)
BATCH1_TARGET_RATIO = 0.6  # issue 28: batch-1 time per token at TP 2 at most this share of TP 1


SECTIONS = ("batch1", "decode", "decode_parts", "fusion", "prefill", "offline", "hf")


def machine() -> dict:
    if not torch.cuda.is_available():
        import platform

        return {"gpu": None, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                "cpus": os.cpu_count()}
    props = torch.cuda.get_device_properties(0)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    import triton

    return {"gpu": props.name, "nvidia_smi": smi, "sms": props.multi_processor_count, "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__, "cpus": os.cpu_count()}


def run_record() -> dict:
    """The machine, command (with the BATON_ switches it ran under) and date the GPU benches'
    results start with."""
    switches = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("BATON_")]
    return {"machine": machine(), "command": " ".join([*switches, "python3", *sys.argv]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def timed(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gpu_time(fn, repeats: int = 20) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats / 1e3


def synthetic_seqs(engine: LLMEngine, batch: int, context: int, rng) -> list[Sequence]:
    """`batch` sequences whose first `context - 1` tokens are cached (random KV) and whose
    next step decodes token `context`."""
    seqs = []
    for i in range(batch):
        seq = Sequence(f"syn{i}", 0, rng.integers(0, engine.config.vocab_size, context).tolist(),
                       SamplingParams(max_tokens=1, **GREEDY), 0.0)
        seq.block_table = engine.reserve_blocks(context)
        seq.num_computed_tokens = context - 1
        seqs.append(seq)
    return seqs


def release(engine: LLMEngine, seqs: list[Sequence]) -> None:
    for seq in seqs:
        engine.release_blocks(seq.block_table)


def _floor_s(engine: LLMEngine, batch: int, context: int) -> float:
    """The decode step's memory floor; at tensor parallelism N each GPU reads 1/N of the
    weights and KV (the all-reduces not counted)."""
    return decode_floor_s(engine.config.hf_config, batch, context) / engine.config.tensor_parallel_size


def bench_batch1(engine: LLMEngine, rng, prompt_len=128, new_tokens=256) -> dict:
    """Decode time per output token of one request through `LLMEngine.step`."""
    params = SamplingParams(max_tokens=new_tokens, **GREEDY)
    tpots = []
    for rep in range(3):
        engine.add_request(f"b1-{rep}", {"prompt_token_ids": rng.integers(0, engine.config.vocab_size, prompt_len).tolist()},
                           params)
        stamps = []
        while engine.has_unfinished_requests():
            engine.step()
            stamps.append(time.perf_counter())
        tpots.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))  # after the first token
    return {"tpot_ms": 1e3 * statistics.median(tpots[1:]), "prompt_tokens": prompt_len, "new_tokens": new_tokens}


def bench_decode(engine: LLMEngine, batches: list[int], context: int, rng) -> dict:
    runner = engine.runner
    results = {}
    for b in batches:
        seqs = synthetic_seqs(engine, b, context, rng)
        batch = ScheduledBatch(seqs, [1] * b)
        step = timed(lambda batch=batch: runner.execute(batch), repeats=20)
        entry = {"step_ms": 1e3 * step, "floor_ms": 1e3 * _floor_s(engine, b, context)}
        entry["ratio"] = entry["floor_ms"] / entry["step_ms"]
        graphs = runner.graphs
        if graphs is not None:
            size = graphs.fill(seqs)
            graphs._upload(size)
            graph = graphs.graphs[size][0]
            entry["graph_gpu_ms"] = 1e3 * gpu_time(graph.replay)
            entry["host_prep_ms"] = 1e3 * timed(lambda g=graphs, s=seqs: g.fill(s), repeats=20)
            logits = graphs.graphs[size][1][:b]
            entry["sampler_ms"] = 1e3 * timed(lambda x=logits, s=seqs: runner.sampler(x, s), repeats=20)
        results[b] = entry
        release(engine, seqs)
        print(f"decode b={b}: {entry}", flush=True)
    return results


@contextlib.contextmanager
def decoding(engine: LLMEngine, batch: int, context: int, rng, tag: str, lead: int = 0):
    """`batch` requests with random `context - 1 - lead`-token prompts and unbounded greedy
    outputs, all prefilled and decoding together inside the block (the first decode step
    reads `context - lead` tokens of each); aborted and drained after it."""
    params = SamplingParams(max_tokens=context, **GREEDY)
    ids = [f"{tag}-{i}" for i in range(batch)]
    prompt_len = context - 1 - lead
    for rid in ids:
        engine.add_request(rid, {"prompt_token_ids": rng.integers(0, engine.config.vocab_size, prompt_len).tolist()},
                           params)
    while any(not s.output_token_ids for r in engine.requests.values() for s in r.seqs):  # prefill (chunked)
        engine.step()
    try:
        yield
    finally:
        for rid in ids:
            engine.abort_request(rid)
        while engine.has_unfinished_requests():
            engine.step()


def bench_decode_engine(engine: LLMEngine, batches: list[int], context: int, rng, steps: int = 24) -> dict:
    """Decode step time through `LLMEngine.step` (the engine's own configuration: on CUDA,
    asynchronous scheduling), `b` requests decoding together: the median interval between
    step() returns once every prompt is prefilled. The prompts are `steps / 2` tokens short
    of `context`, so that the median step reads `context` tokens of each sequence, as the
    floor counts. Outputs are unbounded (prompts prefilled first would otherwise finish
    while the last are prefilled, shrinking the batch); the requests are aborted after
    `steps` steps."""
    results = {}
    for b in batches:
        with decoding(engine, b, context, rng, f"dec{b}", lead=steps // 2):
            stamps = [time.perf_counter()]
            for _ in range(steps):
                engine.step()
                stamps.append(time.perf_counter())
        step = float(np.median(np.diff(stamps[1:])))  # from the second step: the first may start the chain
        results[b] = {"step_ms": 1e3 * step, "floor_ms": 1e3 * _floor_s(engine, b, context)}
        results[b]["ratio"] = results[b]["floor_ms"] / results[b]["step_ms"]
        print(f"engine decode b={b}: {results[b]}", flush=True)
    return results


def bench_unfused_and_eager(engine: LLMEngine, rng, context: int) -> dict:
    """What the fast path and the CUDA graphs buy: the same steps without them (the torch
    reference model, the same attention backend)."""
    from baton.engine.cuda_graphs import DecodeGraphs

    runner, out = engine.runner, {}
    fast = runner.model
    for b in (1, 64):
        seqs = synthetic_seqs(engine, b, context, rng)
        batch = ScheduledBatch(seqs, [1] * b)
        graphs = runner.graphs
        runner.graphs = None
        out[f"eager_fused_step_ms_b{b}"] = 1e3 * timed(lambda batch=batch: runner.execute(batch), repeats=10)
        runner.model = runner.reference
        out[f"eager_unfused_step_ms_b{b}"] = 1e3 * timed(lambda batch=batch: runner.execute(batch), repeats=10)
        unfused = DecodeGraphs(runner.reference, runner.backend, runner.kv, engine.config.block_size,
                               engine.config.max_model_len, b, runner.device, sizes=[b])
        unfused.capture()
        runner.model = fast
        unfused.fill(seqs)
        unfused._upload(b)
        out[f"graph_unfused_gpu_ms_b{b}"] = 1e3 * gpu_time(unfused.graphs[b][0].replay)
        del unfused
        runner.graphs = graphs
        release(engine, seqs)
    print(f"unfused/eager: {out}", flush=True)
    return out


def bench_prefill(engine: LLMEngine, lengths: list[int], rng) -> dict:
    results = {}
    for n in lengths:
        seq = Sequence("prefill", 0, rng.integers(0, engine.config.vocab_size, n).tolist(),
                       SamplingParams(max_tokens=1, **GREEDY), 0.0)
        seq.block_table = engine.reserve_blocks(n)
        batch = ScheduledBatch([seq], [n])
        t = timed(lambda batch=batch: engine.runner.execute(batch), repeats=5, warmup=2)
        flops = prefill_flops(engine.config.hf_config, n)
        gpus = engine.config.tensor_parallel_size
        results[n] = {"ms": 1e3 * t, "tok_s": n / t, "tflop_s": flops / t / 1e12,
                      "mfu": flops / t / (PEAK_BF16_FLOPS * gpus)}
        release(engine, [seq])
        print(f"prefill {n}: {results[n]}", flush=True)
    return results


def bench_offline(engine: LLMEngine, requests) -> dict:
    """All requests at once through `LLMEngine.step`; per-step host costs at large batches
    when scheduling is synchronous (asynchronously launched steps skip the scheduler)."""
    instrument = not engine.config.async_scheduling
    sched, execute = engine.scheduler.schedule, engine.runner.execute
    steps: list[dict] = []

    def timed_schedule():
        t = time.perf_counter()
        batch = sched()
        steps.append({"n": len(batch.seqs), "tokens": batch.total_tokens, "schedule": time.perf_counter() - t})
        return batch

    def timed_execute(batch, sample=True):
        t = time.perf_counter()
        out = execute(batch, sample)
        steps[-1]["execute"] = time.perf_counter() - t
        return out

    if instrument:
        engine.scheduler.schedule, engine.runner.execute = timed_schedule, timed_execute
    engine.stream_outputs = False  # as LLM.generate runs it: only final outputs are built
    start = time.perf_counter()
    for i, (prompt, n_out) in enumerate(requests):
        engine.add_request(f"off{i}", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=n_out, **GREEDY))
    got = 0
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        for out in engine.step():
            if out.finished:
                got += len(out.outputs[0].token_ids)
        if instrument:
            steps[-1]["step"] = time.perf_counter() - t
    elapsed = time.perf_counter() - start
    if instrument:
        del engine.scheduler.schedule, engine.runner.execute
    engine.stream_outputs = True
    want = sum(o for _, o in requests)
    if got != want:
        raise RuntimeError(f"offline run produced {got} output tokens, expected {want}")
    prompt_tokens = sum(len(p) for p, _ in requests)
    big = [s for s in steps if s["n"] >= 200 and s["tokens"] == s["n"] and "execute" in s]
    host = {}
    if big:
        host = {
            "steps": len(big),
            "schedule_ms": 1e3 * statistics.median(s["schedule"] for s in big),
            "execute_ms": 1e3 * statistics.median(s["execute"] for s in big),
            "engine_rest_ms": 1e3 * statistics.median(s["step"] - s["schedule"] - s["execute"] for s in big),
        }
    return {"requests": len(requests), "seconds": elapsed, "output_tokens": want, "prompt_tokens": prompt_tokens,
            "output_tok_s": want / elapsed, "total_tok_s": (want + prompt_tokens) / elapsed,
            "steps": len(steps), "decode_steps_ge200_host": host}


def versus(result: dict, baseline: dict) -> dict:
    """The multi-GPU issue's figures of this run beside the same figures of `baseline` (a
    result of this script, TP 1 on the same machine): each {this, baseline, ratio = this /
    baseline} (times: below 1 is faster; the offline throughput: above 1 is faster)."""

    def figures(r: dict) -> dict:
        return {"batch1_tpot_ms": r.get("decode_tpot_ms_batch1"),
                "decode_step_ms_b64": r.get("decode", {}).get("64", {}).get("step_ms"),
                "prefill_ms_2048": r.get("prefill", {}).get("2048", {}).get("ms"),
                "offline_output_tok_s": r.get("offline_output_tok_s")}

    this, base = figures(result), figures(baseline)
    out = {k: {"this": this[k], "baseline": base[k],
               "ratio": this[k] / base[k] if this[k] is not None and base[k] else None} for k in this}
    ratio = out["batch1_tpot_ms"]["ratio"]
    return {"baseline_tensor_parallel_size": baseline.get("tensor_parallel_size", 1),
            "baseline_date": baseline.get("date"), "baseline_command": baseline.get("command"),
            "same_gpu_model": baseline.get("machine", {}).get("gpu") == result["machine"].get("gpu"),
            "figures": out, "batch1_target_ratio": BATCH1_TARGET_RATIO,
            "meets_batch1_target": ratio is not None and ratio <= BATCH1_TARGET_RATIO}


def plot(result: dict, path: Path) -> None:
    """Whichever of decode against the floor, prefill MFU and offline throughput ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    dec = result.get("decode", {})
    bs = sorted(int(b) for b in dec)
    axes[0].plot(bs, [dec[str(b)]["step_ms"] for b in bs], "o-", label="engine step (wall)")
    axes[0].plot(bs, [dec[str(b)]["floor_ms"] for b in bs], "k--", label="bandwidth floor (3.35 TB/s)")
    axes[0].set(xscale="log", xlabel=f"batch ({result['decode_context']}-token contexts)",
                ylabel="ms per decode step", title="Decode step vs floor")
    axes[0].legend()
    pre = result.get("prefill", {})
    lens = sorted(int(n) for n in pre)
    axes[1].bar([str(n) for n in lens], [100 * pre[str(n)]["mfu"] for n in lens])
    axes[1].axhline(60, color="k", ls="--", label="target 60%")
    axes[1].set(xlabel="prompt tokens", ylabel="MFU % (989 TFLOP/s)", title="Prefill MFU")
    axes[1].legend()
    names = ["baton", "transformers"]
    vals = [result.get("offline_output_tok_s") or 0, result.get("hf_offline_output_tok_s") or 0]
    axes[2].bar(names, vals)
    axes[2].set(ylabel="output tokens/s",
                title=f"Offline: {result.get('offline', {}).get('requests', 0)} requests (HF: subset, see JSON)")
    tp = result["tensor_parallel_size"]
    where = result["machine"]["gpu"] or f"CPU ({result['machine']['cpu']})"
    fig.suptitle(f"{result['model']}, TP {tp}, {where} — {result['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: the embedded tiny model (gloo at TP > 1): checks the script, its figures mean nothing")
    ap.add_argument("--out", default=None, help="default: bench/results/engine-[tpN-]h100.json (on the CPU: -cpu)")
    ap.add_argument("--png", default=None, help="default: --out with .png")
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="GPUs the engine splits the model over (one process each, NCCL; gloo on the CPU)")
    ap.add_argument("--model-dir", default="/tmp/llama31-8b-random",
                    help="where the random checkpoint is written, or was (reused when complete)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"what runs, comma-separated, of {','.join(SECTIONS)} (fusion: TP 1 on CUDA only)")
    ap.add_argument("--decode-batches", default="1,8,32,64,128,256")
    ap.add_argument("--decode-context", type=int, default=1024, help="tokens each sequence of a decode step reads")
    ap.add_argument("--prefill-lengths", default="512,2048,8192")
    ap.add_argument("--batch1-new-tokens", type=int, default=256)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--hf-requests", type=int, default=128, help="0 skips the transformers baseline")
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--warmup-requests", type=int, default=300, help="untimed offline requests run first")
    ap.add_argument("--quantization", default=None, choices=["fp8", "awq"],
                    help="fp8: the bf16 checkpoint quantized at load; awq: an int4 (group 128) AWQ copy of it")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    ap.add_argument("--kernel-config", default=None,
                    help="KernelConfig switches over the defaults, NAME=VALUE,... (e.g. fuse_fp8_quant=off)")
    ap.add_argument("--offline-sync-scheduling", action="store_true",
                    help="run the offline workload a second time without asynchronous scheduling")
    ap.add_argument("--baseline", default=None,
                    help="a result JSON of this script (TP 1, same machine): the issue's figures beside it")
    args = ap.parse_args()
    sections = [x for x in args.sections.split(",") if x]
    if unknown := set(sections) - set(SECTIONS):
        ap.error(f"--sections: unknown {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU is visible (use --device cpu for a check of the script on the CPU)")
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    tp = args.tensor_parallel_size
    if args.device == "cuda" and torch.cuda.device_count() < tp:
        ap.error(f"--tensor-parallel-size {tp} needs {tp} GPUs; {torch.cuda.device_count()} visible")
    tag = "h100" if args.device == "cuda" else "cpu"
    args.out = args.out or f"bench/results/engine-{f'tp{tp}-' if tp > 1 else ''}{tag}.json"
    args.png = args.png or str(Path(args.out).with_suffix(".png"))
    from baton.engine.tiny_model import ensure_tiny_model

    rng = np.random.default_rng(0)
    result = run_record()
    result["sections"] = sections

    def save() -> None:
        """After every section: a run stopped by its time limit keeps what it measured."""
        if baseline is not None:
            result["vs_baseline"] = versus(result, baseline)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))

    t = time.perf_counter()
    if args.device == "cuda":
        model_dir = write_random_checkpoint(Path(args.model_dir), LLAMA31_8B, ensure_tiny_model())
        result["model"] = "Llama-3.1-8B shape, random bf16 weights"
    else:
        model_dir = ensure_tiny_model()
        result["model"] = "embedded tiny model (CPU check of the script)"
    if args.quantization == "awq":
        model_dir = write_awq_checkpoint(model_dir, Path(args.model_dir + "-awq-g128"))
    result["checkpoint_write_s"] = time.perf_counter() - t
    t = time.perf_counter()
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(model_dir), dtype="bfloat16" if args.device == "cuda" else "auto", device=args.device,
        max_model_len=8320 if args.device == "cuda" else 2048, max_num_seqs=256,
        max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=0.9,
        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype, tensor_parallel_size=tp,
        kernel_config=args.kernel_config))
    vocab = engine.config.vocab_size
    result["quantization"], result["kv_cache_dtype"] = args.quantization, args.kv_cache_dtype
    result["tensor_parallel_size"] = tp
    result["engine_start_s"] = time.perf_counter() - t
    result["kernel_config"] = dataclasses.asdict(engine.runner.kernels)
    result["kernels"] = engine.runner.explain()
    tuning = getattr(engine.runner.model, "tuning", None)  # none at TP > 1: no fast path
    result["few_row_matmul_tuning"] = dict(tuning.report) if tuning is not None else None
    result["attention_backend"] = engine.runner.backend_name
    result["kv_blocks"] = engine.runner.num_blocks
    kv = engine.runner.kv  # never time on zeros (an e4m3 pool: small positive bytes, no NaN)
    kv.normal_() if kv.dtype != torch.float8_e4m3fn else kv.view(torch.uint8).random_(0, 0x70)
    if tp > 1:
        result["kv_note"] = "rank 0's KV pool is random; the other ranks' pools are zero-filled"
    result["async_scheduling"] = engine.config.async_scheduling
    result["decode_context"] = args.decode_context
    save()

    if "batch1" in sections:
        result["batch1"] = bench_batch1(engine, rng, new_tokens=args.batch1_new_tokens)
        result["decode_tpot_ms_batch1"] = result["batch1"]["tpot_ms"]
        print(f"batch-1 TPOT {result['decode_tpot_ms_batch1']:.3f} ms", flush=True)
        default_config = engine.config  # the same steps without asynchronous scheduling (read per step)
        engine.config = dataclasses.replace(default_config, async_scheduling=False)
        result["batch1_sync_scheduling"] = bench_batch1(engine, rng, new_tokens=args.batch1_new_tokens)
        engine.config = default_config
        print(f"batch-1 TPOT, synchronous scheduling {result['batch1_sync_scheduling']['tpot_ms']:.3f} ms", flush=True)
        save()
    batches = [int(b) for b in args.decode_batches.split(",")]
    if "decode" in sections:
        decode = bench_decode_engine(engine, batches, args.decode_context, rng)
        result["decode"] = {str(b): v for b, v in decode.items()}
        result["decode_roofline_ratio"] = {b: v["ratio"] for b, v in result["decode"].items() if b != "1"}
        save()
    if "decode_parts" in sections:
        result["decode_parts"] = {str(b): v for b, v in bench_decode(engine, batches, args.decode_context, rng).items()}
        save()
    if "fusion" in sections and tp == 1 and args.device == "cuda":  # at TP > 1 every step is eager and unfused
        result["what_fusion_and_graphs_buy"] = bench_unfused_and_eager(engine, rng, args.decode_context)
        save()
    if "prefill" in sections:
        lengths = [int(n) for n in args.prefill_lengths.split(",")]
        result["prefill"] = {str(n): v for n, v in bench_prefill(engine, lengths, rng).items()}
        result["prefill_mfu"] = {n: v["mfu"] for n, v in result["prefill"].items()}
        save()
    requests = offline_requests(args.requests, vocab, seed=0)
    default_config = engine.config
    if "offline" in sections:
        # Untimed warm-up: the first mixed steps compile the kernels' variants for their shapes
        # (seconds of Triton compilation that a long-running server pays once, at its start).
        result["offline_warmup"] = bench_offline(engine, offline_requests(args.warmup_requests, vocab, seed=1))
        result["offline"] = bench_offline(engine, requests)
        result["offline_output_tok_s"] = result["offline"]["output_tok_s"]
        result["offline_total_tok_s"] = result["offline"]["total_tok_s"]
        print(f"offline: {result['offline']}", flush=True)
        if args.offline_sync_scheduling:
            engine.config = dataclasses.replace(default_config, async_scheduling=False)
            result["offline_sync_scheduling"] = bench_offline(engine, requests)
            engine.config = default_config
            print(f"offline, synchronous scheduling: {result['offline_sync_scheduling']}", flush=True)
        save()
    hf_run = "hf" in sections and args.hf_requests and args.device == "cuda"
    if hf_run:
        subset = requests[: args.hf_requests]
        result["offline_same_subset_as_hf"] = bench_offline(engine, subset)
    engine.runner.close()
    del engine
    if args.device == "cuda":
        torch.cuda.empty_cache()
    if hf_run:
        from engine_hf import hf_offline

        hf = hf_offline(model_dir, subset, args.hf_batch, LLAMA31_8B["eos_token_id"])
        result["hf_offline"] = hf
        result["hf_offline_output_tok_s"] = hf["output_tok_s"]
        result["hf_offline_total_tok_s"] = hf["total_tok_s"]
        result["hf_note"] = (f"transformers ran the first {len(subset)} of the {len(requests)} seeded requests "
                             "(device-time budget); its tok/s is measured on that subset, not scaled. The engine "
                             "on the same subset is in offline_same_subset_as_hf.")
        result["speedup_vs_hf_same_subset"] = result["offline_same_subset_as_hf"]["output_tok_s"] / hf["output_tok_s"]
        print(f"hf: {hf}", flush=True)
    save()
    if baseline is not None:
        print(f"against {args.baseline}: {json.dumps(result['vs_baseline']['figures'])}", flush=True)
    plot(result, Path(args.png))
    keys = ("decode_tpot_ms_batch1", "decode_roofline_ratio", "prefill_mfu", "offline_output_tok_s",
            "offline_total_tok_s")
    print(json.dumps({k: result[k] for k in keys if k in result}, indent=1))
    print(f"wrote {args.out} and {args.png}")


if __name__ == "__main__":
    main()
