"""End to end: tiny Llama / Qwen2 checkpoints written in each weight-only format load packed and match Hugging
Face transformers running the exactly dequantized weights: on the torch reference ops, logits within 1e-4
and the same greedy tokens; on the CPU fast paths, prefill logits within 1e-4 (their exact many-row path)
and decode logits within the int8-activation tolerance. ``dequantize_weights`` loads the same model dense,
with exactly the reference weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncllm.config import ModelConfig
from asyncllm.kernels import get_kernel_ops
from asyncllm.loaders import load_checkpoint
from asyncllm.models import build_model
from asyncllm.quant.config import WeightOnlyQuantization

from ..models._paged import BlockPool, PagedSequence, build_step, make_kv_caches
from ._writers import model_class, write_awq, write_compressed_tensors, write_gptq

CASES: list[tuple[str, Callable[..., dict[str, torch.Tensor]], dict[str, Any]]] = [
    ("awq-llama", write_awq, {}),
    ("awq-qwen2-channel", write_awq, {"family": "qwen2", "group_size": None}),
    ("gptq-llama-sym4", write_gptq, {}),
    ("gptq-qwen2-asym8-actorder", write_gptq, {"family": "qwen2", "bits": 8, "sym": False, "desc_act": True}),
    ("gptq-llama-asym4-actorder", write_gptq, {"sym": False, "desc_act": True}),
    ("ct-llama-sym4", write_compressed_tensors, {}),
    ("ct-qwen2-asym8-channel", write_compressed_tensors, {"family": "qwen2", "bits": 8, "group_size": None,
                                                           "symmetric": False}),
    ("ct-llama-asym4-group64", write_compressed_tensors, {"symmetric": False, "group_size": 64}),
    ("ct-llama-asym4-naive", write_compressed_tensors, {"symmetric": False, "fmt": "naive-quantized"}),
    # One config group per setting; q (4-bit, groups of 32) merges with k / v (8-bit, groups of 64).
    ("ct-llama-mixed-groups", write_compressed_tensors, {"groups": [
        (r".*q_proj$", 4, 32, True), (r".*(k|v)_proj$", 8, 64, False), (r".*o_proj$", 4, None, False),
        (r".*(gate|up)_proj$", 4, 64, True), (r".*down_proj$", 8, 128, True)]}),
]
PROMPT = [(7 * i * i + 3 * i + 1) % 256 for i in range(40)]
"""40 tokens: a prefill above the CPU kernels' 32-row int8 limit takes their exact (dequantized-slab) path."""
NEW_TOKENS = 6
DECODE_TOLERANCE = 5e-2
"""The CPU fast path decodes through kernels that round activations to int8 per block of 32 (llama.cpp's
scheme, ``kernels.native_quant``, whose tests hold each product to its bound): decode-step logits must be
within this fraction of the largest |logit| of HF's exact ones (measured 2.4-3.5% on these random tiny
models, whose weights are large; a wrong layout is off by the logits' whole scale)."""


