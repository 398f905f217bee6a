"""The Gradio chat UI in headless Chromium (Playwright): multi-turn context, Stop freeing the KV, independent
tabs, and the URL back end against our OpenAI-compatible server. The UI runs on the tiny engine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gradio")
playwright_api = pytest.importorskip("playwright.sync_api")

from asyncllm.adapters.gradio import EngineBackend, EngineConversation, chat_ui  # noqa: E402

from ._support import running_server, wait_until  # noqa: E402

DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"
SCREENSHOTS_ENV = "ASYNCLLM_UPDATE_SCREENSHOTS"
"""Set to 1 to refresh docs/images from this run; otherwise screenshots go to the test's temporary folder."""


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where this run's screenshots go: docs/images when asked for (``ASYNCLLM_UPDATE_SCREENSHOTS=1``), else
    a temporary folder, so a test run never rewrites tracked files."""
    return DOCS_IMAGES if os.environ.get(SCREENSHOTS_ENV) == "1" else tmp_path


def _chromium() -> str | None:
    explicit = os.environ.get("ASYNCLLM_CHROMIUM")
    if explicit:
        return explicit
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium binary (apt-get install chromium; "
                                                        "or set ASYNCLLM_CHROMIUM)")


class RecordingBackend(EngineBackend):
    """An engine back end that keeps every conversation it opens, for the tests to inspect."""

    def __init__(self, engine: Any, **sampling: Any) -> None:
        super().__init__(engine, **sampling)
        self.conversations: list[EngineConversation] = []

    def new_conversation(self, system: str | None) -> EngineConversation:
        conversation = super().new_conversation(system)
        self.conversations.append(conversation)
        return conversation


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def launched(backend: Any, **options: Any) -> Iterator[str]:
    """Serve ``chat_ui(backend)`` on a free local port in Gradio's own server thread; always shut down."""
    demo = chat_ui(backend, **options)
    port = _free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        share=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        engine_loop = getattr(backend, "loop", None)
        if isinstance(backend, EngineBackend) and engine_loop is not None and engine_loop.is_running():
            asyncio.run_coroutine_threadsafe(backend.engine.aclose(), engine_loop).result(timeout=30)
        demo.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    yield context.new_page()
    context.close()


def send(page: Any, text: str) -> None:
    page.locator("#message textarea").fill(text)
    page.locator("#send").click()


def wait_for_replies(page: Any, count: int, timeout: float = 30_000) -> None:
    """Wait until ``count`` replies carry their usage line (each ends with 'tok/s')."""
    page.locator("#chatbot").get_by_text("tok/s").nth(count - 1).wait_for(timeout=timeout)


def set_slider(page: Any, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    if not box.is_visible():
        page.locator("#settings").get_by_text("Settings").first.click()  # open the accordion
    page.locator(f"#{elem_id} input[type=number]").fill(str(value))
    page.locator(f"#{elem_id} input[type=number]").press("Enter")


def test_two_turns_keep_the_first_in_context(make_tiny_engine: Any, page: Any, screenshots: Path) -> None:
    engine = make_tiny_engine()
    backend = RecordingBackend(engine, ignore_eos=True, seed=0)
    with launched(backend, default_max_tokens=12, system_prompt="Be brief.") as url:
        page.goto(url)
        send(page, "Name a river.")
        wait_for_replies(page, 1)
        send(page, "And a mountain?")
        wait_for_replies(page, 2)
        screenshots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshots / "gradio-chat.png"))
        text = page.locator("#chatbot").inner_text()

    assert len(backend.conversations) == 1
    conversation = backend.conversations[0]
    messages = conversation.session.messages
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "Be brief." and messages[1]["content"] == "Name a river."
    assert conversation.usage is not None and conversation.usage.cached_tokens > 0  # turn 2 reused turn 1's KV
    # turn 2's prompt is the rendered transcript, turn 1 included
    tokens = engine.tokenizer.apply_chat_template(messages[:4], add_generation_prompt=True)
    assert conversation.usage.prompt_tokens == len(tokens)
    assert f"({conversation.usage.cached_tokens} reused)" in text
    assert text.count("completion tokens") == 2


