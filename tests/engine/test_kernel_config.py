"""The kernel switches (`KernelConfig`): one typed config per engine, the environment as defaults,
and the table of which kernel computes each op (`ModelRunner.explain`, `baton generate --explain`)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import torch

from baton.engine.config import EngineArgs, KernelConfig


def test_the_environment_overrides_the_defaults_and_a_string_overrides_both(monkeypatch, tiny_dir):
    for name in ("BATON_PDL", "BATON_PREFETCH_MB", "BATON_ROPE_EPILOGUE", "BATON_SIDE_STREAM_INPUTS"):
        monkeypatch.delenv(name, raising=False)
    assert KernelConfig.from_env() == KernelConfig()
    monkeypatch.setenv("BATON_PDL", "0")
    monkeypatch.setenv("BATON_PREFETCH_MB", "4")
    monkeypatch.setenv("BATON_SIDE_STREAM_INPUTS", "1")
    assert KernelConfig.from_env() == KernelConfig(pdl=False, prefetch_mb=4.0, side_stream_inputs=True)
    got = KernelConfig.from_env("rope_epilogue=false, split-programs=640,pdl=on")
    assert got == KernelConfig(pdl=True, prefetch_mb=4.0, side_stream_inputs=True, rope_epilogue=False,
                               split_programs=640)
    # An engine given no config starts from the environment; one given a config takes it as it is.
    assert EngineArgs(model=str(tiny_dir), device="cpu").create_engine_config().kernels.prefetch_mb == 4.0
    explicit = KernelConfig(fuse_norms=False)
    assert EngineArgs(model=str(tiny_dir), device="cpu", kernel_config=explicit).create_engine_config().kernels \
        is explicit


@pytest.mark.parametrize("spec,message", [("nope=1", "is not NAME=VALUE"), ("pdl", "is not NAME=VALUE"),
                                          ("pdl=maybe", "is not a switch"), ("split_programs=lots", "is not a int")])
def test_a_bad_override_says_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        KernelConfig.from_env(spec)


def test_pdl_is_resolved_off_where_it_cannot_run():
    assert KernelConfig().for_device(torch.device("cpu")).pdl is False
    assert KernelConfig(pdl=False).for_device(torch.device("cpu")) == KernelConfig(pdl=False)


def tuned_fast_model(tiny_dir):
    """(FastLlama over the tiny model whose tuning "measured" the few-row kernel faster at
    16 rows and cuBLAS faster above, a Triton attention backend, the tuning, the switches)."""
    pytest.importorskip("triton")
    from baton.engine.attention.triton_backend import TritonAttention
    from baton.engine.fastpath.few_row import BUCKETS
    from baton.engine.fastpath.few_row_tuning import FewRowTuning
    from baton.engine.fastpath.llama import FastLlama
    from baton.engine.llm import LLM

    runner = LLM(model=str(tiny_dir), device="cpu", num_gpu_blocks_override=8).engine.runner
    args = runner.reference.args
    kernels = KernelConfig(pdl=False, rope_attention_max_pairs=8)  # 2 KV heads: rotary in attention up to batch 4
    tuning = FewRowTuning()
    fast, slow = {"cublas": 10.0, (32, 32, 4, 1): 5.0}, {"cublas": 1.0, (32, 32, 4, 1): 5.0}
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    shapes = [(q + 2 * kv, args.hidden_size), (q + 2 * kv, args.hidden_size, "rope"), (args.hidden_size, q),
              (2 * args.intermediate_size, args.hidden_size), (args.hidden_size, args.intermediate_size),
              (args.vocab_size, args.hidden_size)]
    for n, k, *form in shapes:
        for bucket in BUCKETS:  # the few-row kernel wins at 16 rows, cuBLAS (by more than the credit) above
            tuning.times[(n, k, bucket, torch.float32, *form)] = fast if bucket == 16 else slow
    model = FastLlama(runner.reference, kernels, tuning)
    backend = TritonAttention(args.num_heads, args.num_kv_heads, args.head_dim, 0.1, kernels=kernels)
    return model, backend, tuning, kernels


def test_the_fast_path_table_names_each_ops_kernel_per_batch_size(tiny_dir):
    """The choices `FastLlama.forward` makes, from one engine's tuning: the few-row kernel and
    its fused forms where the tuning measured it faster, cuBLAS and the separate kernels
    where not; the rotary in the attention kernel for few (sequence, KV head) pairs."""
    from baton.engine.fastpath import explain
    from baton.engine.fastpath.llama import FastLlama

    model, backend, tuning, kernels = tuned_fast_model(tiny_dir)
    text = explain(model, backend, [1, 2, 4, 8, 16, 32])
    table = parse(text)
    assert list(table) == ["decode, batch 1-4", "decode, batch 8", "decode, batch 16", "decode, batch 32",
                           "prefill (more than 64 tokens)"], text  # 8 and 16: other attention splits
    small, large = table["decode, batch 1-4"], table["decode, batch 32"]
    assert small["rotary + KV store"] == "in the attention kernel"
    assert small["Q/K/V"] == "few-row (32, 32, 4, 1)"
    assert small["input norm"].startswith("in the previous down_proj's epilogue")
    assert small["gate/up"] == "few-row (32, 32, 4, 1), SiLU * up in its epilogue"
    assert "post-attention norm" not in small  # in o_proj's epilogue
    assert table["decode, batch 8"]["rotary + KV store"] == "Triton rope_store"  # 16-dimension heads: no tile fits
    for op in ("Q/K/V", "o_proj", "gate/up", "down_proj", "lm_head"):
        assert large[op] == "cuBLAS", large
    assert large["input norm"] == large["post-attention norm"] == "Triton add_rms_norm"
    # Switches change the table: no fused norms, no rotary epilogue.
    off = FastLlama(model.reference, dataclasses.replace(kernels, fuse_norms=False), tuning)
    small = parse(explain(off, backend, [1]))["decode, batch 1"]
    assert small["input norm"] == small["post-attention norm"] == "Triton add_rms_norm"
    assert small["o_proj"] == "few-row (32, 32, 4, 1)"


def test_a_steps_forms_are_decided_once_per_row_count(tiny_dir, monkeypatch):
    """A step's plan is made once per (row count, rotary in attention) and every larger step
    shares one; each product's few-row configuration is looked up once per form and row
    count, not once per layer and step (an eager step's host time is what it waits on)."""
    from baton.engine.fastpath.few_row_tuning import FewRowTuning
    from baton.engine.fastpath.llama import StepPlan

    model, _, tuning, _ = tuned_fast_model(tiny_dir)
    looked_up = []
    best = FewRowTuning._best
    def counted(self, weight, rows, kernels, form, head_dim):
        looked_up.append((tuple(weight.shape), rows, form, head_dim))
        return best(self, weight, rows, kernels, form, head_dim)

    monkeypatch.setattr(FewRowTuning, "_best", counted)
    plan = model.plan(8, False)
    assert plan == StepPlan(fuse_input_norm=True, fuse_post_norm=True, silu=True, rope="kernel")  # 16-dim heads
    asked = len(looked_up)
    assert asked and len(set(looked_up)) == asked  # two layers: each question answered once
    assert model.plan(8, False) is plan and model.plan(8, True).rope == "attention" and len(looked_up) == asked
    assert model.plan(65, False) is model.plan(4096, False)
    assert model.plan(4096, False) == StepPlan(False, False, False, "kernel")
    model.tune()  # (on the CPU it times nothing) a tuning starts the plans afresh
    assert model.plan(8, False) is not plan and model.plan(8, False) == plan


def parse(text: str) -> dict[str, dict[str, str]]:
    """`explain`'s text -> {block title: {op: kernel}}."""
    table: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if not line.startswith(" "):
            table[line.rstrip(":")] = block = {}
        else:
            op, text = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            block[op] = text
    return table


def test_baton_generate_explain_prints_the_table_on_the_cpu(tiny_dir):
    proc = subprocess.run([sys.executable, "-m", "baton.cli", "generate", "--explain", "--device", "cpu",
                           "--model", str(tiny_dir)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "the torch reference (LlamaForCausalLM), no fast path" in proc.stdout


def test_two_engines_keep_their_own_tuning_and_attention_counters(tiny_dir):
    """Nothing the fast path measures or keeps is the process's: each application of it has
    its own tuning results, each Triton backend its own merge counters and switches."""
    pytest.importorskip("triton")
    from baton.engine.attention.triton_backend import TritonAttention
    from baton.engine.fastpath import apply_fast_path
    from baton.engine.llm import LLM

    reference = LLM(model=str(tiny_dir), device="cpu", num_gpu_blocks_override=8).engine.runner.reference
    cuda = torch.device("cuda")  # building the fast model touches no device
    one = apply_fast_path(reference, KernelConfig(pdl=False), cuda)
    two = apply_fast_path(reference, KernelConfig(pdl=False, use_swap=False), cuda)
    assert one.tuning is not two.tuning
    weight = one.layers[0].qkv_proj.weight
    one.tuning.times[(*weight.shape, 16, weight.dtype)] = {"cublas": 9.0, (16, 32, 4, 1): 1.0}
    assert one.layers[0].qkv_proj.kernel(8) == "few-row (16, 32, 4, 1)"
    assert two.layers[0].qkv_proj.kernel(8) == "cuBLAS"  # not tuned: its own results are empty
    assert one.layers[0].qkv_proj.weight is reference.layers[0].self_attn.qkv_proj.weight  # shared, not copied
    assert apply_fast_path(reference, KernelConfig(fused_kernels=False), cuda) is reference
    assert apply_fast_path(reference, KernelConfig(), torch.device("cpu")) is reference
    a = TritonAttention(4, 2, 16, 0.25, kernels=KernelConfig(pdl=False))
    b = TritonAttention(4, 2, 16, 0.25, kernels=KernelConfig(pdl=False, merge_in_splits=False))
    assert a._split_counts is not None and b._split_counts is None
    assert "merged in the last" in a.decode_kernel(1) and "merge kernel" in b.decode_kernel(1)
