"""The real SmolLM2 GGUF behind the app, driven by the official ``openai`` client over ASGI in process:
its chat template, end-of-turn token and stop handling, against the engine's own Python API."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("starlette")
openai = pytest.importorskip("openai")

import httpx  # noqa: E402

from asyncllm import AsyncEngine  # noqa: E402
from asyncllm.adapters.asgi import create_app  # noqa: E402

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 17 times 3?"}]


@pytest.mark.slow
async def test_real_model_chat_through_the_openai_client(smollm2_gguf: Path) -> None:
    engine = AsyncEngine.from_pretrained(smollm2_gguf, device="cpu", kv_cache_tokens=4096)
    async with engine:
        expected = await engine.generate(CHAT, max_tokens=48, temperature=0)
        assert expected.finish_reason == "stop"  # the model ends its turn with <|im_end|>
        transport = httpx.ASGITransport(app=create_app(engine, model_name="smollm2"))
        async with httpx.AsyncClient(transport=transport, base_url="http://asgi") as http, \
                openai.AsyncOpenAI(base_url="http://asgi/v1", api_key="unused", http_client=http) as client:
            reply = await client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=48,
                                                         temperature=0)
            assert reply.choices[0].message.content == expected.text
            assert reply.choices[0].finish_reason == "stop"
            assert reply.usage.completion_tokens == expected.usage.completion_tokens
            assert "<|im_end|>" not in expected.text

            stream = await client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=48,
                                                          temperature=0, stream=True)
            chunks = [chunk async for chunk in stream]
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
            assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
