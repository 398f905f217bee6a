"""The whole model with the Triton dispatch forced on (interpreter on CPU) matches the torch path."""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from asyncllm import AsyncEngine, ModelConfig
from asyncllm.kernels import TORCH_OPS, KernelOps, get_kernel_ops
from asyncllm.models import build_model
from tests.conftest import tiny_llama_state


def _engine(ops: KernelOps, tokenizer: Any, hf_config: dict, state: dict) -> AsyncEngine:
    model = build_model(ModelConfig.from_hf_config(hf_config), ops, dtype=torch.float32, device=torch.device("cpu"))
    model.load_weights(state.items())
    return AsyncEngine.from_model(model, tokenizer, device="cpu", num_kv_blocks=32, block_size=16)


def test_triton_model_generates_like_the_torch_model(chat_tokenizer: Any) -> None:
    hf_config, state = tiny_llama_state(
        chat_tokenizer.vocab_size, hidden_size=96, num_attention_heads=3, num_key_value_heads=1,
        intermediate_size=64, num_hidden_layers=2,
    )
    prompts = ["Once upon a time in a land far away", "Hi"]
    params = {"temperature": 0.0, "max_tokens": 4, "ignore_eos": True, "logprobs": 2}

    async def run(engine: AsyncEngine) -> list[Any]:
        async with engine:  # both prompts at once: a mixed prefill batch, then batched decodes
            return await asyncio.gather(*(engine.generate(p, **params) for p in prompts))

    triton_ops = get_kernel_ops("triton", torch.device("cpu"))
    assert triton_ops.name != TORCH_OPS.name
    expected = asyncio.run(run(_engine(TORCH_OPS, chat_tokenizer, hf_config, state)))
    actual = asyncio.run(run(_engine(triton_ops, chat_tokenizer, hf_config, state)))
    for ours, ref in zip(actual, expected, strict=True):
        assert ours.token_ids == ref.token_ids
        for a, b in zip(ours.logprobs, ref.logprobs, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-4


def _rtn_codes(weight: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """Asymmetric 4-bit min-max round-to-nearest codes of ``weight`` in the loaders' canonical form."""
    rows, cols = weight.shape
    grouped = weight.reshape(rows, cols // group, group)
    low, high = grouped.amin(-1), grouped.amax(-1)
    scales = ((high - low) / 15).clamp_min(1e-8)
    zeros = torch.round(-low / scales)
    codes = torch.clamp(torch.round(grouped / scales.unsqueeze(-1)) + zeros.unsqueeze(-1), 0, 15)
    return {"codes": codes.to(torch.uint8).reshape(rows, cols), "code_scales": scales, "code_zeros": zeros,
            "code_mins": torch.zeros_like(scales)}


def test_triton_packed_model_generates_like_the_torch_model(chat_tokenizer: Any) -> None:
    """Weight-only 4-bit linears through the Triton quantized kernels (GEMV at decode, GEMM at prefill)."""
    from asyncllm.quant.config import WeightOnlyQuantization
    from asyncllm.quant.layer_quant import LayerQuant

    hf_config, state = tiny_llama_state(
        chat_tokenizer.vocab_size, hidden_size=96, num_attention_heads=3, num_key_value_heads=1,
        intermediate_size=64, num_hidden_layers=2,
    )
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, LayerQuant] = {}
    for name, tensor in state.items():
        if name.endswith("proj.weight"):
            prefix = name.removesuffix(".weight")
            layers[prefix] = LayerQuant(bits=4, group_size=32)
            tensors.update({f"{prefix}.{part}": value for part, value in _rtn_codes(tensor.float(), 32).items()})
        else:
            tensors[name] = tensor
    quantization = WeightOnlyQuantization("rtn", layers)
    prompts = ["Once upon a time in a land far away", "Hi"]
    params = {"temperature": 0.0, "max_tokens": 4, "ignore_eos": True, "logprobs": 2}

    def engine(ops: KernelOps) -> AsyncEngine:
        model = build_model(ModelConfig.from_hf_config(hf_config), ops, dtype=torch.float32,
                            device=torch.device("cpu"), quantization=quantization)
        model.load_weights(tensors.items())
        return AsyncEngine.from_model(model, chat_tokenizer, device="cpu", num_kv_blocks=32, block_size=16)

    async def run(engine: AsyncEngine) -> list[Any]:
        async with engine:
            return await asyncio.gather(*(engine.generate(p, **params) for p in prompts))

    expected = asyncio.run(run(engine(TORCH_OPS)))
    actual = asyncio.run(run(engine(get_kernel_ops("triton", torch.device("cpu")))))
    for ours, ref in zip(actual, expected, strict=True):
        assert ours.token_ids == ref.token_ids
        for a, b in zip(ours.logprobs, ref.logprobs, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-4
