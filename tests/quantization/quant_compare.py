"""How the quantization tests compare engines: greedy token ids, and teacher forcing for the
formats that round activations (FP8), whose greedy text may part at a near-tie. With
`lora` (a LoRARequest) both engines load LoRA support and every request names the adapter."""

from __future__ import annotations

from baton.engine import LLM, SamplingParams

PROMPTS = ["The quick brown fox", "Hello, world! How are", "SELECT name FROM users WHERE", "One, two, three,"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
CPU = dict(device="cpu", num_gpu_blocks_override=128, block_size=8)


def _engine(model_dir, lora, kwargs) -> LLM:
    if lora is not None:
        kwargs = dict(enable_lora=True, max_lora_rank=16, **kwargs)
    return LLM(model=str(model_dir), **CPU, **kwargs)


def greedy(model_dir, lora=None, **kwargs) -> list[list[int]]:
    llm = _engine(model_dir, lora, kwargs)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=lora)]


def teacher_forced(model_dir, sequences: list[list[int]], lora=None, **kwargs) -> list[dict[int, float]]:
    """Log-probabilities of the 20 likeliest next tokens at every position but the first of
    each sequence, read in one prefill (prompt_logprobs)."""
    llm = _engine(model_dir, lora, kwargs)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=20)
    out = []
    prompts = [{"prompt_token_ids": s} for s in sequences]
    for o in llm.generate(prompts, params, use_tqdm=False, lora_request=lora):
        out += [{t: getattr(v, "logprob", v) for t, v in pos.items()} for pos in o.prompt_logprobs[1:]]
    return out


def assert_predicts_like(model_dir, reference_dir, lora=None, **kwargs) -> None:
    """`model_dir` (with `kwargs`) reads the reference model's greedy text: its top-1 agrees at
    most positions (random tiny models have near-ties that FP8 rounding flips), and the
    log-probability it gives the reference's top token differs by little on average (FP8
    rounding moves these large random logits by about a tenth; a wrong scale or layout
    moves them by whole units)."""
    ids = prompt_ids(reference_dir)
    sequences = [p + g for p, g in zip(ids, greedy(reference_dir, lora))]
    want = teacher_forced(reference_dir, sequences, lora)
    got = teacher_forced(model_dir, sequences, lora, **kwargs)
    agree, drift = 0, []
    for g, w in zip(got, want):
        top = max(w, key=w.get)
        agree += max(g, key=g.get) == top
        drift.append(abs(g.get(top, -100.0) - w[top]))
    assert agree / len(want) >= 0.75, (agree, len(want))
    assert sum(drift) / len(drift) < 0.3, drift


def prompt_ids(model_dir) -> list[list[int]]:
    tok = LLM(model=str(model_dir), **CPU).get_tokenizer()
    return [tok.encode(p) for p in PROMPTS]
