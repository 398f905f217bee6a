"""The real SmolLM2-135M-Instruct GGUF: greedy generation token-for-token against HF transformers,
which loads and dequantizes the same file independently."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncllm import AsyncEngine

CHATS = [
    [{"role": "user", "content": "Name three rivers in Europe."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 17 times 3?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Explain what a hash table is in two sentences."}],
    [{"role": "user", "content": "Translate 'good morning' into French and Spanish."}],
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf: Path) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def engine(smollm2_gguf: Path) -> AsyncEngine:
    return AsyncEngine.from_pretrained(smollm2_gguf, device="cpu", kv_cache_tokens=8192)


def hf_greedy(model: Any, prompt_ids: list[int], eos_ids: list[int]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos_ids,
            pad_token_id=eos_ids[0],
        )
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.slow
def test_greedy_chat_matches_hf_token_for_token(engine: AsyncEngine, hf_model: Any) -> None:
    eos = list(engine.tokenizer.eos_token_ids)
    prompts = [engine.tokenizer.apply_chat_template(chat) for chat in CHATS]
    expected = [hf_greedy(hf_model, ids, eos) for ids in prompts]

    async def ours() -> list[Any]:
        try:
            # all at once: this also checks that batching does not change greedy output
            return await asyncio.gather(
                *(engine.generate(chat, temperature=0.0, max_tokens=NEW_TOKENS) for chat in CHATS)
            )
        finally:
            await engine.aclose()

    results = asyncio.run(ours())
    for chat, result, reference in zip(CHATS, results, expected, strict=True):
        assert result.token_ids == reference, f"diverged for {chat[-1]['content']!r}"
        assert result.finish_reason == ("stop" if len(reference) < NEW_TOKENS else "length")
        assert result.text == engine.tokenizer.decode(reference)
