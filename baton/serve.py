"""`baton serve MODEL`: the drop-in for `vllm serve MODEL`, with vLLM's flag names.

vLLM's flags are mapped onto `baton up`'s (baton/up.py): engine flags go to the engine,
API flags to the router. One colocated replica (the default: no `--disaggregated`,
`--data-parallel-size 1`) runs in ONE process, the router and the engine together with no
gRPC hop between them (baton/inprocess.py). `--data-parallel-size N`
(N colocated workers behind the router), `--disaggregated` (prefill and decode workers, N
of each) and `--no-in-process` run what `baton up` runs: the router and the workers as
supervised local processes talking gRPC, with the same readiness wait, restarts and
shutdown.

Every flag is either implemented or refused by name before anything starts: a vLLM flag
Baton does not implement (`--pipeline-parallel-size 2`, `--swap-space`, `--trust-remote-code`)
exits 2 with a message naming it, never silently ignored. `--api-key KEY` is refused as
`baton up` refuses it (argv shows in `ps`): the key comes from $BATON_API_KEY or
`--api-key-file`.
"""

from __future__ import annotations

import argparse
import json
import sys

from baton import up
from baton.router.config import add_chat_flags

PROG = "baton serve"
# vLLM's --dtype spellings -> the workers'.
DTYPES = {"auto": "auto", "half": "float16", "float16": "float16", "bfloat16": "bfloat16",
          "float": "float32", "float32": "float32"}
# Flags that map onto the workers' flags of the same name, passed only when given.
ENGINE_VALUE_FLAGS = ("gpu_memory_utilization", "quantization", "kv_cache_dtype", "max_num_batched_tokens",
                      "seed", "block_size")
