"""Where a decode step's GPU time goes, and what programmatic dependent launch (PDL) buys.

For a Llama-3.1-8B-shaped model with random weights (as `bench/engine.py`), 1k-token
contexts: the GPU time of one replay of the captured decode graph at several batch sizes,
with PDL on and off (graphs recaptured), batch-1 time per output token through
`LLMEngine.step`, a kernel-by-kernel breakdown of one replay at each batch size from the profiler
(sum of kernel times against the replay's time: the rest is the GPU between kernels), and
the GPU timeline of engine steps (`--step-profile-batches`): the kernels outside the graph
and the largest gaps between kernels. With PDL a kernel's profiled time includes its wait
for the previous one, so its sums overlap; the profiler also slows the host, so the gaps
around a step's copies show the host, not the engine's own pace: `--step-events-batches`
times engine steps with CUDA events instead (input copies, graph, sampling, the rest of
the step period, against replays of the same graph alone). `--norm-fusion-off` adds a
variant with the residual add + RMSNorm as its own kernel; `--variant` any other
`KernelConfig` setting (each variant is the engine's kernel configuration with those fields
replaced, applied with `ModelRunner.set_kernel_config`, which captures the graphs again).

    python3 bench/kernels/decode_profile.py --out decode-profile.json
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_workload import LLAMA31_8B, decode_floor_s, write_random_checkpoint  # noqa: E402

from baton.engine.config import EngineArgs  # noqa: E402
from baton.engine.llm_engine import LLMEngine  # noqa: E402
from engine import bench_batch1, decoding, gpu_time, release, run_record, synthetic_seqs  # noqa: E402


def graph_times(engine: LLMEngine, batches: list[int], context: int, rng) -> dict:
    runner = engine.runner
    out = {}
    for b in batches:
        seqs = synthetic_seqs(engine, b, context, rng)
        size = runner.graphs.fill(seqs)
        runner.graphs._upload(size)
        ms = 1e3 * gpu_time(runner.graphs.graphs[size][0].replay, repeats=50)
        out[b] = {"graph_gpu_ms": ms, "floor_ms": 1e3 * decode_floor_s(LLAMA31_8B, b, context)}
        out[b]["gpu_ratio"] = out[b]["floor_ms"] / ms
        release(engine, seqs)
    return out


def kernel_breakdown(engine: LLMEngine, batch: int, context: int, rng) -> dict:
    from torch.profiler import ProfilerActivity, profile

    seqs = synthetic_seqs(engine, batch, context, rng)
    graphs = engine.runner.graphs
    size = graphs.fill(seqs)
    graphs._upload(size)
    graph = graphs.graphs[size][0]
    replays = 10
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    release(engine, seqs)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in kernels:
        by_name[e.name].append(e.device_time)
    total_us = sum(sum(v) for v in by_name.values()) / replays
    span_us = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / replays
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:25]
    return {
        "batch": batch,
        "kernels_per_replay": len(kernels) / replays,
        "kernel_time_us_per_replay": total_us,
        "span_us_per_replay": span_us,
        "between_kernels_us_per_replay": span_us - total_us,
        "top": [{"kernel": name[:120], "calls_per_replay": len(v) / replays, "us_per_replay": sum(v) / replays,
                 "us_per_call": sum(v) / len(v)} for name, v in top],
    }


def step_breakdown(engine: LLMEngine, batch: int, context: int, rng, steps: int = 8) -> dict:
    """The GPU timeline of `steps` steps through `LLMEngine.step` at one batch size (the
    engine's own configuration): wall time per step against kernel time, and the largest
    gaps between kernels, by the kernels on either side, and the kernels outside the graph."""
    from torch.profiler import ProfilerActivity, profile

    with decoding(engine, batch, context, rng, f"prof{batch}"):
        for _ in range(4):
            engine.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t) * 1e6 / steps
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    gaps: dict[tuple[str, str], list[float]] = defaultdict(list)
    for a, b in zip(kernels, kernels[1:]):
        gaps[(a.name[:60], b.name[:60])].append(b.time_range.start - a.time_range.end)
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in kernels:
        by_name[e.name[:80]].append(e.device_time)
    span = kernels[-1].time_range.end - kernels[0].time_range.start
    busy = sum(e.device_time for e in kernels)
    return {
        "batch": batch,
        "wall_us_per_step": wall_us,
        "gpu_span_us_per_step": span / steps,
        "kernel_us_per_step": busy / steps,
        "kernels_per_step": len(kernels) / steps,
        "top_gaps": [{"before": k[0], "after": k[1], "us_per_step": sum(v) / steps, "count_per_step": len(v) / steps}
                     for k, v in sorted(gaps.items(), key=lambda kv: -sum(kv[1]))[:12]],
        # A kernel the graph runs appears a multiple of the layer count per step, or once.
        "kernels": [{"kernel": k, "calls_per_step": len(v) / steps, "us_per_step": sum(v) / steps}
                    for k, v in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:20]],
    }


class _MarkedReplay:
    """A captured graph whose replay first records a CUDA event (into `marks`)."""

    def __init__(self, graph, marks: list):
        self.graph, self.marks = graph, marks

    def replay(self) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.marks.append(event)
        self.graph.replay()


def step_events(engine: LLMEngine, batch: int, context: int, rng, steps: int = 24) -> dict:
    """Engine steps at one batch size timed with CUDA events instead of the profiler (which
    slows the host): per step, the GPU time of the input copies before the graph, of the
    graph, of the sampling kernels after it, and the rest of the step period (the copy of
    the ids to the host and the GPU waiting for the host); the host's time per step(); and,
    for comparison, back-to-back replays of the last step's graph on the same sequences."""
    graphs, sampler = engine.runner.graphs, engine.runner.sampler
    marks: list[list] = []
    replays: list = []
    run, sample_ids, captured = graphs.run, sampler.sample_ids, dict(graphs.graphs)

    def timed_run(seqs, input_ids=None):
        start, graph_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = run(seqs, input_ids)
        graph_end.record()
        marks.append([start, replays[-1], graph_end])
        return out

    def timed_sample(logits, seqs):
        ids = sample_ids(logits, seqs)
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        if marks and len(marks[-1]) == 3:
            marks[-1].append(end)
        return ids

    with decoding(engine, batch, context, rng, f"ev{batch}", lead=steps // 2):
        for _ in range(4):
            engine.step()
        graphs.run, sampler.sample_ids = timed_run, timed_sample
        graphs.graphs = {size: (_MarkedReplay(g, replays), logits) for size, (g, logits) in captured.items()}
        try:
            stamps = [time.perf_counter()]
            for _ in range(steps):
                engine.step()
                stamps.append(time.perf_counter())
            torch.cuda.synchronize()
        finally:
            graphs.run, sampler.sample_ids, graphs.graphs = run, sample_ids, captured
        size = next(s for s in graphs.sizes if s >= batch)
        alone_us = 1e6 * gpu_time(graphs.graphs[size][0].replay, repeats=20)
    marks = [m for m in marks if len(m) == 4]
    us = lambda a, b: a.elapsed_time(b) * 1e3  # noqa: E731
    med = lambda xs: float(np.median(xs))  # noqa: E731
    inputs = [us(a, b) for a, b, _, _ in marks]
    graph = [us(b, c) for _, b, c, _ in marks]
    sampling = [us(c, d) for _, _, c, d in marks]
    period = [us(m0[0], m1[0]) for m0, m1 in zip(marks, marks[1:])]
    return {"batch": batch, "steps": len(marks), "gpu_period_us": med(period), "inputs_us": med(inputs),
            "graph_us": med(graph), "graph_alone_us": alone_us, "sampling_us": med(sampling),
            "rest_of_period_us": med([p - i - g - s for p, i, g, s in zip(period, inputs, graph, sampling)]),
            "host_step_us": 1e6 * med(np.diff(stamps[1:]))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="decode-profile.json")
    ap.add_argument("--model-dir", default="/tmp/llama31-8b-random")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--prefetch-mb", type=float, nargs="+", default=[0, 4, 8, 16],
                    help="weight bytes per product prefetched into L2 before the PDL wait (PDL on)")
    ap.add_argument("--no-pdl-off", action="store_true", help="skip the variant without PDL (and its kernel profile)")
    ap.add_argument("--norm-fusion-off", action="store_true",
                    help="add a variant (PDL on, default prefetch) with the residual add + RMSNorm as its own kernel")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=0, help="default: the largest of --batches")
    ap.add_argument("--variant", action="append", default=[],
                    help="a variant to time, 'name:FIELD=value,...' (KernelConfig fields, e.g. use_swap, "
                         "rope_epilogue, merge_in_splits, split_programs; values are Python literals)")
    ap.add_argument("--step-profile-batches", type=int, nargs="*", default=[8, 64],
                    help="batch sizes whose LLMEngine.step timeline is profiled")
    ap.add_argument("--step-events-batches", type=int, nargs="*", default=[8, 32, 64],
                    help="batch sizes whose engine steps are timed with CUDA events")
    args = ap.parse_args()
    from baton.engine.tiny_model import ensure_tiny_model

    rng = np.random.default_rng(0)
    result = run_record()
    model_dir = write_random_checkpoint(Path(args.model_dir), LLAMA31_8B, ensure_tiny_model())
    t = time.perf_counter()
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(model_dir), dtype="bfloat16", device="cuda", max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs or max(args.batches),
        gpu_memory_utilization=0.9))
    result["engine_start_s"] = time.perf_counter() - t
    result["pdl_enabled_at_start"] = engine.runner.kernels.pdl
    result["few_row_matmul_tuning"] = dict(engine.runner.model.tuning.report)
    result["kernels_at_start"] = engine.runner.explain()
    engine.runner.kv.normal_()
    result["batch1_tpot_ms"] = {}
    result["graph"] = {}
    variants = [] if args.no_pdl_off else [("no_pdl", {"pdl": False, "prefetch_mb": 0})]
    if args.norm_fusion_off:
        variants.append(("no_norm_fusion", {"fuse_norms": False}))
    variants += [(f"pdl_prefetch_{mb:g}mb", {"prefetch_mb": mb}) for mb in args.prefetch_mb]
    for spec in args.variant:  # "name:FIELD=value,..."
        key, _, sets = spec.partition(":")
        variants.append((key, {k: ast.literal_eval(v) for k, v in (a.split("=") for a in sets.split(","))}))
    defaults = engine.config.kernels  # the engine's own (PDL as configured, resolved per GPU by the runner)
    for key, settings in variants:
        engine.runner.set_kernel_config(dataclasses.replace(defaults, **settings))
        result["graph"][key] = graph_times(engine, args.batches, 1024, rng)
        result["batch1_tpot_ms"][key] = bench_batch1(engine, rng, new_tokens=128)["tpot_ms"]
        print(key, result["batch1_tpot_ms"][key], result["graph"][key], flush=True)
        if key == "no_pdl":  # kernel times without PDL's overlap: each kernel's own duration
            for b in args.batches:
                result[f"profile_b{b}"] = kernel_breakdown(engine, b, 1024, rng)
    engine.runner.set_kernel_config(defaults)
    result["step_events"] = {b: step_events(engine, b, 1024, rng) for b in args.step_events_batches}
    for b, e in result["step_events"].items():
        print("step events", b, e, flush=True)
    result["engine_steps"] = {b: step_breakdown(engine, b, 1024, rng) for b in args.step_profile_batches}
    for b, p in result["engine_steps"].items():
        print("engine steps", b, {k: v for k, v in p.items() if k not in ("top_gaps", "kernels")})
        for row in p["top_gaps"][:8]:
            print("    gap", row)
        for row in p["kernels"][:10]:
            print("    kernel", row)
    result["batch1_tpot_ms"]["default"] = bench_batch1(engine, rng, new_tokens=128)["tpot_ms"]  # async on CUDA
    default_config = engine.config
    engine.config = dataclasses.replace(default_config, async_scheduling=False)
    result["batch1_tpot_ms"]["sync_scheduling"] = bench_batch1(engine, rng, new_tokens=128)["tpot_ms"]
    engine.config = default_config
    print(result["batch1_tpot_ms"], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("profile")}, indent=1))
    for k in [k for k in result if k.startswith("profile_b")]:
        p = result[k]
        print(k, {x: p[x] for x in p if x != "top"})
        for row in p["top"][:14]:
            print("   ", row)


if __name__ == "__main__":
    main()
