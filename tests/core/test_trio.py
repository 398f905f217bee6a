"""The engine, sessions and streams under trio as under asyncio: the same scenarios run with
``anyio.run(..., backend=...)`` on the tiny engine, compared with a plain ``asyncio.run`` reference."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from asyncllm import AsyncEngine, EngineClosedError

from ._tokenizers import word_piece_only_bias

pytest.importorskip("trio")

BACKENDS = ["asyncio", "trio"]
PROMPTS = ["Once upon a time", "The quick brown fox jumps over", "In 1492,", "def fibonacci(n):"]
GREEDY = {"temperature": 0.0, "max_tokens": 16, "ignore_eos": True}
LONG = {"temperature": 0.0, "max_tokens": 400, "ignore_eos": True}


def run(backend: str, fn: Callable[[], Awaitable[Any]]) -> Any:
    async def bounded() -> Any:
        with anyio.fail_after(60):  # a hang fails the test instead of blocking the run
            return await fn()

    return anyio.run(bounded, backend=backend)


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


def model_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("asyncllm-model")}


@pytest.fixture
def reference(make_tiny_engine: Callable[..., AsyncEngine]) -> dict[str, Any]:
    """Greedy completions of ``PROMPTS`` from a plain ``asyncio.run``."""
    async def main() -> dict[str, Any]:
        async with make_tiny_engine() as engine:
            return {p: (await engine.generate(p, **GREEDY)) for p in PROMPTS}

    return asyncio.run(main())


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_and_stream_match_asyncio(backend: str, make_tiny_engine: Any, reference: Any) -> None:
    async def main() -> tuple[list[Any], list[str]]:
        async with make_tiny_engine() as engine:
            generated = [await engine.generate(p, **GREEDY) for p in PROMPTS]
            streamed = []
            for p in PROMPTS:
                streamed.append("".join([text async for text in engine.stream(p, **GREEDY)]))
            assert engine.stats().kv_blocks_used == 0
            return generated, streamed

    generated, streamed = run(backend, main)
    assert [c.token_ids for c in generated] == [reference[p].token_ids for p in PROMPTS]
    assert [c.text for c in generated] == [reference[p].text for p in PROMPTS]
    assert streamed == [reference[p].text for p in PROMPTS]


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_requests_in_one_task_group(backend: str, make_tiny_engine: Any, reference: Any) -> None:
    async def main() -> dict[str, list[int]]:
        results: dict[str, list[int]] = {}
        engine = make_tiny_engine()
        await engine.start()
        try:
            async def one(prompt: str) -> None:
                results[prompt] = (await engine.generate(prompt, **GREEDY)).token_ids

            async with anyio.create_task_group() as tg:
                for p in PROMPTS:
                    tg.start_soon(one, p)
            assert engine.stats().kv_blocks_used == 0
        finally:
            await engine.aclose()
        return results

    results = run(backend, main)
    assert results == {p: reference[p].token_ids for p in PROMPTS}


def test_session_turns_are_the_same_under_both_backends(make_tiny_engine: Any) -> None:
    async def main() -> tuple[list[int], str, list[Any]]:
        async with make_tiny_engine() as engine:
            params = {"temperature": 0.0, "max_tokens": 12, "logit_bias": word_piece_only_bias(engine.tokenizer)}
            async with engine.session(system="Be brief.") as chat:
                c1 = await chat.send("Name a river.", **params)
                streamed = "".join([text async for text in chat.stream("How long is it?", **params)])
                transcript = chat.messages
            await wait_until(lambda: engine.stats().sessions_pinned == 0)
            assert engine.stats().kv_blocks_used == 0
            return c1.token_ids, streamed, transcript

    on_asyncio, on_trio = run("asyncio", main), run("trio", main)
    assert on_trio == on_asyncio
    assert on_trio[2][-1] == {"role": "assistant", "content": on_trio[1]}


@pytest.mark.parametrize("backend", BACKENDS)
def test_session_second_turn_hits_the_pinned_kv(backend: str, make_tiny_engine: Any) -> None:
    async def main() -> tuple[Any, Any]:
        async with make_tiny_engine() as engine:
            params = {"temperature": 0.0, "max_tokens": 12, "logit_bias": word_piece_only_bias(engine.tokenizer)}
            async with engine.session(system="Be brief.") as chat:
                c1 = await chat.send("Name a river.", **params)
                c2 = await chat.send("How long is it?", **params)
            return c1, c2

    c1, c2 = run(backend, main)
    assert c2.usage.cached_tokens >= c1.usage.prompt_tokens + c1.usage.completion_tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_closing_or_cancelling_a_stream_early_frees_its_kv(backend: str, make_tiny_engine: Any) -> None:
    async def main() -> None:
        async with make_tiny_engine() as engine:
            stream = engine.stream_detailed("Once upon a time", **LONG)
            first = await stream.__anext__()
            assert first.finish_reason is None
            assert engine.stats().kv_blocks_used > 0
            await stream.aclose()
            await wait_until(lambda: engine.stats().kv_blocks_used == 0 and engine.stats().running == 0)

            # a cancelled scope around the iteration aborts the request the same way
            with anyio.CancelScope() as scope:
                async for _ in engine.stream("The quick brown fox", **LONG):
                    scope.cancel()
            assert scope.cancelled_caught
            await wait_until(lambda: engine.stats().kv_blocks_used == 0 and engine.stats().running == 0)

            # the engine goes on serving
            assert (await engine.generate("In 1492,", **GREEDY)).finish_reason == "length"

    run(backend, main)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aclose_ends_cleanly_without_leftover_threads(backend: str, make_tiny_engine: Any) -> None:
    before = model_threads()

    async def main() -> None:
        engine = make_tiny_engine()
        assert model_threads() - before
        await engine.generate("Hello", **GREEDY)  # started on first use
        assert engine.is_running and engine._loop is not None and engine._loop.backend == backend
        in_flight = engine.stream_detailed("Once upon a time", **LONG)
        await in_flight.__anext__()
        await engine.aclose()
        assert engine.is_closed and not engine.is_running
        with pytest.raises(EngineClosedError):
            await in_flight.collect()
        with pytest.raises(EngineClosedError):
            await engine.generate("Hello", **GREEDY)
        await engine.aclose()  # idempotent

    run(backend, main)
    assert model_threads() - before == set()


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_ending_without_aclose_closes_the_engine(backend: str, make_tiny_engine: Any) -> None:
    engine = make_tiny_engine()

    async def main() -> None:
        await engine.start()
        assert (await engine.generate("Hello", **GREEDY)).finish_reason == "length"

    run(backend, main)  # returns: the loop task is cancelled with the run, it does not keep it alive
    assert engine.is_closed
    engine._executor.shutdown(wait=True)


def test_the_asgi_app_refuses_trio_at_once(make_tiny_engine: Any) -> None:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("starlette")
    from asyncllm.adapters.asgi import create_app

    engine = make_tiny_engine()
    app = create_app(engine, model_name="tiny")
    message = "asyncllm: the OpenAI-compatible ASGI app needs asyncio; running under trio"

    async def request() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await client.get("/health")

    async def lifespan() -> None:
        async with app.router.lifespan_context(app):
            pass

    try:
        for main in (request, lifespan):
            with pytest.raises(RuntimeError, match=message):
                run("trio", main)
        assert not engine.is_running and not engine.is_closed
    finally:
        engine._executor.shutdown(wait=True)