ENGINE_SWITCHES = ("enable_prefix_caching", "enable_chunked_prefill", "enforce_eager")
UVICORN_LEVELS = {"critical": "CRITICAL", "error": "ERROR", "warning": "WARNING", "info": "INFO",
                  "debug": "DEBUG", "trace": "DEBUG"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Serve a model with an OpenAI-compatible API, as `vllm serve` does (flags as vLLM "
                    "names them; one it has that Baton does not implement is refused by name). One "
                    "colocated replica (the default) runs in-process: the router and the engine in this "
                    "one process, no gRPC between them. --data-parallel-size > 1 or --disaggregated run "
                    "the router and the workers as separate processes, as `baton up` does.")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="Hugging Face model directory (default: the embedded tiny model)")
    p.add_argument("--model", default=None, help="the model directory, as a flag (instead of MODEL)")
    api = p.add_argument_group("API server")
    api.add_argument("--host", default="0.0.0.0", help="bind address (default: 0.0.0.0)")
    api.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    api.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                     help="names accepted in 'model'; the first is the one reported (default: the directory name)")
    api.add_argument("--api-key-file", default=None, metavar="PATH",
                     help="file holding the bearer token /v1/* requires (or $BATON_API_KEY; default: none)")
    api.add_argument("--api-key", default=None, help=argparse.SUPPRESS)  # refused: argv shows in `ps`
    add_chat_flags(api)
    api.add_argument("--uvicorn-log-level", default="info", choices=sorted(UVICORN_LEVELS),
                     help="the router's log level (in-process: the process's; trace is debug; default: info)")
    api.add_argument("--disable-log-requests", action="store_true",
                     help="accepted: Baton never logs request contents")
    api.add_argument("--disable-log-stats", action="store_true",
                     help="accepted: the engines log no periodic stats (they are on /metrics)")
    engine = p.add_argument_group("engine (each worker)")
    engine.add_argument("--task", default=None, choices=["generate", "embed"],
                        help="embed: the workers also serve /v1/embeddings (default: generate)")
    engine.add_argument("--dtype", default="auto", choices=sorted(DTYPES),
                        help="weights and activations (half is float16, float is float32; default: auto, the "
                             "checkpoint's, float32 on CPU)")
    engine.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    engine.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="share of GPU memory for weights and KV (default: the engine's, 0.9)")
    engine.add_argument("--quantization", "-q", default=None,
                        help="fp8, awq, gptq or compressed-tensors (default: as config.json says)")
    engine.add_argument("--kv-cache-dtype", default=None, help="auto or fp8 (default: the engine's, auto)")
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                        help="automatic prefix caching (default: the engine's, on)")
    engine.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None,
                        help="chunked prefill (default: the engine's, on)")
    engine.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                        help="no CUDA graphs (default: the engine's, off)")
    engine.add_argument("--max-num-seqs", type=int, default=None,
                        help="sequences a worker runs at once (default: the engine's, 256)")
    engine.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="tokens per engine step (default: the engine's, 2048)")
    engine.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default: the engine's, 16)")
    engine.add_argument("--num-gpu-blocks-override", type=int, default=None,
                        help="KV blocks per worker (default: sized from memory)")
    engine.add_argument("--seed", type=int, default=None, help="engine seed for unseeded sampling (default: 0)")
    engine.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    engine.add_argument("--speculative-config", default=None, metavar="JSON",
                        help='speculative decoding on the decode (or colocated) workers, as baton up '
                             '--speculative-config (e.g. {"method": "ngram", "num_speculative_tokens": 3}); '
                             'default: off')
    lora = p.add_argument_group("LoRA adapters")
    lora.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (requests name one in 'model')")
    lora.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                      help='adapters served from the start: NAME=PATH or {"name": NAME, "path": PATH} (needs '
                           "--enable-lora; more through /v1/load_lora_adapter)")
    lora.add_argument("--max-loras", type=int, default=None, help="adapters run at once per worker (default: 1)")
    lora.add_argument("--max-lora-rank", type=int, default=None, help="largest adapter rank (default: 16)")
    lora.add_argument("--max-cpu-loras", type=int, default=None,
                      help="unused adapters kept in host memory (default: --max-loras)")
    parallel = p.add_argument_group("parallelism")
    parallel.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                          help="GPUs a model replica is sharded over (default: 1)")
    parallel.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                          help="pipeline stages (Baton implements 1, the default)")
    parallel.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                          help="model replicas: workers behind the router (each of prefill and decode "
                               "with --disaggregated); more than 1 runs them as separate processes "
                               "(default: 1, in-process)")
    baton = p.add_argument_group("Baton's own")
    baton.add_argument("--disaggregated", action="store_true",
                       help="prefill and decode on separate worker processes, KV handed over between them "
                            "(default: off, one colocated engine)")
    baton.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None,
                       help="the router and the engine in this one process (default for one colocated "
                            "replica); --no-in-process: a router and a worker process, as baton up runs them "
                            "(on few cores they share no GIL: see docs/performance.md)")
    baton.add_argument("--kv-cache-memory-gb", type=float, default=None,
                       help="KV pool per CPU worker in GB (default: the engine's, 1)")
    baton.add_argument("--model-module", default=None, metavar="MODULE",
                       help="module name or .py path each worker imports first (registers architectures)")
    baton.add_argument("--shutdown-grace-seconds", type=float, default=10.0,
                       help="how long requests in flight may finish on Ctrl-C or SIGTERM (default: 10)")
    baton.add_argument("--quiet", action="store_true", help="hide the workers' and router's own output "
                       "(in-process: log warnings and errors only)")
    return p


