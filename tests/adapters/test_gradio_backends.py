"""The Gradio UI's chat back ends without a browser: an engine ``Session`` per conversation (streaming,
usage, cancelling mid-stream), the OpenAI-compatible HTTP back end against our server, the usage line,
the missing-extra error and the ``asyncllm gradio`` command line."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from asyncllm.adapters import gradio as gradio_ui
from asyncllm.adapters.gradio import EngineBackend, OpenAIBackend, TurnUsage, as_backend, usage_line

from ._support import async_wait_until, running_server

SAMPLING = {"temperature": 0.0, "top_p": 1.0}


async def test_engine_conversation_keeps_context_and_reuses_kv(make_tiny_engine: Any) -> None:
    async with make_tiny_engine() as engine:
        backend = EngineBackend(engine, ignore_eos=True)
        conversation = backend.new_conversation("Be brief.")
        first = "".join([d async for d in conversation.stream("Hi.", max_tokens=6, **SAMPLING)])
        assert first and conversation.usage is not None and conversation.usage.completion_tokens == 6
        assert conversation.usage.finish_reason == "length"
        "".join([d async for d in conversation.stream("Again.", max_tokens=6, **SAMPLING)])
        assert conversation.usage.cached_tokens > 0
        assert [m["role"] for m in conversation.session.messages] == ["system", "user", "assistant", "user",
                                                                      "assistant"]
        assert conversation.session.messages[2]["content"] == first
        await async_wait_until(lambda: engine.stats().sessions_pinned == 1)  # the turn's KV settles as a pin
        await conversation.close()
        assert engine.stats().kv_blocks_used == 0 and engine.stats().sessions_pinned == 0


async def test_cancelling_a_stream_aborts_the_request(make_tiny_engine: Any) -> None:
    async with make_tiny_engine() as engine:
        conversation = EngineBackend(engine, ignore_eos=True).new_conversation(None)
        received: list[str] = []

        async def consume() -> None:
            async for delta in conversation.stream("Go on and on.", max_tokens=1900, **SAMPLING):
                received.append(delta)

        task = asyncio.create_task(consume())
        await async_wait_until(lambda: len(received) >= 3, timeout=20)
        task.cancel()  # what Gradio does when Stop is pressed
        with pytest.raises(asyncio.CancelledError):
            await task
        await async_wait_until(lambda: engine.stats().running == 0 and engine.stats().kv_blocks_used == 0)
        assert conversation.usage is None and not conversation.session.busy
        assert conversation.session.messages == []
        await conversation.close()


async def test_backend_sampling_wins_over_the_sliders(make_tiny_engine: Any) -> None:
    async with make_tiny_engine() as engine:
        conversation = EngineBackend(engine, max_tokens=3, ignore_eos=True).new_conversation(None)
        async for _ in conversation.stream("Hi.", max_tokens=50, **SAMPLING):
            pass
        assert conversation.usage is not None and conversation.usage.completion_tokens == 3
        await conversation.close()


def test_http_backend_uses_a_server_side_session(make_tiny_engine: Any) -> None:
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    from asyncllm.adapters.asgi import create_app

    engine = make_tiny_engine()
    with running_server(create_app(engine, model_name="tiny", api_keys=["sk-k"])) as url:
        async def run() -> None:
            backend = as_backend(url + "/v1")
            assert isinstance(backend, OpenAIBackend)
            backend.api_key = "sk-k"
            await backend.resolve_model()
            assert backend.model == "tiny"
            conversation = backend.new_conversation("Be brief.")
            first = "".join([d async for d in conversation.stream("Hi.", max_tokens=5, **SAMPLING)])
            assert first and conversation.usage is not None and conversation.usage.completion_tokens == 5
            assert conversation.session_id is not None
            # the server pins turn 1's KV when the engine finishes the request, which may follow the last chunk
            await async_wait_until(lambda: engine.stats().sessions_pinned == 1, timeout=10)
            async for _ in conversation.stream("More.", max_tokens=5, **SAMPLING):
                pass
            assert conversation.usage.cached_tokens > 0  # turn 1's KV, kept by the server's session
            await conversation.close()  # DELETE /v1/sessions/{id}
            assert engine.stats().sessions_pinned == 0
            stateless = OpenAIBackend(url, api_key="sk-k", model="tiny", server_sessions=False)
            other = stateless.new_conversation(None)
            async for _ in other.stream("Hi.", max_tokens=4, **SAMPLING):
                pass
            assert [m["role"] for m in other.messages] == ["user", "assistant"]
            bad = OpenAIBackend(url, api_key="wrong", model="tiny").new_conversation(None)
            with pytest.raises(RuntimeError, match="401"):
                async for _ in bad.stream("Hi.", max_tokens=4, **SAMPLING):
                    pass
            await backend.aclose()
            await stateless.aclose()

        asyncio.run(run())


def test_usage_line() -> None:
    line = usage_line(TurnUsage(40, 20, 32, "length"), 0.5, stopped=False)
    assert line == "40 prompt tokens (32 reused) · 20 completion tokens in 0.50 s · 40.0 tok/s"
    assert usage_line(TurnUsage(4, 2, 0, "stop"), 1.0, stopped=False).startswith("4 prompt tokens · 2 ")
    assert usage_line(None, 1.0, stopped=True) == "stopped"


def test_as_backend_rejects_other_objects() -> None:
    with pytest.raises(TypeError, match="backend"):
        as_backend(42)


def test_missing_gradio_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(ImportError, match=r"asyncllm\[gradio\]"):
        gradio_ui.chat_ui("http://127.0.0.1:1")


def test_gradio_command_line(monkeypatch: pytest.MonkeyPatch, capsys: Any, tmp_path: Path) -> None:
    from asyncllm.cli import build_parser, main

    args = build_parser().parse_args(["gradio", "m.gguf", "--port", "7999", "--share", "never", "--device", "cpu",
                                      "--kv-cache-tokens", "2048", "--max-tokens", "64"])
    assert (args.command, args.model, args.port, args.share, args.device) == ("gradio", "m.gguf", 7999, "never",
                                                                              "cpu")
    assert args.kv_cache_tokens == 2048 and args.max_tokens == 64 and args.host == "127.0.0.1"
    assert main(["gradio", str(tmp_path / "missing.gguf")]) == 2
    err = capsys.readouterr().err
    assert "missing.gguf" in err and "Traceback" not in err
    monkeypatch.setitem(sys.modules, "gradio", None)
    assert main(["gradio", str(tmp_path / "missing.gguf")]) == 2
    assert "asyncllm[gradio]" in capsys.readouterr().err