def test_stop_aborts_the_request_and_frees_its_kv(make_tiny_engine: Any, page: Any, screenshots: Path) -> None:
    engine = make_tiny_engine()
    backend = RecordingBackend(engine, ignore_eos=True, temperature=0.0)
    with launched(backend, default_max_tokens=1900) as url:
        page.goto(url)
        send(page, "Tell me a long story.")
        wait_until(lambda: engine.stats().running == 1, timeout=20)
        wait_until(lambda: engine.stats().kv_blocks_used >= 3, timeout=20)  # some tokens decoded
        started = time.monotonic()
        page.locator("#stop").click()
        wait_until(lambda: engine.stats().running == 0 and engine.stats().kv_blocks_used == 0, timeout=10)
        freed_after = time.monotonic() - started
        page.screenshot(path=str(screenshots / "gradio-stop.png"))
        session = backend.conversations[0].session
        assert not session.busy and session.messages == []  # the stopped reply is not part of the context
        assert engine.stats().sessions_pinned == 0
        # the tab can go on: the next turn runs on the same session
        set_slider(page, "max_tokens", 8)
        send(page, "Short one.")
        wait_for_replies(page, 1)
        assert [m["role"] for m in session.messages] == ["user", "assistant"]
        assert len(backend.conversations) == 1
        # Clear closes the tab's session and releases its pinned KV
        assert engine.stats().kv_blocks_used > 0
        page.locator("#clear").click()
        wait_until(lambda: engine.stats().sessions_pinned == 0 and engine.stats().kv_blocks_used == 0, timeout=10)
    assert freed_after < 10


def test_two_tabs_hold_independent_conversations(make_tiny_engine: Any, browser: Any) -> None:
    engine = make_tiny_engine()
    backend = RecordingBackend(engine, ignore_eos=True, temperature=0.0)
    context = browser.new_context()
    most_running = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal most_running
        while not done.wait(0.002):
            most_running = max(most_running, engine.stats().running)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with launched(backend, default_max_tokens=400) as url:
            first, second = context.new_page(), context.new_page()
            first.goto(url)
            second.goto(url)
            send(first, "I am tab one.")
            send(second, "I am tab two.")
            wait_for_replies(first, 1)
            wait_for_replies(second, 1)
            send(first, "Still tab one.")
            wait_for_replies(first, 2)
            first_text = first.locator("#chatbot").inner_text()
            second_text = second.locator("#chatbot").inner_text()
    finally:
        done.set()
        watcher.join()
        context.close()
    assert most_running == 2  # the two tabs' replies were decoded in the same batch
    assert len(backend.conversations) == 2
    sessions = {c.session.messages[0]["content"]: c.session for c in backend.conversations}
    assert sessions.keys() == {"I am tab one.", "I am tab two."}
    one, two = sessions["I am tab one."], sessions["I am tab two."]
    assert one.id != two.id
    assert [m["content"] for m in one.messages if m["role"] == "user"] == ["I am tab one.", "Still tab one."]
    assert [m["content"] for m in two.messages if m["role"] == "user"] == ["I am tab two."]
    assert "tab two" not in first_text and "tab one" not in second_text


def test_url_backend_against_our_server(make_tiny_engine: Any, page: Any) -> None:
    pytest.importorskip("uvicorn")
    from asyncllm.adapters.asgi import create_app

    engine = make_tiny_engine()
    app = create_app(engine, model_name="tiny")
    with running_server(app) as server_url, launched(server_url + "/v1", default_max_tokens=10) as url:
        page.goto(url)
        send(page, "Hello over HTTP.")
        wait_for_replies(page, 1)
        send(page, "Again.")
        wait_for_replies(page, 2)
        text = page.locator("#chatbot").inner_text()
        assert "reused)" in text  # the server-side session kept turn 1's KV for turn 2
        assert engine.stats().sessions_pinned == 1
        page.locator("#clear").click()  # DELETE /v1/sessions/{id}
        wait_until(lambda: engine.stats().sessions_pinned == 0, timeout=10)