def refused_flag(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """The first option in `argv` this parser does not define (a vLLM flag Baton does not
    implement, or a typo), or None. Checked before parsing, so that its value is never taken
    for MODEL."""
    known = {o for action in parser._actions for o in action.option_strings}
    for token in argv:
        if token == "--":
            break
        if not token.startswith("-") or token == "-" or _is_number(token):
            continue
        name = token.split("=", 1)[0]
        if name not in known:
            return name
    return None


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def to_up(ns: argparse.Namespace) -> tuple[argparse.Namespace | None, str | None]:
    """`baton up`'s namespace for these flags, or (None, why they cannot be served)."""
    if ns.pipeline_parallel_size != 1:
        return None, f"--pipeline-parallel-size {ns.pipeline_parallel_size} is not implemented by Baton; " \
                     "use --tensor-parallel-size to shard a model over GPUs"
    if ns.enable_auto_tool_choice and ns.tool_call_parser is None:
        return None, "--enable-auto-tool-choice needs --tool-call-parser (the parser reads the model's calls)"
    modules, problem = _lora_modules(ns.lora_modules or [])
    if problem is not None:
        return None, problem
    if modules and not ns.enable_lora:
        return None, "--lora-modules needs --enable-lora"
    if ns.data_parallel_size < 1:
        return None, "--data-parallel-size must be >= 1"
    if ns.in_process and (ns.disaggregated or ns.data_parallel_size > 1):
        return None, "--in-process runs one colocated engine: not with --disaggregated or --data-parallel-size > 1"
    if ns.model is not None and ns.model_tag is not None and ns.model != ns.model_tag:
        return None, f"the model is given twice ({ns.model_tag} and --model {ns.model})"
    argv = ["--host", ns.host, "--port", str(ns.port), "--dtype", DTYPES[ns.dtype], "--device", ns.device,
            "--tensor-parallel-size", str(ns.tensor_parallel_size),
            "--shutdown-grace-seconds", str(ns.shutdown_grace_seconds)]
    model = ns.model or ns.model_tag
    if model is not None:
        argv += ["--model", model]
    if ns.served_model_name:
        argv += ["--served-model-name", ",".join(ns.served_model_name)]
    n = str(ns.data_parallel_size)
    argv += ["--mode", "disaggregated", "--prefill", n, "--decode", n] if ns.disaggregated else [
        "--mode", "colocated", "--colocated", n]
    for flag in ("task", "speculative_config", "max_model_len", "max_num_seqs", "num_gpu_blocks_override", "kv_cache_memory_gb", "model_module",
                 "api_key_file", "api_key", "tool_call_parser", "chat_template"):
        value = getattr(ns, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    if modules:
        argv += ["--lora-modules", *modules]
    for flag in ("max_loras", "max_lora_rank", "max_cpu_loras"):
        value = getattr(ns, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    for flag in ("enable_auto_tool_choice", "trust_request_chat_template", "enable_lora", "quiet"):
        if getattr(ns, flag):
            argv.append(f"--{flag.replace('_', '-')}")
    args = up.build_parser().parse_args(argv)
    args.prog = PROG
    for flag in ENGINE_VALUE_FLAGS:
        value = getattr(ns, flag)
        if value is not None:
            args.engine_args = [*args.engine_args, f"--{flag.replace('_', '-')}", str(value)]
    for flag in ENGINE_SWITCHES:
        value = getattr(ns, flag)
        if value is not None:
            args.engine_args = [*args.engine_args, f"--{'' if value else 'no-'}{flag.replace('_', '-')}"]
    args.router_env = {"BATON_LOG_LEVEL": UVICORN_LEVELS[ns.uvicorn_log_level]}
    return args, None


def _lora_modules(items: list[str]) -> tuple[list[str], str | None]:
    """vLLM's --lora-modules items (NAME=PATH, or JSON with name and path) as NAME=PATH, or
    ([], why one cannot be read)."""
    out = []
    for item in items:
        if item.lstrip().startswith("{"):
            try:
                spec = json.loads(item)
            except json.JSONDecodeError as exc:
                return [], f"--lora-modules {item!r} is not valid JSON ({exc})"
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(
                    spec.get("path"), str):
                return [], f'--lora-modules {item!r}: the JSON form needs "name" and "path" strings'
            out.append(f"{spec['name']}={spec['path']}")
        elif "=" in item:
            out.append(item)
        else:
            return [], f"--lora-modules {item!r} is not NAME=PATH"
    return out, None


def main(argv: list[str]) -> int:
    parser = build_parser()
    flag = refused_flag(parser, argv)
    if flag is not None:
        print(f"{PROG}: {flag} is not implemented by Baton (it is refused rather than ignored); remove it. "
              f"`{PROG} --help` lists the flags Baton implements, docs/quickstart.md how vLLM's map onto them.",
              file=sys.stderr)
        return 2
    ns = parser.parse_args(argv)
    args, problem = to_up(ns)
    if problem is not None:
        print(f"{PROG}: {problem}", file=sys.stderr)
        return 2
    if in_process(ns):
        from baton import inprocess

        return inprocess.run(args, "WARNING" if ns.quiet else UVICORN_LEVELS[ns.uvicorn_log_level])
    return up.run(args)


def in_process(ns: argparse.Namespace) -> bool:
    """Whether these flags run in one process: one colocated replica (baton/inprocess.py),
    unless --no-in-process."""
    return ns.in_process is not False and not ns.disaggregated and ns.data_parallel_size == 1
