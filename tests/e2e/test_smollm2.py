"""The real SmolLM2-135M-Instruct GGUF: greedy generation token-for-token against HF transformers,
which loads and dequantizes the same file independently, through the one model path with each kernel
bundle: the CPU fast path (with and without its native kernels), the torch reference and, on a machine
without a GPU, the Triton kernels under the interpreter (one short chat: the interpreter is slow)."""

from __future__ import annotations

import asyncio
import os
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


BACKENDS: dict[str, dict[str, Any]] = {
    "cpu": {},
    "cpu-torch-only": {"native_kernels": False},
    "torch-reference": {"kernel_backend": "torch"},
}
if os.environ.get("TRITON_INTERPRET") == "1":
    BACKENDS["triton-interpreted"] = {"kernel_backend": "triton"}


@pytest.fixture(scope="module")
def expected(smollm2_gguf: Path, hf_model: Any) -> list[list[int]]:
    """HF's greedy continuation of every chat (computed once for all backends)."""
    from asyncllm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_path(smollm2_gguf)
    eos = list(tokenizer.eos_token_ids)
    return [hf_greedy(hf_model, tokenizer.apply_chat_template(chat), eos) for chat in CHATS]


def hf_greedy(model: Any, prompt_ids: list[int], eos_ids: list[int]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos_ids,
            pad_token_id=eos_ids[0],
        )
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_greedy_chat_matches_hf_token_for_token(smollm2_gguf: Path, expected: list[list[int]], backend: str) -> None:
    engine = AsyncEngine.from_pretrained(smollm2_gguf, device="cpu", kv_cache_tokens=8192, **BACKENDS[backend])
    interpreted = backend == "triton-interpreted"
    chats, new_tokens = (CHATS[:1], 6) if interpreted else (CHATS, NEW_TOKENS)

    async def ours() -> list[Any]:
        try:
            # all at once: this also checks that batching does not change greedy output
            return await asyncio.gather(
                *(engine.generate(chat, temperature=0.0, max_tokens=new_tokens) for chat in chats)
            )
        finally:
            await engine.aclose()

    results = asyncio.run(ours())
    for chat, result, reference in zip(chats, results, expected, strict=False):
        reference = reference[:new_tokens]
        assert result.token_ids == reference, f"{backend} diverged for {chat[-1]['content']!r}"
        assert result.finish_reason == ("stop" if len(reference) < new_tokens else "length")
        assert result.text == engine.tokenizer.decode(reference)
