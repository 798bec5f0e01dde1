"""The quantized products' Triton kernels on the CPU, through Triton's interpreter.

Run by test_kernels_interpreted.py (with interpreted_kernels.py) in a child process with `TRITON_INTERPRET=1` (read when
triton is first imported). The interpreter's bf16 products are wrong, so activations here
are float32 and float16; bf16 runs in the `gpu` tests (test_quant_kernels.py).
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through test_kernels_interpreted.py (needs TRITON_INTERPRET=1)", allow_module_level=True)

from quant_layers import fp8_layer, int4_layer, rel_err  # noqa: E402

from baton.engine.quantization import fp8, kernels  # noqa: E402

DTYPES = [torch.float32, torch.float16]


def quantized_input(layer, x):
    """x rounded to e4m3 by the torch reference (see test_fp8_row_quantizer)."""
    if layer.act.strategy in ("static", "tensor"):
        return kernels.quantize_fp8(x, layer.act.strategy, layer.input_scale)  # torch on every device
    q, s = fp8.quantize_dynamic(x, layer.act.strategy, 128)
    return q, s.reshape(x.shape[0], -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("act", ["token", "static", "tensor"])
def test_fp8_product_matches_the_reference(dtype, rows, act):
    layer = fp8_layer(48, 160, act, bias=rows == 5)
    x = torch.randn(rows, 160).to(dtype)
    want = layer.reference(x)
    got = kernels.fp8_matmul(layer, *quantized_input(layer, x), dtype)
    assert got.dtype == dtype and got.shape == (rows, 48)
    assert rel_err(got, want) < 1e-3
    if act != "token":  # the whole layer: its quantizer is torch code, exact here
        assert rel_err(kernels.fp8_linear(layer, x), want) < 1e-3


@pytest.mark.parametrize("rows", [1, 17])
def test_fp8_block_scaled_product_matches_the_reference(rows):
    layer = fp8_layer(256, 256, "group", block=(128, 128), seed=1)
    x = torch.randn(rows, 256) * torch.linspace(0.1, 10, 256)  # groups with different ranges
    got = kernels.fp8_matmul(layer, *quantized_input(layer, x), torch.float32)
    assert rel_err(got, layer.reference(x)) < 1e-3


def test_fp8_row_quantizer():
    """Scales exactly; codes within one e4m3 step: the interpreter's own float-to-e4m3 cast
    rounds some values near a power of two down a binade (-31.3 -> -16), which a GPU does
    not; the `gpu` tests compare the codes exactly."""
    x = torch.randn(7, 256) * torch.logspace(-3, 1, 7)[:, None]
    for strategy in ("token", "group"):
        q, scale = kernels.quantize_fp8(x, strategy, group_size=128)
        want_q, want_scale = fp8.quantize_dynamic(x, strategy, 128)
        torch.testing.assert_close(scale.reshape(want_scale.shape), want_scale)
        same = q.float() == want_q.float()
        assert same.float().mean() > 0.9
        assert ((q.float() - want_q.float()).abs() <= want_q.float().abs() / 2 + 2**-9)[~same].all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 6, 70])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_product_matches_the_reference(dtype, rows, group):
    layer = int4_layer(40, 256, group, bias=rows == 6)
    x = torch.randn(rows, 256).to(dtype)
    want = torch.nn.functional.linear(x.double(), layer.dequantize().double(),
                                      None if layer.bias is None else layer.bias.double())
    got = kernels.int4_linear(layer, x)
    assert got.dtype == dtype
    assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 3e-3)


@pytest.mark.parametrize("act_order", [False, True])
def test_int4_dequantize_is_the_weight_in_grouped_order(act_order):
    """Many-row products multiply by this: the reference's dense weight, rows permuted as the
    kernels read x (`perm`), rounded to the activation dtype."""
    layer = int4_layer(48, 128, 32, act_order=act_order, seed=4)
    want = layer.dequantize().t()
    if layer.perm is not None:
        want = want[layer.perm]
    torch.testing.assert_close(kernels.dequantize_int4(layer, torch.float32), want)


@pytest.mark.parametrize("rows", [3, 70])
def test_int4_product_with_activation_order(rows):
    layer = int4_layer(32, 128, 32, act_order=True, seed=3)
    x = torch.randn(rows, 128)
    want = x.double() @ layer.dequantize().double().t()
    assert rel_err(kernels.int4_linear(layer, x), want) < 1e-5


def test_use_kernels_sets_every_quantized_layer():
    model = torch.nn.Sequential(fp8_layer(16, 32, "token"), int4_layer(32, 64, 32), torch.nn.Linear(4, 4))
    assert kernels.use_kernels(model) == 2
    assert model[0].kernel is kernels.fp8_linear and model[1].kernel is kernels.int4_linear


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_the_fast_path_runs_a_quantized_model_as_the_reference_does(tmp_path, kv_cache_dtype):
    """FastLlama over a GPTQ (act-order) checkpoint: its quantized layers become
    `QuantProjection`s running the int4 kernel, and with an FP8 KV cache its attention goes
    through the reference's scaled store; greedy text equals the reference engine's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "quantization"))
    from quant_checkpoints import write_gptq

    from baton.engine import LLM, SamplingParams
    from baton.engine.config import KernelConfig
    from baton.engine.fastpath.few_row_tuning import FewRowTuning
    from baton.engine.fastpath.llama import FastLlama
    from baton.engine.quantization.projection import QuantProjection

    qdir = write_gptq(tmp_path, 64, desc_act=True)[0]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = ["The quick brown fox", "One, two, three,"]

    def generate(fast: bool):
        llm = LLM(model=str(qdir), device="cpu", num_gpu_blocks_override=64, block_size=8,
                  kv_cache_dtype=kv_cache_dtype)
        runner = llm.engine.runner
        if fast:
            runner.model = FastLlama(runner.reference, KernelConfig(pdl=False), FewRowTuning())
            layer = runner.model.layers[0]
            assert isinstance(layer.down_proj, QuantProjection)
            assert (layer.fp8_kv_attention is not None) == (kv_cache_dtype == "fp8")
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    assert generate(True) == generate(False)


