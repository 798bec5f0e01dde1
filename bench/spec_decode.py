"""Speculative decoding: time per output token against batch size, with and without it.

    CPU (the embedded tiny model):
    python bench/spec_decode.py --device cpu --out bench/results/spec_decode-cpu.json
    GPU (Llama-3.1-8B-shaped, random bf16 weights, `engine_workload.py`):
    python bench/spec_decode.py --device cuda --out bench/results/spec_decode-h100.json \
        --png bench/results/spec_decode-h100.png

Random weights make natural acceptance meaningless, so the drafts are controlled: first
every prompt runs without speculation (greedy), then with speculation the drafter proposes
that run's own continuation, each drafted token replaced by a wrong one with probability
`1 - acceptance` (`--acceptance 1.0 0.5 0.0`; the measured rate is recorded beside it). Each
cell decodes `--tokens` tokens for every sequence of a batch and reports the time per
output token of one sequence (the step loop's wall time after prefill / tokens; the fastest
of `--repeats` runs) and its ratio to the same batch without speculation. One engine serves every cell: without
speculation it runs with its defaults (on CUDA: asynchronous scheduling and CUDA graphs),
with speculation synchronously, as every step that verifies drafts runs (here every step
drafts, so none would be launched ahead). The fixed `k` of a cell is kept at
every batch size (the load-adaptive rule off), which is what the rule's thresholds are
read from (`crossover`: the smallest batch at which speculation at that acceptance is
slower than none).

`--adaptive`: per batch, also the engine as a user runs it (k = 4, the load-adaptive rule's
defaults, drafts half right) with `async_scheduling` off and on (rows `"k": "adaptive"`):
where the rule drafts nothing (large batches) the steps chain as without speculation, which
is why asynchronous scheduling stays on by default with speculation on CUDA
(docs/decisions.md, "Speculative decoding").
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from baton.engine.config import EngineArgs
from baton.engine.llm_engine import LLMEngine
from baton.engine.spec_decode.config import parse_speculative
from baton.engine.spec_decode.decoder import SpecDecoder
from baton.sampling_params import SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True, detokenize=False)


def run_record(device: str) -> dict:
    # The load average: on a shared host other processes' load inflates every figure.
    machine = {"cpus": os.cpu_count(), "torch": torch.__version__, "load_average_at_start": os.getloadavg()}
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_properties(0).name
    return {"machine": machine, "command": " ".join(["python3", *sys.argv]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def decode_run(engine: LLMEngine, prompts: list[list[int]], tokens: int, tag: str) -> tuple[float, dict]:
    """Decode `tokens` per prompt, all at once; (seconds per output token after the prefill
    step, prompt -> prompt + output ids)."""
    params = SamplingParams(max_tokens=tokens, **GREEDY)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    finals = {}
    started = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        if started is None and all(s.num_output_tokens >= 1 for s in engine.scheduler.running):
            if engine.config.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
    elapsed = time.perf_counter() - started
    full = {tuple(finals[rid].prompt_token_ids): list(finals[rid].prompt_token_ids) + list(finals[rid].outputs[0].token_ids)
            for rid in ids}
    return elapsed / (tokens - 1), full


def oracle(reference: dict[tuple, list[int]], acceptance: float, vocab: int, seed: int):
    """A drafter proposing each sequence's own greedy continuation, every token wrong with
    probability 1 - acceptance."""
    rng = np.random.default_rng(seed)

    def draft(seq, n: int) -> list[int]:
        known = reference[tuple(seq.prompt_token_ids)]
        drafts = known[seq.num_tokens : seq.num_tokens + n]
        return [t if rng.random() < acceptance else (t + 1 + int(rng.integers(vocab - 1))) % vocab for t in drafts]

    return draft


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--png", default=None)
    ap.add_argument("--model-dir", default="/tmp/llama31-8b-random", help="GPU: where the random checkpoint goes")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--acceptance", type=float, nargs="+", default=[1.0, 0.5, 0.0])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=None, help="output tokens per sequence")
    ap.add_argument("--repeats", type=int, default=2, help="runs per cell; the fastest counts (a loaded host)")
    ap.add_argument("--adaptive", action="store_true",
                    help="also time the default load-adaptive rule with async_scheduling off and on")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    batches = args.batches or ([1, 2, 4, 8, 16, 32, 64, 128] if cuda else [1, 2, 4, 8, 16, 32])
    tokens = args.tokens or (128 if cuda else 24)

    from baton.engine.tiny_model import ensure_tiny_model

    result = run_record(args.device)
    if cuda:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from engine_workload import LLAMA31_8B, write_random_checkpoint

        model_dir = write_random_checkpoint(Path(args.model_dir), LLAMA31_8B, ensure_tiny_model())
        engine_args = EngineArgs(model=str(model_dir), dtype="bfloat16", device="cuda", max_model_len=4096,
                                 max_num_seqs=max(batches), max_num_batched_tokens=8192)
    else:
        engine_args = EngineArgs(model=str(ensure_tiny_model()), device="cpu", max_model_len=1024,
                                 max_num_seqs=max(batches), max_num_batched_tokens=8192,
                                 num_gpu_blocks_override=max(batches) * 64 + 16)
    engine = LLMEngine.from_engine_args(engine_args)
    vocab = engine.config.vocab_size
    default_config = engine.config
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        prompts = [rng.integers(4, vocab, args.prompt_len).tolist() for _ in range(batch)]
        decode_run(engine, prompts, 4, f"warm-b{batch}")  # compile this batch's shapes first
        base_s, reference = decode_run(engine, prompts, tokens, f"b{batch}")
        base_s = min([base_s, *(decode_run(engine, prompts, tokens, f"b{batch}-{r}")[0] for r in range(args.repeats - 1))])
        print(f"batch {batch}: {base_s * 1e3:.2f} ms/token without speculation", flush=True)
        engine.config = dataclasses.replace(default_config, async_scheduling=False)
        for k in args.ks:
            config = parse_speculative({"method": "ngram", "num_speculative_tokens": k,
                                        "shorten_by_batch_size": 10**9, "disable_by_batch_size": 10**9})
            for acc in args.acceptance:
                engine.spec = SpecDecoder(config, engine.block_manager, engine.max_model_len)
                engine.spec.drafter = oracle(reference, acc, vocab, seed=batch * 100 + k)
                s = min(decode_run(engine, prompts, tokens, f"b{batch}-k{k}-a{acc}-{r}")[0] for r in range(args.repeats))
                st = engine.spec.stats
                rows.append({"batch": batch, "k": k, "acceptance": acc, "ms_per_token": s * 1e3,
                             "ratio": s / base_s, "measured_acceptance": st.acceptance_rate,
                             "mean_accepted_length": st.mean_accepted_length})
                print(f"  k={k} acceptance {acc:.1f} (measured {st.acceptance_rate:.2f}): "
                      f"{s * 1e3:.2f} ms/token, {s / base_s:.2f}x", flush=True)
        if args.adaptive:
            config = parse_speculative({"method": "ngram", "num_speculative_tokens": 4})
            for async_scheduling in (False, True):
                engine.config = dataclasses.replace(default_config, async_scheduling=async_scheduling)
                engine.spec = SpecDecoder(config, engine.block_manager, engine.max_model_len)
                engine.spec.drafter = oracle(reference, 0.5, vocab, seed=batch)
                s = min(decode_run(engine, prompts, tokens, f"b{batch}-adaptive-{async_scheduling}-{r}")[0]
                        for r in range(args.repeats))
                rows.append({"batch": batch, "k": "adaptive", "acceptance": 0.5, "async_scheduling": async_scheduling,
                             "ms_per_token": s * 1e3, "ratio": s / base_s,
                             "measured_acceptance": engine.spec.stats.acceptance_rate})
                print(f"  adaptive (k=4, drafts half right), async_scheduling={async_scheduling}: "
                      f"{s * 1e3:.2f} ms/token, {s / base_s:.2f}x", flush=True)
        engine.spec = None
        engine.config = default_config
        rows.append({"batch": batch, "k": 0, "acceptance": None, "ms_per_token": base_s * 1e3, "ratio": 1.0})
    result["rows"] = rows
    result["machine"]["load_average_at_end"] = os.getloadavg()
    result["crossover"] = {
        f"k={k},acceptance={acc}": next((r["batch"] for r in rows if r["k"] == k and r["acceptance"] == acc
                                         and r["ratio"] > 1.0), None)
        for k in args.ks for acc in args.acceptance}
    Path(args.out).write_text(json.dumps(result, indent=1))
    if args.png:
        plot(rows, args.ks, args.acceptance, Path(args.png), result["machine"])


def plot(rows: list[dict], ks: list[int], accs: list[float], path: Path, machine: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(accs), figsize=(5 * len(accs), 4), sharey=True)
    for ax, acc in zip(np.atleast_1d(axes), accs):
        for k in ks:
            cell = [r for r in rows if r["k"] == k and r["acceptance"] == acc]
            ax.plot([r["batch"] for r in cell], [r["ratio"] for r in cell], marker="o", label=f"k={k}")
        ax.axhline(1.0, color="grey", linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"acceptance {acc:.0%}")
        ax.set_xlabel("batch (sequences decoding)")
        ax.legend()
    np.atleast_1d(axes)[0].set_ylabel("time per token / without speculation")
    fig.suptitle(f"Speculative decoding, {machine.get('gpu', 'CPU')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
