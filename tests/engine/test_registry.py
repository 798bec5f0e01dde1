"""The public model registry: architectures registered from user code run in the engine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from baton.engine import LLM, EngineArgs, ModelRegistry, SamplingParams
from baton.engine.models.registry import import_model_module

TOY = Path(__file__).resolve().parent / "toy_arch.py"
PROMPTS = [[0, 17, 250, 33], [0] + list(range(40, 80)), [0, 400]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def toy():
    """The user module, imported by path as a worker's --model-module is."""
    import_model_module(str(TOY))
    return sys.modules["toy_arch"]


@pytest.fixture(scope="module")
def toy_dir(toy, tiny_dir, tmp_path_factory) -> Path:
    return toy.write_toy_model(tmp_path_factory.mktemp("toy"), tiny_dir)


def _greedy(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)]


def test_registered_architecture_matches_its_plain_torch_computation(toy, toy_dir):
    # block_size 4 and a 16-token budget: chunked prefill and many blocks per sequence.
    llm = LLM(model=str(toy_dir), device="cpu", block_size=4, max_num_batched_tokens=16, num_gpu_blocks_override=64)
    assert type(llm.engine.runner.model).__name__ == "ToyGPTForCausalLM"
    assert _greedy(llm) == [toy.reference_greedy(toy_dir, p, GREEDY.max_tokens) for p in PROMPTS]


def test_from_engine_args_with_the_model_module_builds_the_same_engine(toy, toy_dir):
    args = EngineArgs(model=str(toy_dir), device="cpu", num_gpu_blocks_override=64, model_module=str(TOY))
    llm = LLM.from_engine_args(args)
    assert _greedy(llm) == [toy.reference_greedy(toy_dir, p, GREEDY.max_tokens) for p in PROMPTS]
    with pytest.raises(TypeError, match="EngineArgs"):
        LLM.from_engine_args({"model": str(toy_dir)})


def test_call_form_and_lazy_string_register_too(toy, toy_dir, tmp_path):
    ModelRegistry.register_model("ToyGPTCallForm", toy.ToyGPTForCausalLM)
    ModelRegistry.register_model("ToyGPTLazy", "toy_arch:ToyGPTForCausalLM")
    want = [toy.reference_greedy(toy_dir, p, GREEDY.max_tokens) for p in PROMPTS]
    for arch in ("ToyGPTCallForm", "ToyGPTLazy"):
        renamed = tmp_path / arch
        shutil.copytree(toy_dir, renamed)
        config = json.loads((renamed / "config.json").read_text())
        (renamed / "config.json").write_text(json.dumps({**config, "architectures": [arch]}))
        assert _greedy(LLM(model=str(renamed), device="cpu", num_gpu_blocks_override=64)) == want
    assert {"ToyGPTCallForm", "ToyGPTLazy", "LlamaForCausalLM"} <= set(ModelRegistry.get_supported_archs())


def test_bad_registrations_and_unknown_architectures_say_what_to_do(toy_dir, tmp_path):
    class NoLogits(nn.Module):
        def forward(self, *args): ...

    with pytest.raises(TypeError, match="compute_logits, load_weights, finish_loading"):
        ModelRegistry.register_model("Broken", NoLogits)
    with pytest.raises(ValueError, match="module:Class"):
        ModelRegistry.register_model("Broken", "no_colon")
    ModelRegistry.register_model("MissingModule", "no_such_module_xyz:Model")
    unknown = tmp_path / "unknown"
    shutil.copytree(toy_dir, unknown)
    for arch, message in (("NotRegisteredForCausalLM", "--model-module"), ("MissingModule", "cannot import")):
        (unknown / "config.json").write_text(json.dumps({**json.loads((toy_dir / "config.json").read_text()),
                                                          "architectures": [arch]}))
        with pytest.raises(ValueError, match=message):
            LLM(model=str(unknown), device="cpu", num_gpu_blocks_override=8)
    with pytest.raises(ValueError, match="no such file"):
        EngineArgs(model=str(toy_dir), model_module="missing/arch.py").create_engine_config()
    with pytest.raises(ValueError, match="no module named"):
        EngineArgs(model=str(toy_dir), model_module="no_such_module_xyz").create_engine_config()


def test_baton_generate_imports_the_model_module(toy, toy_dir):
    out = subprocess.run(
        [sys.executable, "-m", "baton.cli", "generate", "--model", str(toy_dir), "--model-module", str(TOY),
         "--device", "cpu", "--max-tokens", "5", "--json", "Hello"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["token_ids"]) == 5
    missing = subprocess.run(
        [sys.executable, "-m", "baton.cli", "generate", "--model", str(toy_dir), "--device", "cpu", "Hello"],
        capture_output=True, text=True, timeout=300,
    )
    assert missing.returncode == 2 and "'ToyGPTForCausalLM' is not supported" in missing.stderr


@pytest.mark.parametrize("arch", ["qwen3", "toy"])
def test_architectures_the_fast_path_does_not_know_keep_their_own_forward_on_cuda(arch, hf_models, toy, caplog):
    # apply_fast_path decides by class before it touches the device or imports a kernel.
    import torch

    from baton.engine.config import KernelConfig
    from baton.engine.fastpath import apply_fast_path

    config = json.loads((hf_models["qwen3"] / "config.json").read_text()) if arch == "qwen3" else toy.CONFIG
    model = ModelRegistry.resolve(config["architectures"][0])(config)
    with caplog.at_level("WARNING", logger="baton.engine.fastpath"):
        assert apply_fast_path(model, KernelConfig(), torch.device("cuda")) is model
    assert f"no form of {type(model).__name__}" in caplog.text
