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
