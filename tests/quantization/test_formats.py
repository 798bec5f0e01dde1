"""Every quantized checkpoint layout reads back to the weights it represents.

Checkpoints are written in each format (quant_checkpoints.py; compressed-tensors ones packed
by the compressed-tensors package), read through Baton's loader path into the model's fused
layers, and each layer's dequantized weight is compared with the dense weight the checkpoint
stands for (for compressed-tensors: that package's own decompression).
"""

from __future__ import annotations

import json

import pytest
import torch
from quant_checkpoints import (
    ct_group_fp8,
    ct_group_int4,
    linear_names,
    write_awq,
    write_ct,
    write_fp8,
    write_gptq,
)
from safetensors import safe_open

from baton.engine.models.registry import ModelRegistry
from baton.engine.quantization import (
    QuantizationConfigError,
    int4,
    parse_quantization,
    resolve_kv_cache_dtype,
)
from baton.engine.quantization import fp8 as fp8_mod
from baton.engine.quantization.linear import Fp8Linear, Int4Linear
from baton.engine.quantization.loading import load_weights, prepare_model


def read(path):
    """(model with quantized layers loaded, QuantConfig, KV scales) for a checkpoint dir."""
    config = json.loads((path / "config.json").read_text())
    quant = parse_quantization(config, None)
    with torch.device("meta"):
        model = ModelRegistry.resolve(config["architectures"][0])(config)
    prepare_model(model, quant)
    model = model.to_empty(device="cpu")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = [(k, f.get_tensor(k)) for k in f.keys()]
    kv = load_weights(model, quant, tensors)
    return model, quant, kv


def fused_dense(dense: dict, config: dict, layer: int) -> dict[str, torch.Tensor]:
    """The dense weights of layer `layer`'s fused modules."""
    p = f"model.layers.{layer}."
    w = {n: dense[p + n + ".weight"] for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                "mlp.down_proj")}
    return {
        "self_attn.qkv_proj": torch.cat([w["self_attn.q_proj"], w["self_attn.k_proj"], w["self_attn.v_proj"]]),
        "self_attn.o_proj": w["self_attn.o_proj"],
        "mlp.gate_up_proj": torch.cat([w["mlp.gate_proj"], w["mlp.up_proj"]]),
        "mlp.down_proj": w["mlp.down_proj"],
    }


def assert_layers_match(model, config, dense, kind):
    checked = 0
    for i in range(config["num_hidden_layers"]):
        for name, want in fused_dense(dense, config, i).items():
            layer = model.get_submodule(f"layers.{i}.{name}")
            assert isinstance(layer, kind), f"layers.{i}.{name} is {type(layer).__name__}"
            torch.testing.assert_close(layer.dequantize(), want.float(), rtol=0, atol=0)
            checked += 1
    assert checked == 4 * config["num_hidden_layers"]


# -- compressed-tensors -----------------------------------------------------------------


@pytest.mark.parametrize("weights,acts", [("tensor", "static"), ("channel", "token"), ("block", "group"),
                                          ("channel", None)])
def test_compressed_tensors_fp8_reads_back_what_compressed_tensors_decompresses(tmp_path, weights, acts):
    path, config, dense, _ = write_ct(tmp_path, ct_group_fp8(weights, acts), "float-quantized")
    model, quant, _ = read(path)
    assert quant.weights.strategy == weights
    assert (quant.activations is None) == (acts is None)
    assert_layers_match(model, config, dense, Fp8Linear)
    qkv = model.layers[0].self_attn.qkv_proj
    if acts == "static":  # one input scale for the fused layer: the largest of its shards'
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            shards = [f.get_tensor(f"model.layers.0.self_attn.{s}_proj.input_scale").float() for s in "qkv"]
        assert qkv.input_scale.item() == max(s.item() for s in shards)
    assert isinstance(model.lm_head, torch.nn.Linear)  # "ignore": ["lm_head"]


@pytest.mark.parametrize("group_size,symmetric", [(32, True), (64, False), (128, True), (None, True),
                                                  (128, False)])
