"""LoRA test helpers shared by every test folder that needs PEFT adapters: the adapter
writer, the transformers + PEFT reference and the prompts the engine tests compare on.

tests/engine/conftest.py puts this folder on `sys.path` (the project imports test modules
with `--import-mode=importlib`); tests in other folders insert it themselves.
"""

from __future__ import annotations

from pathlib import Path

import torch

from baton.engine import LoRARequest, SamplingParams

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_NEW = 16
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0)
PROMPTS = [[0, 17, 250, 33], [0] + list(range(40, 73)), [0, 400, 9], [0, 5, 6, 7, 8, 9, 10, 11, 12]]


def write_adapter(base: Path, out: Path, rank: int, targets: list[str], seed: int, rslora: bool = False,
                  std: float = 0.15) -> Path:
    """A PEFT LoRA adapter of `base` with random A and B (PEFT's init leaves B zero) of
    standard deviation `std`, saved as PEFT saves it; returns `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0, use_rslora=rslora)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    peft_model.save_pretrained(out)
    return out


def write_three_adapters(base: Path, root: Path) -> dict[str, Path]:
    """"a" rank 8 on q/v, "b" rank 16 on all seven, "c" rank 4 (rsLoRA) on o/gate/down."""
    return {
        "a": write_adapter(base, root / "a", 8, ["q_proj", "v_proj"], seed=1),
        "b": write_adapter(base, root / "b", 16, ALL, seed=2),
        "c": write_adapter(base, root / "c", 4, ["o_proj", "gate_proj", "down_proj"], seed=3, rslora=True),
    }


def lora_requests(paths: dict[str, Path]) -> dict[str, LoRARequest]:
    """One `LoRARequest` per adapter, ids 1, 2, ... in name order."""
    return {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(sorted(paths.items()))}


class PeftReference:
    """Greedy tokens and their logprobs from transformers + PEFT (one model per adapter)."""

    def __init__(self):
        self.models = {}

    def model(self, base: Path, adapter: Path | None):
        key = (base, adapter)
        if key not in self.models:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
            self.models[key] = PeftModel.from_pretrained(model, adapter).eval() if adapter else model
        return self.models[key]

    def greedy(self, base: Path, adapter: Path | None, prompt: list[int]) -> tuple[list[int], list[float]]:
        """MAX_NEW greedy tokens (no EOS stopping) and each one's logprob."""
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = self.model(base, adapter).generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                eos_token_id=None, pad_token_id=2, output_scores=True, return_dict_in_generate=True)
        tokens = out.sequences[0, len(prompt):].tolist()
        logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens)]
        return tokens, logprobs