def fp8_input(strategy: str):
    from baton.engine.quantization.fused import Fp8Input

    return Fp8Input(strategy, torch.tensor([0.02]) if strategy == "static" else None)


def assert_same_e4m3(got, want_q, want_scales):
    """The fused kernel against the two kernels it replaces: scales exactly; codes exactly
    where both went through Triton's cast (per token), within one e4m3 step against the
    torch cast of the static quantizer (see test_fp8_row_quantizer)."""
    torch.testing.assert_close(got.scales, want_scales.reshape(got.scales.shape), rtol=0, atol=0)
    q, want = got.q.float(), want_q.float()
    same = q == want
    assert same.float().mean() > 0.9
    assert ((q - want).abs() <= want.abs() / 2 + 2**-9)[~same].all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strategy", ["token", "static"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_with_the_fp8_quantizer_equals_the_norm_then_the_quantizer(dtype, strategy, with_residual):
    from baton.engine.fastpath import triton_ops
    from baton.engine.quantization.fused import add_rms_norm_fp8

    x = (torch.randn(5, 96) * torch.logspace(-2, 1, 5)[:, None]).to(dtype)
    residual = torch.randn(5, 96).to(dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(96)).to(dtype)
    quant = fp8_input(strategy)
    want_residual = None if residual is None else residual.clone()
    normed = triton_ops.add_rms_norm(x, want_residual, weight, 1e-5)
    want = kernels.quantize_fp8(normed, strategy, quant.scale)
    got = add_rms_norm_fp8(x, residual, weight, 1e-5, quant)
    assert got.q.dtype == fp8.FP8 and got.dtype == dtype
    assert_same_e4m3(got, *want)
    if with_residual:
        assert torch.equal(residual, want_residual)  # the sum, written as add_rms_norm writes it


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strategy", ["token", "static"])
def test_silu_mul_with_the_fp8_quantizer_equals_silu_mul_then_the_quantizer(dtype, strategy):
    """Rows longer than a chunk (176 columns in chunks of 64: the absolute maximum over all)."""
    from baton.engine.fastpath import triton_ops
    from baton.engine.quantization.fused import silu_mul_fp8

    gate_up = (torch.randn(3, 352) * 3).to(dtype)
    gate_up[1, 300] = 40  # the row's maximum in its last, partial chunk
    quant = fp8_input(strategy)
    want = kernels.quantize_fp8(triton_ops.silu_mul(gate_up), strategy, quant.scale)
    got = silu_mul_fp8(gate_up, quant, block=64)
    assert_same_e4m3(got, *want)


