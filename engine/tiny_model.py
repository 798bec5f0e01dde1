"""The embedded tiny model: a small random Llama in Hugging Face format.

`baton tiny-model DIR` writes it; engines use it when no model is given (written once into
the user cache). Its weights are random (fixed seed), so its text is random too: it exists so
that every part of Baton runs on any machine without downloading a model. The tokenizer is a
byte-level BPE trained on a fixed text, with a ChatML-style chat template that renders tools
the way Llama 3.1's does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

TINY_MODEL_VERSION = "tiny-llama-v1"
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
# ChatML turns; with `tools`, Llama 3.1's way of calling them: the functions listed as JSON in
# the system turn, a call written as {"name": ..., "parameters": {...}} (several joined by
# "; "), results in `ipython` turns. A conversation without tools renders as plain ChatML.
TOOLS_PROMPT = (
    "You have access to the following functions. To call a function, respond with JSON for a "
    'function call of the form {"name": function name, "parameters": dictionary of argument name '
    "and its value}. Do not use variables."
)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ " + repr(TOOLS_PROMPT + "\n\n") + " }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\n\n' }}{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% for call in message['tool_calls'] %}"
    "{% if not loop.first %}{{ '; ' }}{% endif %}"
    "{{ '{\"name\": ' + (call['function']['name'] | tojson) + ', \"parameters\": ' }}"
    "{{ (call['function']['arguments'] | tojson) + '}' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% elif message['role'] in ('tool', 'ipython') %}"
    "{{ '<|im_start|>ipython\n' + message['content'] + '<|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = """\
Baton serves large language models on Kubernetes. A prompt is prefilled on one engine and
its key and value cache blocks are handed to another engine that decodes the answer token by
token. The router speaks the OpenAI API: completions, chat completions, streaming, usage.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today? I am fine,
thank you. What is the capital of France? The capital of France is Paris. One, two, three,
four, five, six, seven, eight, nine, ten. {"name": "Ada", "age": 36, "tags": ["math", "code"]}
def add(a, b): return a + b  # Python
SELECT name FROM users WHERE id = 42; Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 -2.5
Unicode: café, naïve, Straße, 東京, 😀, Ωmega.
"""

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "torch_dtype": "float32",
}


def build_tokenizer(vocab_size: int = 512) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return tok


def random_llama_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with Hugging Face Llama names, scaled so logits are far from uniform."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    vocab = config["vocab_size"]

    def linear(out_dim: int, in_dim: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(out_dim, in_dim, generator=gen) * (gain / in_dim**0.5)

    weights = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = 1.0 + 0.1 * torch.randn(hidden, generator=gen)
        weights[p + "post_attention_layernorm.weight"] = 1.0 + 0.1 * torch.randn(hidden, generator=gen)
        weights[p + "self_attn.q_proj.weight"] = linear(heads * head_dim, hidden, 2.0)
        weights[p + "self_attn.k_proj.weight"] = linear(kv_heads * head_dim, hidden, 2.0)
        weights[p + "self_attn.v_proj.weight"] = linear(kv_heads * head_dim, hidden)
        weights[p + "self_attn.o_proj.weight"] = linear(hidden, heads * head_dim)
        weights[p + "mlp.gate_proj.weight"] = linear(inter, hidden)
        weights[p + "mlp.up_proj.weight"] = linear(inter, hidden)
        weights[p + "mlp.down_proj.weight"] = linear(hidden, inter)
    weights["model.norm.weight"] = torch.ones(hidden)
    weights["lm_head.weight"] = linear(vocab, hidden, 4.0)
    return weights


def _tokenizer_config(model_max_length: int) -> str:
    return json.dumps(
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|end_of_text|>",
            "chat_template": CHAT_TEMPLATE,
            "model_max_length": model_max_length,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
        indent=2,
    )


def _refresh_template(model_dir: Path) -> None:
    """A copy written by an older Baton gets the current chat template (the weights and the
    tokenizer did not change; the template learned tools)."""
    path = model_dir / "tokenizer_config.json"
    if json.loads(path.read_text()).get("chat_template") == CHAT_TEMPLATE:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(_tokenizer_config(TINY_CONFIG["max_position_embeddings"]))
    os.replace(tmp, path)  # atomic: a process reading it meanwhile sees the old or the new file


def write_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = dict(
        TINY_CONFIG,
        vocab_size=tok.get_vocab_size(),
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=[ids["<|end_of_text|>"], ids["<|im_end|>"]],
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, indent=2)
    )
    (out / "tokenizer_config.json").write_text(_tokenizer_config(config["max_position_embeddings"]))
    weights = {k: v.contiguous() for k, v in random_llama_weights(config, seed).items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "README.md").write_text(
        "Baton's embedded tiny model: a random Llama. Its output is random text.\n"
    )
    return out


def ensure_tiny_model() -> Path:
    """The tiny model in the user cache ($BATON_CACHE_DIR or ~/.cache/baton), written once."""
    from baton.settings import cache_dir

    target = cache_dir() / TINY_MODEL_VERSION
    if (target / "model.safetensors").exists():
        _refresh_template(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        write_tiny_model(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; use its copy
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="baton tiny-model", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="directory to write the model into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_tiny_model(args.dir, args.seed)
    print(f"wrote a random tiny Llama (its text is random) to {path}")
    return 0
