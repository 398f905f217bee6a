"""The app behind a real uvicorn server on 127.0.0.1, driven by the official ``openai`` client and httpx:
mounting in FastAPI, lifespans, client disconnects, concurrency and the ``serve`` command."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
fastapi = pytest.importorskip("fastapi")

import httpx  # noqa: E402

from asyncllm import AsyncEngine  # noqa: E402
from asyncllm.adapters.asgi import create_app  # noqa: E402

from ._support import GREEDY, parse_prometheus, running_server, wait_until  # noqa: E402

KEY = "sk-test-key"
USER = [{"role": "user", "content": "Name three rivers."}]
LONG = {"max_tokens": 2000, "temperature": 0.0, "ignore_eos": True}  # ~6 s if it were not cut short


@pytest.fixture
def served(make_tiny_engine: Any) -> Iterator[tuple[AsyncEngine, str]]:
    """A tiny engine behind the app as the top-level ASGI app (its lifespan owns the engine)."""
    engine = make_tiny_engine()
    with running_server(create_app(engine, model_name="tiny", api_keys=[KEY])) as url:
        yield engine, url
    assert not engine.is_running  # the app's lifespan closed the engine at shutdown


def reference_generate(make_tiny_engine: Any, prompts: list[Any], **params: Any) -> list[Any]:
    async def run() -> list[Any]:
        async with make_tiny_engine(enable_prefix_caching=False) as engine:
            return list(await asyncio.gather(*(engine.generate(p, **params) for p in prompts)))

    return asyncio.run(run())


def test_openai_sync_client(served: tuple[AsyncEngine, str], make_tiny_engine: Any) -> None:
    _, url = served
    (expected,) = reference_generate(make_tiny_engine, [USER], max_tokens=10, **GREEDY)
    with openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as client:
        assert [m.id for m in client.models.list()] == ["tiny"]
        reply = client.chat.completions.create(model="tiny", messages=USER, max_tokens=10, temperature=0,
                                               extra_body={"ignore_eos": True})
        assert reply.choices[0].message.content == expected.text
        assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
        assert reply.usage.completion_tokens == 10

        stream = client.chat.completions.create(model="tiny", messages=USER, max_tokens=10, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices].count("length") == 1
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10

        completion = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0,
                                               extra_body={"ignore_eos": True})
        assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 5

        with pytest.raises(openai.NotFoundError) as not_found:
            client.chat.completions.create(model="gpt-4o", messages=USER)
        assert not_found.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="tiny", messages=USER, temperature=-3)
        assert bad.value.param == "temperature"
    with openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0) as wrong, \
            pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(f"{url}/health").status_code == 200


async def test_openai_async_client_and_100_concurrent_streams(
        served: tuple[AsyncEngine, str], make_tiny_engine: Any) -> None:
    engine, url = served
    prompts = [f"Story number {i}:" for i in range(100)]
    async with make_tiny_engine(enable_prefix_caching=False) as reference:
        expected = await asyncio.gather(*(reference.generate(p, max_tokens=4, **GREEDY) for p in prompts))

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as client:
        async def one(prompt: str) -> tuple[str, Any, list[str | None]]:
            stream = await client.completions.create(
                model="tiny", prompt=prompt, max_tokens=4, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            text, usage, finishes = "", None, []
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    text += choice.text
                    finishes.append(choice.finish_reason)
            return text, usage, finishes

        results = await asyncio.gather(*(one(p) for p in prompts))
        reply = await client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
    for (text, usage, finishes), reference_completion in zip(results, expected, strict=True):
        assert text == reference_completion.text
        assert usage.completion_tokens == 4
        assert usage.prompt_tokens == reference_completion.usage.prompt_tokens
        assert [f for f in finishes if f is not None] == ["length"]
    wait_until(lambda: engine.stats().running == 0)
    assert engine.stats().kv_blocks_used == 0


def _metric(url: str, name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
    samples, _ = parse_prometheus(httpx.get(f"{url}/metrics").text)
    return samples.get((name, labels), 0.0)


def test_disconnect_mid_stream_aborts_and_frees_blocks(served: tuple[AsyncEngine, str]) -> None:
    engine, url = served
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"messages": USER, "stream": True, **LONG}
    with httpx.Client(timeout=30) as client, client.stream("POST", f"{url}/v1/chat/completions", json=body,
                                                             headers=headers) as response:
        assert response.status_code == 200
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 5:
                break
        assert engine.stats().running == 1 and engine.stats().kv_blocks_used > 0
    start = time.monotonic()
    wait_until(lambda: engine.stats().running == 0 and engine.stats().kv_blocks_used == 0, timeout=3)
    assert time.monotonic() - start < 2.0  # the full request would have run for seconds
    assert _metric(url, "asyncllm_requests_finished_total", (("finish_reason", "abort"),)) == 1
    assert _metric(url, "asyncllm_generation_tokens_total") < 1000
    # and the server keeps serving
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=headers)
    assert r.status_code == 200


def test_disconnect_while_waiting_for_a_non_streaming_reply(served: tuple[AsyncEngine, str]) -> None:
    engine, url = served
    headers = {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={"prompt": "Once upon a time", **LONG}, headers=headers,
                   timeout=httpx.Timeout(30, read=0.5))
    wait_until(lambda: engine.stats().running == 0 and engine.stats().kv_blocks_used == 0, timeout=2)
    assert _metric(url, "asyncllm_requests_finished_total", (("finish_reason", "abort"),)) == 1
    assert _metric(url, "asyncllm_http_requests_total", (("endpoint", "completions"), ("status", "499"))) == 1


def test_mounted_in_fastapi_with_host_lifespan(make_tiny_engine: Any) -> None:
    engine = make_tiny_engine()
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        events.append("host started")
        async with engine.lifespan(app):
            events.append(f"engine running={engine.is_running}")
            yield
        events.append(f"engine running={engine.is_running}")

    host = fastapi.FastAPI(lifespan=lifespan)

    @host.get("/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    host.mount("/llm", create_app(engine, model_name="smollm2", api_keys=[KEY]))
    with running_server(host) as url:
        assert httpx.get(f"{url}/ping").json() == {"pong": "yes"}
        assert httpx.get(f"{url}/llm/health").status_code == 200
        with openai.OpenAI(base_url=f"{url}/llm/v1", api_key=KEY, max_retries=0) as client:
            reply = client.chat.completions.create(model="smollm2", messages=USER, max_tokens=4)
            assert reply.model == "smollm2" and reply.usage.completion_tokens <= 4
            models = client.models.list()
            assert [m.id for m in models] == ["smollm2"]
        r = httpx.get(f"{url}/llm/v1/models", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/llm/metrics").status_code == 200
    assert events == ["host started", "engine running=True", "engine running=False"]


def test_mounted_without_lifespan_starts_lazily(make_tiny_engine: Any) -> None:
    engine = make_tiny_engine()
    host = fastapi.FastAPI()
    host.mount("/llm", create_app(engine))
    with running_server(host) as url:
        assert not engine.is_running
        r = httpx.post(f"{url}/llm/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 200 and engine.is_running


def _write_tiny_model(directory: Path, tiny_model_parts: Any) -> None:
    from safetensors.torch import save_file

    tokenizer, hf_config, state = tiny_model_parts
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(hf_config, default=str))
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    config = {**tokenizer.special_tokens, "chat_template": tokenizer.chat_template}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def test_serve_command(tmp_path: Path, tiny_model_parts: Any) -> None:
    model_dir = tmp_path / "tiny-llama"
    _write_tiny_model(model_dir, tiny_model_parts)
    env = {**os.environ, "ASYNCLLM_API_KEYS": "sk-env"}
    command = [sys.executable, "-m", "asyncllm.adapters.serve_cli", "serve", str(model_dir),
               "--host", "127.0.0.1", "--port", "0", "--api-key", "sk-cli", "--device", "cpu",
               "--kv-cache-tokens", "2048", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, (line, process.stderr.read() if process.poll() is not None else "")
        base = f"http://127.0.0.1:{match.group(1)}/v1"
        assert "'tiny-llama'" in line
        for key in ("sk-cli", "sk-env"):
            with openai.OpenAI(base_url=base, api_key=key, max_retries=0) as client:
                reply = client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=3,
                                                  temperature=0, extra_body={"ignore_eos": True})
                assert reply.usage.completion_tokens == 3
        assert httpx.get(f"{base}/models").status_code == 401
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C: graceful shutdown, then the conventional status 130
        try:
            _, stderr = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "ERROR" not in stderr, stderr