def test_compressed_tensors_int4_reads_back_what_compressed_tensors_decompresses(tmp_path, group_size, symmetric):
    path, config, dense, packed = write_ct(tmp_path, ct_group_int4(group_size, symmetric), "pack-quantized")
    model, quant, _ = read(path)
    assert quant.weights.kind == "int4" and quant.weights.group_size == group_size
    assert_layers_match(model, config, dense, Int4Linear)
    # Real layout: [N, K/8] int32 words, [N, G] scales, [N/8, G] packed zero points.
    down = packed["model.layers.0.mlp.down_proj"]
    assert down["weight_packed"].shape == (128, 256 // 8) and down["weight_packed"].dtype == torch.int32
    assert down["weight_scale"].shape == (128, 256 // (group_size or 256))
    assert ("weight_zero_point" in down) == (not symmetric)


def test_compressed_tensors_int4_activation_order(tmp_path):
    group = ct_group_int4(64, True, actorder=True)
    path, config, dense, _ = write_ct(tmp_path, group, "pack-quantized")
    model, _, _ = read(path)
    layer = model.layers[0].mlp.down_proj
    assert layer.perm is not None
    # compressed-tensors' decompression ignores g_idx, so the reference here is the
    # definition: column i dequantizes with the scale of group g_idx[i].
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        t = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith("model.layers.0.mlp.down_proj.")}
    codes = int4.unpack_cols(t["weight_packed"]).float() - 8  # [N, K] signed
    want = codes * t["weight_scale"].float()[:, t["weight_g_idx"].long()]
    torch.testing.assert_close(layer.dequantize(), want, rtol=0, atol=0)


def test_our_packing_matches_compressed_tensors_packer():
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32,
        unpack_from_int32,
    )

    signed = torch.randint(-8, 8, (24, 64), dtype=torch.int8)
    theirs = pack_to_int32(signed, 4)
    assert torch.equal(int4.pack_cols(signed.to(torch.int32) + 8), theirs)
    assert torch.equal(int4.unpack_cols(theirs) - 8, signed.to(torch.int32))
    along_rows = pack_to_int32(signed, 4, packed_dim=0)
    assert torch.equal(int4.pack_rows(signed.to(torch.int32) + 8), along_rows)
    assert torch.equal(unpack_from_int32(along_rows, 4, torch.Size((24, 64)), packed_dim=0), signed)


def test_kv_cache_scales_are_read_per_tensor_and_per_head(tmp_path):
    for kv, shape in (("tensor", (1,)), ("head", (2,))):
        out = tmp_path / kv
        out.mkdir()
        path, config, _, _ = write_ct(out, ct_group_fp8("channel", "token"), "float-quantized", kv=kv)
        _, quant, scales = read(path)
        assert quant.kv_scales == kv
        assert sorted(scales) == [0, 1]
        assert scales[1]["k"].shape == shape and scales[1]["v"].shape == shape
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            assert torch.equal(scales[1]["v"], f.get_tensor("model.layers.1.self_attn.v_scale").float().reshape(-1))


# -- fp8, AWQ, GPTQ ---------------------------------------------------------------------


