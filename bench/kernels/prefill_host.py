"""Host-bound steps of two source trees, one after the other on one GPU: 512- and 2,048-token
prefills and eager (no CUDA graph) decode steps at batch 1 and 8.

These steps wait on the host's kernel launches (a 512-token prefill of the 8B shape takes
about as long to launch as to run), so they show what a change to the Python side of a
forward costs, which `bench/engine.py`'s graph-replayed decode steps hide. Each tree runs
in a process of its own (`--trees`, in turn, `--rounds` times: a host that slows down
between runs shows as a difference between rounds of one tree); a tree is a folder with
the repository's package folders (`baton/`, `engine/`, ...), e.g. an older commit's:

    mkdir -p trees/before && git archive be035e7 baton engine | tar -x -C trees/before
    python3 bench/kernels/prefill_host.py --trees trees/before,. --labels before,after \\
        --out bench/results/prefill-host-h100.json

Per step: `wall_ms` (the runner's `execute`, sampling included, median), `host_ms` (the
model's forward until it returns, the GPU idle before it), `gpu_ms` (the forward between
CUDA events). The checkpoint is random bf16 weights of the Llama-3.1-8B shape
(`--layers` of them), written once under `--model-dir`. Engines run with
`enforce_eager`, `max_num_seqs` 8 (few-row tuning at 16 rows only). `--device cpu` runs the
same steps on the tiny model (a check that each tree loads and runs through this script;
its times say nothing about a GPU host).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kvtransfer", "prefill", "decode", "colocated", "worker", "router")


def import_tree(tree: Path) -> None:
    """Make `baton` (and its component packages) import from `tree`, ahead of any installed copy."""
    folders = {"baton": tree / "baton"}
    folders.update({f"baton.{p}": tree / p for p in PACKAGES if (tree / p / "__init__.py").exists()})

    class Finder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            folder = folders.get(name)
            if folder is None:
                return None
            return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])

    sys.meta_path.insert(0, Finder)


def child(tree: Path, model_dir: Path, repeats: int, device: str) -> dict:
    import_tree(tree)
    import numpy as np
    import torch

    import baton.engine
    from baton.engine.config import EngineArgs
    from baton.engine.input_prep import prepare
    from baton.engine.llm_engine import LLMEngine
    from baton.engine.scheduler import ScheduledBatch
    from baton.engine.sequence import Sequence
    from baton.sampling_params import SamplingParams

    start = time.perf_counter()
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(model_dir), dtype="bfloat16" if device == "cuda" else "float32", device=device, max_model_len=4096,
        max_num_seqs=8, max_num_batched_tokens=2048, gpu_memory_utilization=0.5, enforce_eager=True,
        num_gpu_blocks_override=None if device == "cuda" else 640))
    runner = engine.runner
    runner.kv.normal_()
    result = {"engine_file": baton.engine.__file__, "engine_start_s": time.perf_counter() - start}
    rng = np.random.default_rng(0)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, detokenize=False)

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def measure(seqs, counts) -> dict:
        batch = ScheduledBatch(seqs, counts)
        for _ in range(3):
            runner.execute(batch)
        sync()
        wall, host, gpu = [], [], []
        for _ in range(repeats):
            t = time.perf_counter()
            runner.execute(batch)  # samples: waits for the tokens
            wall.append(time.perf_counter() - t)
        inputs = prepare(batch, engine.config.block_size, runner.device)
        with torch.inference_mode():
            for _ in range(repeats):
                sync()
                t = time.perf_counter()
                if cuda:
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record()
                runner.model(inputs.input_ids, inputs.positions, runner.kv, inputs.meta, runner.backend)
                host.append(time.perf_counter() - t)
                if cuda:
                    end.record()
                    end.synchronize()
                    gpu.append(begin.elapsed_time(end) / 1e3)
        times = (("wall_ms", wall), ("host_ms", host), ("gpu_ms", gpu))
        return {k: 1e3 * statistics.median(v) for k, v in times if v}

    for n in (512, 2048):
        seq = Sequence("prefill", 0, rng.integers(0, vocab, n).tolist(), params, 0.0)
        seq.block_table = engine.reserve_blocks(n)
        result[f"prefill_{n}"] = measure([seq], [n])
        engine.release_blocks(seq.block_table)
    for b in (1, 8):
        seqs = []
        for i in range(b):
            seq = Sequence(f"d{i}", 0, rng.integers(0, vocab, 1024).tolist(), params, 0.0)
            seq.block_table = engine.reserve_blocks(1024)
            seq.num_computed_tokens = 1023
            seqs.append(seq)
        result[f"eager_decode_b{b}"] = measure(seqs, [1] * b)
        for seq in seqs:
            engine.release_blocks(seq.block_table)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", default=".", help="comma-separated source trees (folders with baton/ and engine/)")
    ap.add_argument("--labels", default=None, help="comma-separated names of the trees (default: their paths)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--model-dir", default="/tmp/llama31-8b-random")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default="bench/results/prefill-host-h100.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    model_dir = Path(args.model_dir + ("" if args.layers == 32 else f"-{args.layers}-layers"))
    if args.child:
        result = child(Path(args.child).resolve(), model_dir, args.repeats, args.device)
        print("RESULT " + json.dumps(result), flush=True)
        return

    sys.path.insert(0, str(BENCH))
    from engine_workload import LLAMA31_8B, write_random_checkpoint

    from baton.engine.tiny_model import ensure_tiny_model

    if args.device == "cpu":
        model_dir = ensure_tiny_model()
        record = {"device": "cpu", "runs": []}
    else:
        from engine import run_record

        record = {**run_record(), "layers": args.layers, "runs": []}

    trees = args.trees.split(",")
    labels = args.labels.split(",") if args.labels else trees
    if len(labels) != len(trees):
        raise SystemExit("--labels needs one name per tree")
    if not (model_dir / "config.json").exists():
        write_random_checkpoint(model_dir, {**LLAMA31_8B, "num_hidden_layers": args.layers}, ensure_tiny_model())
    for round_ in range(args.rounds):
        for tree, label in zip(trees, labels):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", tree, "--layers", str(args.layers), "--repeats",
                 str(args.repeats), "--device", args.device,
                 "--model-dir", str(model_dir) if args.device == "cpu" else args.model_dir],
                capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"{label}: the child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            run = {"tree": label, "round": round_, **json.loads(lines[-1].removeprefix("RESULT "))}
            record["runs"].append(run)
            print(label, round_, {k: v for k, v in run.items() if isinstance(v, dict)}, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
