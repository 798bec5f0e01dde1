"""`baton generate`: offline generation from the command line (the embedded tiny model by default)."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="baton generate", description="Generate text offline with the engine.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("prompts", nargs="*", help="prompts (default: read one per line from stdin)")
    parser.add_argument("--model", default=None, help="Hugging Face model directory (default: the tiny random model)")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                        help="keep generating past end-of-sequence tokens (default: on for the tiny "
                             "model, whose random weights often end at once; off otherwise)")
    parser.add_argument("--num-gpu-blocks-override", type=int, default=None, help="KV blocks (default: sized from memory)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    parser.add_argument("--quantization", default=None,
                        help="default: as config.json says; fp8 quantizes an unquantized checkpoint at load")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model dtype) or fp8 (e4m3)")
    parser.add_argument("--kernel-config", default=None, metavar="NAME=VALUE,...",
                        help="kernel switches over the defaults (KernelConfig fields, e.g. fuse_norms=false)")
    parser.add_argument("--model-module", default=None, metavar="MODULE",
                        help="module name or .py path imported first (registers architectures with ModelRegistry)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="split the model over N processes, one per GPU (gloo over processes on the CPU)")
    parser.add_argument("--speculative-config", default=None, metavar="JSON",
                        help='speculative decoding: \'{"method": "ngram", "num_speculative_tokens": 4}\' or a draft "model"')
    parser.add_argument("--explain", action="store_true",
                        help="print which kernel computes each op per decode batch size (then generate any prompts)")
    args = parser.parse_args(argv)

    from baton.engine.llm import LLM
    from baton.sampling_params import SamplingParams

    prompts = args.prompts or ([] if args.explain else [line.rstrip("\n") for line in sys.stdin if line.strip()])
    if not prompts and not args.explain:
        parser.error("give at least one prompt")
    try:
        ignore_eos = args.model is None if args.ignore_eos is None else args.ignore_eos
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
            ignore_eos=ignore_eos,
        )
        llm = LLM(
            model=args.model, dtype=args.dtype, device=args.device, num_gpu_blocks_override=args.num_gpu_blocks_override,
            kernel_config=args.kernel_config, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
            model_module=args.model_module, tensor_parallel_size=args.tensor_parallel_size,
            speculative_config=args.speculative_config,
        )
        if args.explain:
            print(llm.engine.runner.explain())
        outputs = llm.generate(prompts, params) if prompts else []
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"baton generate: {exc}", file=sys.stderr)
        return 2
    for out in outputs:
        completion = out.outputs[0]
        if args.json:
            print(json.dumps({"prompt": out.prompt, "text": completion.text, "token_ids": completion.token_ids,
                              "finish_reason": completion.finish_reason}))
        else:
            print(f"{out.prompt!r} -> {completion.text!r} ({completion.finish_reason})")
    return 0
