"""``codes_stream``: parts in any order, pass-through of everything else, and errors for bad streams."""

from __future__ import annotations

import random

import pytest
import torch

from asyncllm.quant.codes_stream import CANONICAL_SUFFIXES, codes_stream, module_parts
from asyncllm.quant.hf_config import WeightQuantSpec, parse_quantization_config

from ._packers import act_order_g_idx, pack_awq, pack_gptq

AWQ_SPEC = parse_quantization_config({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"})
PREFIXES = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")]


def _gptq_spec(desc_act: bool) -> WeightQuantSpec:
    return parse_quantization_config({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": desc_act,
                                      "sym": False})


def _codes(seed: int, n: int = 32, k: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 16, (n, k), generator=gen), torch.randint(1, 16, (n, k // 32), generator=gen),
            (torch.rand(n, k // 32, generator=gen) * 0.1 + 1e-3).half())


def _awq_stream() -> list[tuple[str, torch.Tensor]]:
    named: list[tuple[str, torch.Tensor]] = [("model.embed_tokens.weight", torch.randn(8, 4))]
    for i, prefix in enumerate(PREFIXES):
        named += [(f"{prefix}.{part}", tensor) for part, tensor in pack_awq(*_codes(i)).items()]
        named.append((f"{prefix}.bias", torch.randn(32)))
    named += [("model.norm.weight", torch.ones(4)), ("lm_head.weight", torch.randn(8, 4))]
    return named


def test_in_order_and_shuffled_give_the_same_tensors() -> None:
    named = _awq_stream()
    ordered = list(codes_stream(AWQ_SPEC, named))
    shuffled = named[:]
    random.Random(0).shuffle(shuffled)
    again = dict(codes_stream(AWQ_SPEC, shuffled))
    assert [name for name, _ in ordered][:5] == ["model.embed_tokens.weight"] + [
        f"{PREFIXES[0]}.{s}" for s in CANONICAL_SUFFIXES[:4]]
    assert set(again) == {name for name, _ in ordered}
    for name, tensor in ordered:
        assert torch.equal(again[name], tensor), name
    for prefix in PREFIXES:
        names = {name for name, _ in ordered if name.startswith(prefix + ".")}
        assert names == {f"{prefix}.codes", f"{prefix}.code_scales", f"{prefix}.code_zeros", f"{prefix}.code_mins",
                         f"{prefix}.bias"}
    first = dict(ordered)
    assert first[f"{PREFIXES[0]}.codes"].dtype == torch.uint8
    assert first[f"{PREFIXES[0]}.code_scales"].dtype == torch.float32
    assert first["lm_head.weight"] is dict(named)["lm_head.weight"]


def test_emits_as_soon_as_a_module_is_complete() -> None:
    named = _awq_stream()
    consumed: list[str] = []

    def source():
        for name, tensor in named:
            consumed.append(name)
            yield name, tensor

    stream = codes_stream(AWQ_SPEC, source())
    for name, _ in stream:
        if name == f"{PREFIXES[0]}.codes":
            assert consumed[-1] == f"{PREFIXES[0]}.scales"
            break


def test_missing_parts_are_named() -> None:
    named = [(n, t) for n, t in _awq_stream() if n not in (f"{PREFIXES[1]}.qzeros", f"{PREFIXES[3]}.scales")]
    with pytest.raises(ValueError, match="missing parts") as info:
        list(codes_stream(AWQ_SPEC, named))
    message = str(info.value)
    assert f"'{PREFIXES[1]}': ['qzeros']" in message and f"'{PREFIXES[3]}': ['scales']" in message
    assert PREFIXES[0] not in message


def test_duplicate_part_raises() -> None:
    named = _awq_stream()
    with pytest.raises(ValueError, match="given twice"):
        list(codes_stream(AWQ_SPEC, [*named, named[1]]))


def test_part_of_a_dense_module_raises() -> None:
    spec = parse_quantization_config({"quant_method": "awq", "bits": 4, "group_size": 32,
                                      "modules_to_not_convert": ["down_proj"]})
    with pytest.raises(ValueError, match="leaves dense"):
        list(codes_stream(spec, _awq_stream()))


def test_declared_group_size_is_checked() -> None:
    spec = parse_quantization_config({"quant_method": "awq", "bits": 4, "group_size": 64})
    with pytest.raises(ValueError, match=rf"{PREFIXES[0]}: stored with groups of 32"):
        list(codes_stream(spec, _awq_stream()))


def _gptq_module(prefix: str, seed: int, *, act_order: bool) -> dict[str, torch.Tensor]:
    codes, zeros, scales = _codes(seed, n=32, k=64)
    g_idx = act_order_g_idx(64, 32, torch.Generator().manual_seed(seed)) if act_order else torch.arange(64) // 32
    return {f"{prefix}.{part}": t for part, t in pack_gptq(codes, zeros, scales, g_idx, 4).items()}


def test_gptq_g_idx_optional_without_act_order() -> None:
    spec = _gptq_spec(desc_act=False)
    assert module_parts(spec).optional == {"g_idx"}
    late = _gptq_module("a.q_proj", 1, act_order=False)
    early = _gptq_module("b.q_proj", 2, act_order=False)
    absent = _gptq_module("c.q_proj", 3, act_order=False)
    del absent["c.q_proj.g_idx"]
    late_order = [n for n in late if not n.endswith("g_idx")] + ["a.q_proj.g_idx"]
    named = [(n, late[n]) for n in late_order] + [(n, early[n]) for n in ("b.q_proj.g_idx", *list(early)[:3])]
    named += list(absent.items())
    out = dict(codes_stream(spec, named))
    assert set(out) == {f"{p}.{s}" for p in ("a.q_proj", "b.q_proj", "c.q_proj") for s in CANONICAL_SUFFIXES[:4]}
    shuffled = _gptq_module("d.q_proj", 4, act_order=True)
    reordered = [(n, t) for n, t in shuffled.items() if not n.endswith("g_idx")] + [("d.q_proj.g_idx",
                                                                                      shuffled["d.q_proj.g_idx"])]
    with pytest.raises(ValueError, match="desc_act is false"):
        list(codes_stream(spec, reordered))


def test_gptq_act_order_emits_input_perm() -> None:
    spec = _gptq_spec(desc_act=True)
    assert "g_idx" in module_parts(spec).required
    named = [*_gptq_module("x.up_proj", 5, act_order=True).items(), *_gptq_module("y.up_proj", 6,
                                                                                   act_order=False).items()]
    random.Random(1).shuffle(named)
    out = dict(codes_stream(spec, named))
    assert out["x.up_proj.input_perm"].dtype == torch.int64 and out["x.up_proj.input_perm"].shape == (64,)
    assert "y.up_proj.input_perm" not in out  # a trivial g_idx needs no permutation
    without = [(n, t) for n, t in _gptq_module("z.up_proj", 7, act_order=True).items() if not n.endswith("g_idx")]
    with pytest.raises(ValueError, match=r"'z.up_proj': \['g_idx'\]"):
        list(codes_stream(spec, without))


def test_naive_quantized_weight_is_a_part_only_when_integer() -> None:
    spec = parse_quantization_config({
        "quant_method": "compressed-tensors", "format": "naive-quantized", "ignore": ["lm_head"],
        "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int",
                                                                     "symmetric": True, "strategy": "channel"}}}})
    q = torch.randint(-128, 128, (16, 32), dtype=torch.int8)
    named = [("model.norm.weight", torch.ones(32)), ("model.layers.0.mlp.up_proj.weight", q),
             ("model.layers.0.mlp.up_proj.weight_scale", torch.rand(16, 1)), ("lm_head.weight", torch.randn(4, 32))]
    out = dict(codes_stream(spec, named))
    assert set(out) == {"model.norm.weight", "lm_head.weight"} | {f"model.layers.0.mlp.up_proj.{s}"
                                                                   for s in CANONICAL_SUFFIXES[:4]}
    assert torch.equal(out["model.layers.0.mlp.up_proj.codes"], (q.int() + 128).to(torch.uint8))
    assert torch.equal(out["model.layers.0.mlp.up_proj.code_zeros"], torch.full((16, 1), 128.0))