def fast_fp8_runner(monkeypatch, static: bool, tmp_path):
    """(an engine's runner on FP8 weights, per-token (`quantization="fp8"` at load) or with
    an `fp8` checkpoint's static input scales; a function giving its FastLlama with the
    fused quantizers on or off; the names of the fused kernels called, in order)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "quantization"))
    from quant_checkpoints import write_fp8

    from baton.engine import LLM
    from baton.engine.config import KernelConfig
    from baton.engine.fastpath import llama as fast_llama
    from baton.engine.fastpath.few_row_tuning import FewRowTuning
    from baton.engine.tiny_model import ensure_tiny_model

    qdir = write_fp8(tmp_path, static=True)[0] if static else ensure_tiny_model()
    fused = []
    for name in ("add_rms_norm_fp8", "silu_mul_fp8"):
        kernel = getattr(fast_llama, name)
        monkeypatch.setattr(fast_llama, name, lambda *a, kernel=kernel, name=name, **k: fused.append(name) or
                            kernel(*a, **k))
    llm = LLM(model=str(qdir), device="cpu", dtype="float32", num_gpu_blocks_override=64, block_size=8,
              quantization=None if static else "fp8")

    def fast(fuse: bool):
        model = fast_llama.FastLlama(llm.engine.runner.reference, KernelConfig(pdl=False, fuse_fp8_quant=fuse),
                                     FewRowTuning())
        assert model.plan(16, False) == fast_llama.StepPlan(False, False, False, "kernel", fuse, fuse, fuse)
        return model

    return llm, fast, fused


def test_the_fast_path_quantizes_fp8_inputs_in_the_norm_and_silu_kernels(tmp_path, monkeypatch):
    """Per-token activation scales: every FP8 product's input comes quantized out of the
    norm or SiLU * up kernel before it, and the greedy text is the text of the same model
    with those quantizers in kernels of their own (the same codes: both are Triton's)."""
    from baton.engine import SamplingParams

    llm, fast, fused = fast_fp8_runner(monkeypatch, False, tmp_path)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompts = ["The quick brown fox", "One, two, three,"]
    tokens = {}
    for fuse in (False, True):
        llm.engine.runner.model = fast(fuse)
        tokens[fuse] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert bool(fused) == fuse
    assert tokens[True] == tokens[False]
    # per step and layer: the input norm, the post-attention norm, SiLU * up
    assert fused.count("add_rms_norm_fp8") == 2 * fused.count("silu_mul_fp8") > 0
    from baton.engine.fastpath import explain

    table = explain(fast(True), llm.engine.runner.backend, [1])
    for op, consumer in (("input norm", "Q/K/V"), ("post-attention norm", "gate/up"), ("SiLU * up", "down_proj")):
        assert f"{op}  " in table and f"e4m3 quantizer of {consumer}'s input in it" in table, table


def test_the_fast_path_quantizes_static_fp8_inputs_in_the_norm_and_silu_kernels(tmp_path, monkeypatch):
    """Static input scales: the fused kernels run in every layer of every step and quantize
    with the checkpoint's scales. (Against the unfused path, whose static quantizer is torch
    code, only the `gpu` test compares text: the interpreter's e4m3 cast halves values just
    below a power of two that torch's rounds up, see test_fp8_row_quantizer.)"""
    from baton.engine import SamplingParams
    from baton.engine.quantization import fused as fused_ops
    from baton.engine.quantization.projection import QuantProjection

    llm, fast, fused = fast_fp8_runner(monkeypatch, True, tmp_path)
    llm.engine.runner.model = model = fast(True)
    scales = []
    forward = QuantProjection.forward

    def counted(self, x):
        if isinstance(x, fused_ops.Fp8Rows):
            scales.append(torch.equal(x.scales.reshape(()), self.layer.input_scale.float().reshape(())))
        return forward(self, x)

    monkeypatch.setattr(QuantProjection, "forward", counted)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    out = llm.generate(["The quick brown fox"], params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 3
    steps = fused.count("silu_mul_fp8") // len(model.layers)
    assert steps == 3 and fused.count("add_rms_norm_fp8") == 2 * steps * len(model.layers)
    assert len(scales) == 3 * steps * len(model.layers) and all(scales)  # Q/K/V, gate/up, down