@torch.no_grad()
def _logits(model: torch.nn.Module, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """Logits predicting each token after the prompt: the prefill's last row, then one decode step per token
    of ``continuation`` (teacher forcing), through the paged model: ``[1 + len(continuation), V]``."""
    config = model.config
    pool = BlockPool(16, 16, seed=1)
    caches = make_kv_caches(config.num_hidden_layers, 16, 16, config.num_key_value_heads, config.head_dim)
    seq = PagedSequence()
    rows = []
    for feed in [prompt, *([token] for token in continuation)]:
        positions, meta = build_step(pool, [(seq, len(feed))])
        rows.append(model.compute_logits(model.forward(torch.tensor(feed), positions, meta, caches))[-1])
    return torch.stack(rows)


@torch.no_grad()
def _greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """``steps`` greedy tokens after ``prompt``, through the paged model step by step."""
    config = model.config
    pool = BlockPool(16, 16, seed=1)
    caches = make_kv_caches(config.num_hidden_layers, 16, 16, config.num_key_value_heads, config.head_dim)
    seq = PagedSequence()
    feed, tokens = prompt, []
    for _ in range(steps):
        positions, meta = build_step(pool, [(seq, len(feed))])
        logits = model.compute_logits(model.forward(torch.tensor(feed), positions, meta, caches))
        tokens.append(int(logits[-1].argmax()))
        feed = tokens[-1:]
    return tokens


@pytest.mark.parametrize(("writer", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_quantized_checkpoint_matches_transformers(tmp_path: Path, writer: Callable[..., dict[str, torch.Tensor]],
                                                   kwargs: dict[str, Any]) -> None:
    if writer is write_compressed_tensors:
        pytest.importorskip("compressed_tensors")
    reference = writer(tmp_path, **kwargs)
    checkpoint = load_checkpoint(tmp_path)
    assert isinstance(checkpoint.quantization, WeightOnlyQuantization)
    assert len(checkpoint.quantization.layers) == 14  # 7 linears x 2 layers, lm_head dense
    config = ModelConfig.from_hf_config(checkpoint.hf_config)

    hf = model_class(kwargs.get("family", "llama"))(_hf_config(checkpoint.hf_config)).eval()
    hf.load_state_dict(reference, strict=True)
    with torch.no_grad():
        hf_tokens = hf.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=0)[0, len(PROMPT):].tolist()
        hf_logits = hf(input_ids=torch.tensor([PROMPT + hf_tokens])).logits[0, len(PROMPT) - 1:-1].float()
    scale = float(hf_logits.abs().max())

    for backend in ("torch", "auto"):
        ops = get_kernel_ops(backend, torch.device("cpu"))
        model = build_model(config, ops, dtype=torch.float32, device=torch.device("cpu"),
                            quantization=checkpoint.quantization)
        model.load_weights(checkpoint.tensors(torch.float32))
        if kwargs.get("groups"):  # (bits, group size) of each merged layer: the widest, a common divisor
            block = model.model.layers[0]
            layers = (block.self_attn.qkv_proj, block.self_attn.o_proj, block.mlp.gate_up_proj, block.mlp.down_proj)
            assert [(m.packed.bits, m.packed.group_size) for m in layers] == [(8, 32), (4, 64), (4, 64), (8, 128)]
        else:
            assert model.model.layers[0].mlp.down_proj.packed.bits == (4 if kwargs.get("bits", 4) == 4 else 8)
        ours = _logits(model, PROMPT, hf_tokens[:-1])
        torch.testing.assert_close(ours[0], hf_logits[0], rtol=1e-4, atol=1e-4 * scale)  # exact on both
        decode_tolerance = 1e-4 if backend == "torch" else DECODE_TOLERANCE
        torch.testing.assert_close(ours[1:], hf_logits[1:], rtol=decode_tolerance, atol=decode_tolerance * scale)
        if backend == "torch":
            assert _greedy(model, PROMPT, NEW_TOKENS) == hf_tokens

    dense_ckpt = load_checkpoint(tmp_path, dequantize_weights=True)
    dense = build_model(config, get_kernel_ops("torch", torch.device("cpu")), dtype=torch.float32,
                        device=torch.device("cpu"), quantization=dense_ckpt.quantization)
    dense.load_weights(dense_ckpt.tensors(torch.float32))
    for name, tensor in reference.items():
        if name.endswith("proj.weight"):
            layer = name.split(".")[2]
            assert torch.equal(_dense_weight(dense, name, int(layer)), tensor), name
    assert _greedy(dense, PROMPT, NEW_TOKENS) == hf_tokens


def _dense_weight(model: torch.nn.Module, name: str, layer: int) -> torch.Tensor:
    """The dense weight of checkpoint linear ``name`` inside our merged modules (rows of its shard)."""
    block = model.model.layers[layer]
    module = name.split(".")[-2]
    merged = {"q_proj": (block.self_attn.qkv_proj, 0), "k_proj": (block.self_attn.qkv_proj, 1),
              "v_proj": (block.self_attn.qkv_proj, 2), "gate_proj": (block.mlp.gate_up_proj, 0),
              "up_proj": (block.mlp.gate_up_proj, 1), "o_proj": (block.self_attn.o_proj, 0),
              "down_proj": (block.mlp.down_proj, 0)}
    linear, index = merged[module]
    start = sum(linear.output_sizes[:index])
    return linear.weight.detach()[start:start + linear.output_sizes[index]]  # torch ops: stored [N, K]


def _hf_config(config: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    trimmed = {k: v for k, v in config.items() if k != "quantization_config"}
    return AutoConfig.for_model(**trimmed)


def test_merged_shards_with_different_input_orders_are_refused() -> None:
    from asyncllm.kernels import TORCH_OPS
    from asyncllm.layers.linear import QKVLinear
    from asyncllm.quant.layer_quant import LayerQuant
    from asyncllm.quant.packed_linear import PackedLinearMethod

    method = PackedLinearMethod(TORCH_OPS, LayerQuant(bits=4, group_size=32, permuted=True))
    layer = QKVLinear(64, 16, 2, 1, bias=False, method=method, dtype=torch.float32, device=torch.device("cpu"))
    perm = torch.randperm(64)
    layer.weight_loader(layer.input_perm, perm, "q")
    layer.weight_loader(layer.input_perm, perm.clone(), "k")
    with pytest.raises(ValueError, match=r"shard 'v': differs from shard 'q'"):
        layer.weight_loader(layer.input_perm, perm.flip(0), "v")
