"""A custom architecture registered from user code, served by a colocated worker behind the
router (`baton up --model-module`) and read through the official openai client."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from serving_harness import baton_up

from baton.tokenizer import Tokenizer

TOY = Path(__file__).resolve().parents[1] / "engine" / "toy_arch.py"


def _toy_module():
    spec = importlib.util.spec_from_file_location("toy_arch_serving", TOY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_openai_client_gets_the_custom_architectures_greedy_tokens(tiny_model_dir, tmp_path):
    toy = _toy_module()
    model_dir = toy.write_toy_model(tmp_path / "toy-gpt", tiny_model_dir)
    prompt = [0, 17, 250, 33, 90]
    want = toy.reference_greedy(model_dir, prompt, 8)
    dep = baton_up("--mode", "colocated", "--model", str(model_dir), "--model-module", str(TOY))
    dep.model = "toy-gpt"
    try:
        client = dep.client()
        assert [m.id for m in client.models.list().data] == ["toy-gpt"]
        out = client.completions.create(model="toy-gpt", prompt=prompt, max_tokens=8, temperature=0,
                                        logprobs=0, extra_body={"ignore_eos": True})
        tok = Tokenizer(model_dir)
        assert out.choices[0].logprobs.tokens == [tok.decode([t], skip_special_tokens=False) for t in want]
        assert out.usage.completion_tokens == 8
    finally:
        dep.stop()