@pytest.mark.parametrize("static,block", [(False, False), (True, False), (False, True)])
def test_fp8_checkpoints_read_back(tmp_path, static, block):
    path, config, dense = write_fp8(tmp_path, static=static, block=block)
    model, quant, _ = read(path)
    assert quant.method == "fp8" and quant.weights.strategy == ("block" if block else "tensor")
    assert quant.activations.strategy == ("static" if static else "group" if block else "tensor")
    assert_layers_match(model, config, dense, Fp8Linear)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_awq_checkpoints_read_back(tmp_path, group_size):
    path, config, dense = write_awq(tmp_path, group_size)
    model, quant, _ = read(path)
    assert quant.method == "awq" and quant.weights.group_size == group_size
    assert_layers_match(model, config, dense, Int4Linear)
    with safe_open(str(path / "model.safetensors"), "pt") as f:  # AutoAWQ's shapes
        assert f.get_slice("model.layers.0.mlp.down_proj.qweight").get_shape() == [256, 128 // 8]
        assert f.get_slice("model.layers.0.mlp.down_proj.scales").get_shape() == [256 // group_size, 128]


@pytest.mark.parametrize("group_size,desc_act,sym", [(32, False, True), (64, True, True), (128, True, False),
                                                     (128, False, False)])
def test_gptq_checkpoints_read_back(tmp_path, group_size, desc_act, sym):
    path, config, dense = write_gptq(tmp_path, group_size, desc_act, sym)
    model, quant, _ = read(path)
    assert quant.method == "gptq" and quant.weights.zero_offset == 1
    assert_layers_match(model, config, dense, Int4Linear)
    assert (model.layers[0].mlp.down_proj.perm is not None) == desc_act


def test_gptq_shards_with_different_activation_orders_are_refused(tmp_path):
    path, config, dense = write_gptq(tmp_path, 64, desc_act=True, shared_order=False)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads((path / "config.json").read_text())
    with torch.device("meta"):
        model = ModelRegistry.resolve("LlamaForCausalLM")(config)
    quant = parse_quantization(config, None)
    prepare_model(model, quant)
    model = model.to_empty(device="cpu")
    with pytest.raises(ValueError, match="different activation orders"):
        load_weights(model, quant, tensors.items())


# -- layer arithmetic -------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["token", "tensor", "group"])
def test_fp8_activation_rounding_bounds_the_error(strategy):
    x = torch.randn(5, 256) * torch.logspace(-2, 2, 5)[:, None]
    q = fp8_mod.fake_quantize_activation(x, strategy, None, 128)
    # e4m3 keeps 3 mantissa bits: a relative error of at most 2^-4 for values near the scale's top.
    top = x.abs().amax() if strategy == "tensor" else x.abs().amax(dim=1, keepdim=True)
    big = x.abs() > top / 8
    assert ((q - x).abs()[big] <= x.abs()[big] * 2**-4 + 1e-6).all()
    assert not torch.equal(q, x)


def test_fp8_rounding_saturates_instead_of_overflowing():
    out = fp8_mod.to_fp8(torch.tensor([1000.0, -1000.0, 1.0]), torch.tensor(1.0))
    assert out.float().tolist() == [448.0, -448.0, 1.0]


def test_int4_linear_reference_is_the_dequantized_product():
    w = int4.Int4Weights(int4.pack_rows(torch.randint(0, 16, (64, 24))), torch.rand(2, 24) + 0.1,
                         torch.randint(0, 16, (2, 24)).float(), 32)
    layer = Int4Linear(64, 24, False, 32)
    layer.set_weights(w)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ w.dequantize().t())


# -- configuration ----------------------------------------------------------------------


def test_unquantized_checkpoints_and_online_fp8():
    assert parse_quantization({}, None) is None
    online = parse_quantization({}, "fp8")
    assert online.weights.packing == "online" and online.activations.strategy == "token"
    with pytest.raises(QuantizationConfigError, match="needs a checkpoint quantized with awq"):
        parse_quantization({}, "awq")
    with pytest.raises(QuantizationConfigError, match="not supported; choose one of"):
        parse_quantization({}, "bitsandbytes")


def test_a_method_that_differs_from_the_checkpoint_is_refused():
    cfg = {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}}
    assert parse_quantization(cfg, "awq").method == "awq"
    with pytest.raises(QuantizationConfigError, match="does not match the checkpoint, which is quantized with 'awq'"):
        parse_quantization(cfg, "gptq")


@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "only 4-bit"),
    ({"quant_method": "awq", "bits": 4, "group_size": 256}, "group_size must be"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "only the 'gemm' packing"),
    ({"quant_method": "bitsandbytes"}, "does not load"),
    ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
      "config_groups": {"g": {"targets": ["Linear"], "weights": {}}}}, "format 'nvfp4-pack-quantized'"),
])
def test_unsupported_layouts_are_refused_by_name(qc, match):
    with pytest.raises(QuantizationConfigError, match=match):
        parse_quantization({"quantization_config": qc}, None)


def test_kv_cache_dtypes():
    assert resolve_kv_cache_dtype("auto") == "auto"
    assert resolve_kv_cache_dtype("fp8_e4m3") == "fp8"
    with pytest.raises(QuantizationConfigError, match="e5m2 is not supported"):
        resolve_kv_cache_dtype("fp8_e5m2")


def test_checkpoint_missing_a_scale_names_the_tensor(tmp_path):
    path, config, _ = write_fp8(tmp_path)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = [(k, f.get_tensor(k)) for k in f.keys() if k != "model.layers.1.mlp.up_proj.weight_scale"]
    with torch.device("meta"):
        model = ModelRegistry.resolve("LlamaForCausalLM")(config)
    quant = parse_quantization(json.loads((path / "config.json").read_text()), None)
    prepare_model(model, quant)
    model = model.to_empty(device="cpu")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj: the FP8 checkpoint has no weight_scale"):
        load_weights(model, quant, tensors)


def test_linear_names_cover_every_projection():
    assert len(linear_names({"num_hidden_layers": 2})) == 14


def test_gptq_zero_biases_are_skipped_and_a_nonzero_one_is_refused(tmp_path):
    """AutoGPTQ saves a bias for every quantized layer, zeros where Llama has none."""
    from safetensors.torch import save_file

    path, config, dense = write_gptq(tmp_path, 128)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name in linear_names(config):
        tensors[name + ".bias"] = torch.zeros(tensors[name + ".scales"].shape[1], dtype=torch.float16)
    save_file(tensors, str(path / "model.safetensors"))
    model, _, _ = read(path)
    assert_layers_match(model, config, dense, Int4Linear)
    tensors["model.layers.1.mlp.up_proj.bias"][3] = 1.0
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="'model.layers.1.mlp.up_proj.bias' is a nonzero bias"):
        read(path)
