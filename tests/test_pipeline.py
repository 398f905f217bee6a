"""``asyncllm.pipeline``: the synchronous batch API over a private event loop thread, on the tiny engine."""

from __future__ import annotations

import _thread
import asyncio
import gc
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import asyncllm
from asyncllm import AsyncEngine, Completion, EngineClosedError

pipeline_module = sys.modules["asyncllm.pipeline"]  # ``asyncllm.pipeline`` is the factory function

PROMPTS = ["Hello there", "The cat sat on", "Once upon a time", "What is the weather"]
CHATS = [[{"role": "user", "content": "Hi"}], [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Name a river."}]]
GREEDY = {"max_tokens": 12, "temperature": 0}


async def _reference(engine: AsyncEngine, prompts: list[Any]) -> list[Completion]:
    """Each prompt alone through ``engine.generate`` (one at a time) in the calling loop."""
    async with engine:
        return [await engine.generate(prompt, **GREEDY) for prompt in prompts]


def _wait_idle(pipe: asyncllm.Pipeline, timeout: float = 10.0) -> asyncllm.EngineStats:
    deadline = time.monotonic() + timeout
    while True:
        stats = pipe.stats()
        if (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


@pytest.fixture
def pipe(make_tiny_engine: Callable[..., AsyncEngine]) -> Any:
    with asyncllm.pipeline(make_tiny_engine()) as p:
        yield p


def test_single_prompt_list_and_chat_match_engine_generate(
        pipe: asyncllm.Pipeline, make_tiny_engine: Callable[..., AsyncEngine]) -> None:
    expected = asyncio.run(_reference(make_tiny_engine(), [*PROMPTS, *CHATS]))
    single = pipe(PROMPTS[1], **GREEDY)
    assert isinstance(single, Completion)
    assert (single.text, single.token_ids) == (expected[1].text, expected[1].token_ids)
    batch = pipe(PROMPTS, **GREEDY)
    assert [c.token_ids for c in batch] == [c.token_ids for c in expected[:4]]
    assert [c.text for c in batch] == [c.text for c in expected[:4]]
    assert pipe.chat(CHATS[1], **GREEDY).token_ids == expected[5].token_ids
    assert [c.token_ids for c in pipe.chat(CHATS, **GREEDY)] == [c.token_ids for c in expected[4:]]
    assert pipe([], **GREEDY) == []


async def test_works_when_called_from_inside_a_running_event_loop(
        make_tiny_engine: Callable[..., AsyncEngine]) -> None:
    asyncio.get_running_loop()  # a running loop in this thread, as in a Jupyter cell
    expected = await _reference(make_tiny_engine(), PROMPTS[:2])
    with asyncllm.pipeline(make_tiny_engine()) as pipe:
        assert [c.token_ids for c in pipe(PROMPTS[:2], **GREEDY)] == [c.token_ids for c in expected]
        assert "".join(pipe.stream(PROMPTS[0], **GREEDY)) == expected[0].text


def test_stream_yields_the_text_of_the_non_streamed_call(pipe: asyncllm.Pipeline) -> None:
    whole = pipe(PROMPTS[2], max_tokens=20, temperature=0)
    stream = pipe.stream(PROMPTS[2], max_tokens=20, temperature=0)
    deltas = list(stream)
    assert len(deltas) > 1 and "".join(deltas) == whole.text
    assert stream.completion is not None and stream.completion.token_ids == whole.token_ids


def test_breaking_out_of_the_stream_aborts_the_request(pipe: asyncllm.Pipeline) -> None:
    seen = []
    for text in pipe.stream(PROMPTS[0], max_tokens=1000, ignore_eos=True, temperature=0):
        seen.append(text)
        if len(seen) == 2:
            break
    stats = _wait_idle(pipe)
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)
    with pipe.stream(PROMPTS[0], max_tokens=1000, ignore_eos=True) as stream:  # closing via ``with``
        next(stream)
    stats = _wait_idle(pipe)
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)
    assert pipe(PROMPTS[0], max_tokens=3, ignore_eos=True).usage.completion_tokens == 3  # still serving


def test_close_joins_the_thread_and_closes_the_engine(make_tiny_engine: Callable[..., AsyncEngine]) -> None:
    engine = make_tiny_engine()
    pipe = asyncllm.pipeline(engine)
    thread = pipe.thread
    assert thread.is_alive() and thread.daemon
    pipe(PROMPTS[0], max_tokens=2)
    pipe.close()
    assert not thread.is_alive() and engine.is_closed and pipe.closed
    pipe.close()  # idempotent
    with pytest.raises(EngineClosedError, match="pipeline is closed"):
        pipe(PROMPTS[0])
    with pytest.raises(EngineClosedError, match="pipeline is closed"):
        pipe.stream(PROMPTS[0])
    with pytest.raises(ValueError, match="already started"):
        asyncllm.pipeline(_started_elsewhere(make_tiny_engine()))

    # dropping the last reference frees it too
    dropped = asyncllm.pipeline(make_tiny_engine())
    thread = dropped.thread
    del dropped
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


def _started_elsewhere(engine: AsyncEngine) -> AsyncEngine:
    async def start() -> None:
        await engine.start()

    loop = asyncio.new_event_loop()
    loop.run_until_complete(start())
    loop.run_until_complete(engine.aclose())
    loop.close()
    engine._closing = False  # closed, but bound to that loop: the pipeline must refuse it
    return engine


def test_calling_from_the_pipeline_loop_thread_is_refused(pipe: asyncllm.Pipeline) -> None:
    async def call() -> None:
        pipe(PROMPTS[0], max_tokens=2)

    future = asyncio.run_coroutine_threadsafe(call(), pipe._loop)
    with pytest.raises(RuntimeError, match="own event loop thread"):
        future.result(timeout=10)


def test_bad_arguments_raise_before_anything_is_submitted(
        pipe: asyncllm.Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    submitted: list[Any] = []
    submit = pipe.engine.submit
    monkeypatch.setattr(pipe.engine, "submit", lambda *a, **k: submitted.append(a) or submit(*a, **k))
    with pytest.raises(ValueError, match=r"^temperature"):
        pipe(PROMPTS, temperature=-1)
    with pytest.raises(ValueError, match=r"^max_tokens"):
        pipe.stream(PROMPTS[0], max_tokens=0)
    with pytest.raises(TypeError, match=r"^temprature"):
        pipe(PROMPTS[0], temprature=0)
    with pytest.raises(ValueError, match=r"^prompts\[2\]: prompt"):
        pipe([PROMPTS[0], PROMPTS[1], ""], max_tokens=2)
    with pytest.raises(ValueError, match=r"^messages\[1\]"):
        pipe.chat([CHATS[0], "not a conversation"], max_tokens=2)
    with pytest.raises(ValueError, match=r"^progress"):
        pipe(PROMPTS, progress="yes")
    assert submitted == []
    # a prompt longer than the context is refused when the requests are created, before any starts
    with pytest.raises(ValueError, match=r"^prompts\[1\]"):
        pipe([PROMPTS[0], [5] * (pipe.engine.max_model_len + 1)], max_tokens=2)
    assert len(submitted) == 2 and _wait_idle(pipe).running == 0


def test_progress_bar_on_off_and_auto(pipe: asyncllm.Pipeline, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pipe(PROMPTS[:3], max_tokens=2, progress=True)
    assert "3/3" in capsys.readouterr().err
    pipe(PROMPTS * 2, max_tokens=2, progress=False)
    assert capsys.readouterr().err == ""
    pipe(PROMPTS * 2, max_tokens=2)  # auto: stderr is not a TTY here
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(pipeline_module, "_stderr_is_tty", lambda: True)
    pipe(PROMPTS * 2, max_tokens=2)
    assert "8/8" in capsys.readouterr().err
    pipe(PROMPTS, max_tokens=2)  # auto: fewer than 8 prompts
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs the main thread")
def test_ctrl_c_during_a_batch_aborts_its_requests(pipe: asyncllm.Pipeline) -> None:
    stop = threading.Event()

    def interrupt_once_decoding() -> None:  # Ctrl-C while the batch is running, however loaded the machine
        while not stop.is_set():
            if pipe.stats().running > 0:
                _thread.interrupt_main()
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=interrupt_once_decoding, daemon=True)
    watcher.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            pipe(PROMPTS, max_tokens=1500, ignore_eos=True)
    finally:
        stop.set()
        watcher.join()
    stats = _wait_idle(pipe)
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)
    assert pipe(PROMPTS[0], max_tokens=2, ignore_eos=True).usage.completion_tokens == 2
