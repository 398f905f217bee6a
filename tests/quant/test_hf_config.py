"""Parsing ``quantization_config`` into ``WeightQuantSpec``: accepted configs and one rejection per field."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from asyncllm.quant.hf_config import (
    WeightQuantSpec,
    WeightScheme,
    parse_quantization_config,
    quant_spec_from_hf_config,
)

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
       "modules_to_not_convert": ["visual"], "backend": "autoawq"}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
        "damp_percent": 0.01, "static_groups": False, "true_sequential": True, "checkpoint_format": "gptq",
        "model_name_or_path": None, "model_file_base_name": None}
CT = {
    "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"], "input_activations": None, "output_activations": None, "format": None,
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128,
                    "dynamic": False, "actorder": None, "observer": "minmax", "block_structure": None}}},
    "ignore": ["lm_head", "re:.*mlp.gate$"], "kv_cache_scheme": None, "sparsity_config": {},
    "transform_config": {}, "global_compression_ratio": None, "version": "0.9.0",
}


def _with(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    config = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[last] = value
    return config


def test_awq() -> None:
    spec = parse_quantization_config(AWQ)
    assert spec == WeightQuantSpec("awq", 4, 128, symmetric=False, desc_act=False, storage="gemm",
                                   dense_modules=("visual",))
    assert spec.is_quantized("model.layers.0.self_attn.q_proj")
    assert not spec.is_quantized("lm_head")
    assert not spec.is_quantized("visual.blocks.0.attn.qkv")
    assert spec.group_size_for(4096) == 128


def test_autoawq_quant_config_names() -> None:
    spec = parse_quantization_config({"quant_method": "AWQ", "w_bit": 4, "q_group_size": 64, "zero_point": True,
                                      "version": "GEMM", "modules_to_not_convert": None})
    assert (spec.bits, spec.group_size, spec.storage, spec.dense_modules) == (4, 64, "gemm", ())


def test_gptq() -> None:
    spec = parse_quantization_config(GPTQ)
    assert spec == WeightQuantSpec("gptq", 4, 128, symmetric=True, desc_act=False, storage="gptq")
    assert spec.is_quantized("model.layers.3.mlp.down_proj") and not spec.is_quantized("lm_head")
    v2 = parse_quantization_config({**GPTQ, "bits": 8, "group_size": -1, "desc_act": True, "sym": False,
                                    "checkpoint_format": "gptq_v2", "lm_head": True, "pack_dtype": "int32"})
    assert (v2.bits, v2.group_size, v2.desc_act, v2.symmetric, v2.storage) == (8, None, True, False, "gptq_v2")
    assert v2.is_quantized("lm_head") and v2.group_size_for(512) == 512


def test_gptq_modules_in_block() -> None:
    spec = parse_quantization_config({**GPTQ, "modules_in_block_to_quantize": [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.down_proj"]]})
    assert spec.is_quantized("model.layers.0.self_attn.k_proj")
    assert not spec.is_quantized("model.layers.0.self_attn.o_proj")
    assert not spec.is_quantized("model.layers.0.mlp.up_proj")


def test_compressed_tensors() -> None:
    spec = parse_quantization_config(CT)
    assert spec == WeightQuantSpec("compressed-tensors", 4, 128, symmetric=True, desc_act=False,
                                   storage="pack-quantized", dense_modules=("lm_head", "re:.*mlp.gate$"),
                                   targets=("Linear",))
    assert spec.is_quantized("model.layers.0.mlp.down_proj")
    assert not spec.is_quantized("lm_head")
    assert not spec.is_quantized("model.layers.0.mlp.gate")
    assert spec.is_quantized("model.layers.0.mlp.gate_proj")


def test_compressed_tensors_variants() -> None:
    channel = _with(CT, "config_groups.group_0.weights", {"num_bits": 8, "type": "int", "symmetric": False,
                                                           "strategy": "channel", "group_size": None,
                                                           "actorder": "group"})
    spec = parse_quantization_config({**channel, "ignore": [], "format": "naive-quantized"})
    assert (spec.bits, spec.group_size, spec.symmetric, spec.desc_act, spec.storage) == (
        8, None, False, True, "naive-quantized")
    assert spec.is_quantized("lm_head") and spec.quantize_lm_head
    inferred = _with(CT, "config_groups.group_0.weights.strategy", None)
    assert parse_quantization_config(inferred).group_size == 128
    named = _with(CT, "config_groups.group_0.targets", ["re:.*self_attn.*"])
    named_spec = parse_quantization_config(named)
    assert named_spec.is_quantized("model.layers.0.self_attn.o_proj")
    assert not named_spec.is_quantized("model.layers.0.mlp.up_proj")
    mixed = _with(CT, "format", "mixed-precision")
    mixed = _with(mixed, "config_groups.group_0.format", "pack-quantized")
    assert parse_quantization_config(mixed).storage == "pack-quantized"
    weight_order = _with(CT, "config_groups.group_0.weights.actorder", "weight")
    assert not parse_quantization_config(weight_order).desc_act


def test_package_dump_is_accepted() -> None:
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    from ._ct import scheme

    dump = QuantizationConfig(config_groups={"group_0": scheme(4, 32, symmetric=False)}, format="pack-quantized",
                              quantization_status="compressed", ignore=["lm_head"]).model_dump()
    spec = parse_quantization_config(dump)
    assert (spec.method, spec.bits, spec.group_size, spec.symmetric) == ("compressed-tensors", 4, 32, False)


def test_from_hf_config() -> None:
    assert quant_spec_from_hf_config({"hidden_size": 8}) is None
    assert quant_spec_from_hf_config({"quantization_config": AWQ}) == parse_quantization_config(AWQ)
    with pytest.raises(ValueError, match="quantization_config"):
        quant_spec_from_hf_config({"quantization_config": "awq"})


REJECTIONS = [
    ({"quant_method": "bitsandbytes"}, "quant_method"),
    ({"bits": 4}, "quant_method"),
    (_with(AWQ, "version", "gemv"), "version"),
    (_with(AWQ, "version", "exllama"), "version"),
    (_with(AWQ, "bits", 8), "bits"),
    (_with(AWQ, "group_size", 100), "group_size"),
    (_with(AWQ, "backend", "llm-awq"), "backend"),
    (_with(AWQ, "zero_point", "yes"), "zero_point"),
    (_with(AWQ, "modules_to_not_convert", "lm_head"), "modules_to_not_convert"),
    (_with(GPTQ, "bits", 3), "bits"),
    (_with(GPTQ, "bits", 2), "bits"),
    (_with(GPTQ, "group_size", 0), "group_size"),
    (_with(GPTQ, "checkpoint_format", "marlin"), "checkpoint_format"),
    (_with(GPTQ, "checkpoint_format", "bitblas"), "checkpoint_format"),
    (_with(GPTQ, "is_marlin_format", True), "is_marlin_format"),
    (_with(GPTQ, "pack_dtype", "int16"), "pack_dtype"),
    (_with(GPTQ, "dynamic", {"-:.*down_proj": {}}), "dynamic"),
    (_with(GPTQ, "desc_act", 1), "desc_act"),
    (_with(GPTQ, "method", "qqq"), "method"),
    (_with(CT, "format", "float-quantized"), "format"),
    (_with(CT, "format", "marlin-24"), "format"),
    (_with(CT, "config_groups", {}), "config_groups"),
    (_with(CT, "config_groups.group_0", ["Linear"]), "config_groups.group_0"),
    (_with(CT, "config_groups.group_0.weights.num_bits", 2), "num_bits"),
    (_with(CT, "config_groups.group_0.weights.type", "float"), "type"),
    (_with(CT, "config_groups.group_0.weights.strategy", "tensor"), "strategy"),
    (_with(CT, "config_groups.group_0.weights.strategy", "block"), "strategy"),
    (_with(CT, "config_groups.group_0.weights.group_size", 24), "group_size"),
    (_with(CT, "config_groups.group_0.weights.dynamic", True), "dynamic"),
    (_with(CT, "config_groups.group_0.weights.actorder", "sideways"), "actorder"),
    (_with(CT, "config_groups.group_0.weights", None), "weights"),
    (_with(CT, "config_groups.group_0.input_activations",
           {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}), "input_activations"),
    (_with(CT, "config_groups.group_0.output_activations", {"num_bits": 8}), "output_activations"),
    (_with(CT, "config_groups.group_0.format", "nvfp4-pack-quantized"), "config_groups.group_0.format"),
    (_with(CT, "kv_cache_scheme", {"num_bits": 8, "type": "float"}), "kv_cache_scheme"),
    (_with(CT, "sparsity_config", {"format": "sparse-24-bitmask"}), "sparsity_config"),
    (_with(CT, "transform_config", {"config_groups": {"u": {}}}), "transform_config"),
    (_with(CT, "ignore", "lm_head"), "ignore"),
    (_with(CT, "config_groups.group_0.targets", []), "targets"),
]


@pytest.mark.parametrize(("config", "field"), REJECTIONS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(REJECTIONS)])
def test_rejections_name_the_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"quantization_config\.[\w.]*{field}"):
        parse_quantization_config(config)


def test_one_target_in_groups_with_different_settings_is_rejected() -> None:
    two = _with(CT, "config_groups.group_1", copy.deepcopy(CT["config_groups"]["group_0"]))
    assert parse_quantization_config(two).targets == ("Linear", "Linear")
    assert parse_quantization_config(two).groups == ()  # same settings: one scheme
    two = _with(two, "config_groups.group_1.weights.num_bits", 8)
    with pytest.raises(ValueError, match=r"config_groups\.group_1\.targets.*group_0"):
        parse_quantization_config(two)


def _mixed() -> dict[str, Any]:
    """Three groups: attention 4-bit groups of 64, ``down_proj`` 8-bit groups of 128 asymmetric, and every
    other linear channel-wise 4-bit."""
    config = _with(CT, "config_groups.group_0.targets", ["re:.*self_attn\\.(q|k|v|o)_proj$"])
    config = _with(config, "config_groups.group_0.weights.group_size", 64)
    down = copy.deepcopy(CT["config_groups"]["group_0"])
    down["targets"] = ["re:.*down_proj$"]
    down["weights"].update(num_bits=8, symmetric=False)
    rest = copy.deepcopy(CT["config_groups"]["group_0"])
    rest["targets"] = ["Linear"]
    rest["weights"].update(strategy="channel", group_size=None)
    config = _with(config, "config_groups.group_1", down)
    return _with(config, "config_groups.group_2", rest)


def test_groups_with_different_settings() -> None:
    spec = parse_quantization_config(_mixed())
    assert [g.name for g in spec.groups] == ["group_0", "group_1", "group_2"]
    attention = WeightScheme(4, 64, symmetric=True, desc_act=False, storage="pack-quantized")
    down = WeightScheme(8, 128, symmetric=False, desc_act=False, storage="pack-quantized")
    rest = WeightScheme(4, None, symmetric=True, desc_act=False, storage="pack-quantized")
    assert spec.schemes == (attention, down, rest)
    assert spec.scheme_for("model.layers.0.self_attn.k_proj") == attention
    assert spec.scheme_for("model.layers.7.mlp.down_proj") == down
    assert spec.scheme_for("model.layers.7.mlp.up_proj") == rest  # the class target, after the name ones
    assert spec.scheme_for("lm_head") is None and spec.scheme_for("model.layers.0.mlp.gate") is None
    assert spec.group_size_for(576, "model.layers.0.self_attn.q_proj") == 64
    assert spec.group_size_for(576, "model.layers.0.mlp.gate_proj") == 576
    with pytest.raises(ValueError, match="prefix"):
        spec.group_size_for(576)
    single = parse_quantization_config(CT)
    assert single.scheme_for("model.layers.0.mlp.up_proj") == single.scheme and single.group_size_for(256) == 128


def test_name_targets_of_groups_with_different_settings_are_ambiguous() -> None:
    config = _with(_mixed(), "config_groups.group_1.targets", ["re:.*down_proj$", "re:.*layers\\.0\\..*"])
    spec = parse_quantization_config(config)
    assert spec.scheme_for("model.layers.1.self_attn.q_proj") == spec.groups[0].scheme
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*group_0.*group_1"):
        spec.scheme_for("model.layers.0.self_attn.q_proj")
