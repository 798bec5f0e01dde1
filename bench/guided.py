"""Guided decoding overhead: time per output token with and without a JSON-schema constraint.

For each batch size, runs B requests that decode `--max-tokens` tokens each, once free and
once under a JSON schema whose shortest output is longer than that (so every sequence stays
in the batch to the end), alternating the two `--repeats` times. A step counts when all B
sequences decode in it; time per output token (TPOT) is the median of those steps. Also
records the time the guided transform spends on the host per step (bitmask fill and the
launch of its application) and the cold compile time of the schema.

CPU (the embedded tiny model):
    python3 bench/guided.py --out bench/results/guided-cpu.json
CUDA (a random Llama-3.1-8B-shaped model, any dimension overridable with --hidden,
--layers, ..., whose logits are 128,256 wide, with a byte-level BPE vocabulary trained on
the standard library; `--vocab-kind synthetic` takes random multi-byte pieces instead, a
worst case for xgrammar: many tokens mix quotes, brackets and letters, and those it must
check one by one at every step):
    python3 bench/guided.py --device cuda --dtype bfloat16 --llama-8b --max-tokens 128 \
        --out bench/results/guided-h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from baton.engine import EngineArgs, GuidedDecodingParams, LLMEngine, SamplingParams
from baton.engine.tiny_model import SPECIAL_TOKENS, ensure_tiny_model

# --flag -> Hugging Face config key, over Llama-3.1-8B's config (bench/engine_workload.py).
SHAPE_FLAGS = {
    "hidden": "hidden_size",
    "intermediate": "intermediate_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "vocab": "vocab_size",
}

# Rows of records: at least 64 items, so no output completes within the measured tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "rows": {
            "type": "array",
            "minItems": 64,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 100000},
                    "name": {"type": "string", "maxLength": 16},
                    "kind": {"enum": ["alpha", "beta", "gamma", "delta"]},
                    "score": {"type": "number"},
                    "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 8}},
                },
                "required": ["id", "name", "kind", "score", "tags"],
            },
        }
    },
    "required": ["rows"],
}


def synthetic_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE tokenizer with `vocab_size` tokens: the special tokens, the 256 byte
    symbols, then random multi-character pieces (no merges: prompts encode to bytes, every
    id decodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    rng = random.Random(seed)
    common = "etaoinshrdlucmfwypvbgkqjxz" * 4 + "ETAOINSHRDLU0123456789" + "Ġ" * 12 + '{}[]":,.-_'
    pool = common + "".join(alphabet)  # mostly text, some bytes of multi-byte characters
    while len(vocab) < vocab_size:
        piece = "".join(rng.choice(pool) for _ in range(rng.choice((2, 3, 3, 4, 4, 5, 6, 7, 8, 10))))
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def bpe_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE tokenizer trained here, in seconds, on this Python's standard library
    sources (English docstrings and code, like much of a real LLM vocabulary), padded to
    `vocab_size` with concatenations of two of its word pieces once the merges run out."""
    import glob
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(f"{root}/**/*.py", recursive=True) if "site-packages" not in f)
    texts = [Path(f).read_text(errors="replace") for f in files]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    words = sorted(t for t in tok.get_vocab() if t.removeprefix("Ġ").isalpha())
    rng = random.Random(seed)
    extra, have = [], set(tok.get_vocab())
    while tok.get_vocab_size() + len(extra) < vocab_size:
        piece = rng.choice(words) + rng.choice(words).removeprefix("Ġ")
        if piece not in have:
            have.add(piece)
            extra.append(piece)
    tok.add_tokens(extra)
    return tok


