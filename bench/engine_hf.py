"""The `transformers` baseline of the engine benchmark: batched `generate` with a static cache.

Requests are taken in arrival order in batches, left-padded to the batch's longest prompt,
and every row generates the batch's longest output (`min_new_tokens` = `max_new_tokens`, so
no row stops early). Only the tokens each request asked for count as useful output; the
rest is padding work that a static batch cannot avoid. `generate` would compile the model
for a static cache by default; that is switched off (`disable_compile`) to bound device time,
so this is `transformers`' eager path, and the JSON says so.
"""

from __future__ import annotations

import time

import torch


def hf_offline(model_dir, requests: list[tuple[list[int], int]], batch_size: int, eos_token_id: int) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, device_map="cuda", attn_implementation="sdpa"
    ).eval()

    def generate(chunk: list[tuple[list[int], int]]) -> int:
        max_prompt = max(len(p) for p, _ in chunk)
        max_new = max(o for _, o in chunk)
        ids = torch.zeros((len(chunk), max_prompt), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (prompt, _) in enumerate(chunk):
            ids[j, max_prompt - len(prompt) :] = torch.tensor(prompt)
            mask[j, max_prompt - len(prompt) :] = 1
        config = GenerationConfig(
            max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, cache_implementation="static",
            disable_compile=True, pad_token_id=0, eos_token_id=eos_token_id,
        )
        with torch.inference_mode():
            out = model.generate(ids.cuda(), attention_mask=mask.cuda(), generation_config=config)
        return int(out.shape[0] * (out.shape[1] - max_prompt))

    generate([([1, 2, 3, 4], 4), ([5, 6], 4)])  # warm-up: cuBLAS handles, allocator
    torch.cuda.synchronize()
    elapsed = 0.0
    generated = 0
    for i in range(0, len(requests), batch_size):
        chunk = requests[i : i + batch_size]
        start = time.perf_counter()
        generated += generate(chunk)
        torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
    useful = sum(o for _, o in requests)
    prompt_tokens = sum(len(p) for p, _ in requests)
    return {
        "requests": len(requests),
        "batch_size": batch_size,
        "seconds": elapsed,
        "output_tokens": useful,
        "generated_tokens_incl_padding": generated,
        "output_tok_s": useful / elapsed,
        "total_tok_s": (useful + prompt_tokens) / elapsed,
        "mode": "generate(cache_implementation='static', do_sample=False, disable_compile=True), sdpa, "
                "batches in arrival order, left padding",
    }