def write_model(out: Path, args: argparse.Namespace) -> Path:
    """A random Llama checkpoint of the requested shape (drawn on the device, as the engine
    benchmark does) with a synthetic tokenizer as wide as its vocabulary."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from engine_workload import LLAMA31_8B, write_random_checkpoint

    cfg = dict(LLAMA31_8B, bos_token_id=0, eos_token_id=[1, 3])  # the synthetic specials
    for flag, key in SHAPE_FLAGS.items():
        if getattr(args, flag) is not None:
            cfg[key] = getattr(args, flag)
    cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    draw_on = args.device if args.device.startswith("cuda") else "cpu"
    write_random_checkpoint(out, cfg, ensure_tiny_model(), device=draw_on)
    make = bpe_tokenizer if args.vocab_kind == "bpe" else synthetic_tokenizer
    make(cfg["vocab_size"]).save(str(out / "tokenizer.json"))
    return out


def timed_transform(engine: LLMEngine, sink: list[float]):
    """Wrap the engine's guided transform to record its host time per step."""
    transforms = engine.runner.sampler.transforms
    index = transforms.index(engine.guided.apply)
    inner = transforms[index]

    def timed(logits, seqs):
        t0 = time.perf_counter()
        try:
            return inner(logits, seqs)
        finally:
            if any(s.params.guided_decoding is not None for s in seqs):
                sink.append(time.perf_counter() - t0)

    transforms[index] = timed


class TimedFill:
    """xgrammar's BatchGrammarMatcher, recording the host time of each bitmask fill."""

    def __init__(self, threads, sink: list[float]):
        import xgrammar

        self.inner = xgrammar.BatchGrammarMatcher(threads)
        self.sink = sink

    def batch_fill_next_token_bitmask(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.inner.batch_fill_next_token_bitmask(*args, **kwargs)
        finally:
            self.sink.append(time.perf_counter() - t0)


def set_fill_threads(engine: LLMEngine, threads, sink: list[float]) -> None:
    """Fill the guided bitmasks with this many xgrammar threads ("auto": xgrammar's choice)."""
    engine.guided._get_compiler()
    engine.guided._batch = TimedFill(threads, sink)


def run_batch(engine: LLMEngine, batch: int, guided: bool, max_tokens: int, tag: str) -> list[float]:
    """Decode `batch` requests; return the times of steps where all of them decoded."""
    g = GuidedDecodingParams(json=SCHEMA) if guided else None
    for i in range(batch):
        params = SamplingParams(
            temperature=1.0, seed=i, max_tokens=max_tokens, ignore_eos=True, guided_decoding=g
        )
        engine.add_request(f"{tag}-{i}", f"Record {i} of the table, as JSON:", params)
    sched = engine.scheduler
    times = []
    while engine.has_unfinished_requests():
        full = not sched.waiting and len(sched.running) == batch and not any(s.in_prefill for s in sched.running)
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        if full:
            times.append(dt)
        for out in outs:
            if out.finished:
                assert out.error is None, out.error
                assert len(out.outputs[0].token_ids) == max_tokens, "an output finished early"
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--model", help="a model directory (default: the embedded tiny model)")
    p.add_argument("--llama-8b", action="store_true", help="a random Llama-3.1-8B-shaped model")
    for flag in SHAPE_FLAGS:
        p.add_argument("--" + flag.replace("_", "-"), type=int, help="with --llama-8b: override")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocab-kind", choices=["bpe", "synthetic"], default="bpe",
                   help="with --llama-8b: a BPE vocabulary trained on the standard library (default) or "
                        "random multi-byte pieces (a worst case for xgrammar's token-mask cache)")
    p.add_argument("--fill-threads", nargs="+", default=["1"],
                   help="xgrammar bitmask-fill threads to compare ('auto' or a number); the first is the headline")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    fill_threads = [t if t == "auto" else int(t) for t in args.fill_threads]

    tmp = None
    if args.model:
        model = Path(args.model)
    elif args.llama_8b:
        tmp = tempfile.TemporaryDirectory(prefix="baton-bench-guided-")
        t0 = time.perf_counter()
        model = write_model(Path(tmp.name), args)
        print(f"wrote a random model in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    else:
        model = ensure_tiny_model()

    engine = LLMEngine.from_engine_args(
        EngineArgs(
            model=str(model),
            device=args.device,
            dtype=args.dtype,
            max_num_seqs=max(args.batch),
            max_model_len=args.max_tokens + 64,
            # Every sequence's prompt and output fit at once: no preemption while measuring.
            num_gpu_blocks_override=max(args.batch) * (-(-(args.max_tokens + 64) // 16) + 1),
        )
    )
    mask_times: list[float] = []
    timed_transform(engine, mask_times)

    t0 = time.perf_counter()
    engine.guided.compile(GuidedDecodingParams(regex="a"))  # imports xgrammar, reads the vocabulary
    init_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    engine.guided.compile(GuidedDecodingParams(json=SCHEMA))
    compile_ms = (time.perf_counter() - t0) * 1e3
    fill_times: list[float] = []
    set_fill_threads(engine, fill_threads[0], fill_times)
    for guided in (False, True):  # warm-up: kernels, the matcher's caches
        run_batch(engine, max(args.batch), guided, 8, f"warm-{guided}")

    results = []
    for batch in args.batch:
        steps: dict[object, list[float]] = {t: [] for t in [None, *fill_threads]}  # None: free
        host: dict[object, list[float]] = {t: [] for t in fill_threads}
        fills: dict[object, list[float]] = {t: [] for t in fill_threads}
        for r in range(args.repeats):
            for threads in steps:
                if threads is not None:
                    set_fill_threads(engine, threads, fill_times)
                mask_times.clear()
                fill_times.clear()
                steps[threads] += run_batch(engine, batch, threads is not None, args.max_tokens, f"b{batch}-{r}-{threads}")
                if threads is not None:
                    host[threads] += mask_times
                    fills[threads] += fill_times
        free_ms = statistics.median(steps[None]) * 1e3
        by_threads = {}
        for threads in fill_threads:
            json_ms = statistics.median(steps[threads]) * 1e3
            by_threads[str(threads)] = {
                "json_tpot_ms": round(json_ms, 3),
                "overhead_pct": round((json_ms / free_ms - 1) * 100, 1),
                "guided_host_ms_per_step": round(statistics.median(host[threads]) * 1e3, 3),
                "bitmask_fill_ms_per_step": round(statistics.median(fills[threads]) * 1e3, 3),
            }
        head = by_threads[str(fill_threads[0])]
        row = {
            "batch": batch,
            "free_tpot_ms": round(free_ms, 3),
            **head,
            "fill_threads": fill_threads[0],
            "by_fill_threads": by_threads,
            "steps_measured": {"free": len(steps[None]), "json": len(steps[fill_threads[0]])},
        }
        print(json.dumps(row), file=sys.stderr)
        results.append(row)

    import xgrammar

    cfg = engine.config.hf_config
    report = {
        "benchmark": "guided decoding overhead (JSON schema vs free), time per output token",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python3 bench/guided.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "device": torch.cuda.get_device_name(engine.config.device) if engine.config.device.type == "cuda" else "cpu",
            "cpu": _cpu_name(),
            "cpu_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "xgrammar": _version("xgrammar", xgrammar),
        },
        "model": {
            "hidden": cfg["hidden_size"],
            "layers": cfg["num_hidden_layers"],
            "heads": cfg["num_attention_heads"],
            "kv_heads": cfg["num_key_value_heads"],
            "vocab": cfg["vocab_size"],
            "tokenizer_vocab": engine.tokenizer.vocab_size,
            "vocab_kind": args.vocab_kind if args.llama_8b else "the model's own",
            "dtype": str(engine.config.dtype).removeprefix("torch."),
        },
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "guided_init_ms": round(init_ms, 1),
        "schema_compile_ms": round(compile_ms, 1),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _version(name: str, module) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return getattr(module, "__version__", "unknown")


if __name__ == "__main__":
    sys.exit(main())
