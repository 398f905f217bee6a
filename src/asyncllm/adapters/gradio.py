"""A Gradio chat UI over an in-process ``AsyncEngine`` or any OpenAI-compatible server (extra ``gradio``).

``chat_ui(backend)`` returns a ``gradio.Blocks``. Each browser tab holds its own conversation in a
``gr.State``: against an engine, one ``Session`` whose KV stays pinned between turns; against a URL, one
server-side session (the ``session_id`` field of ``/v1/chat/completions``, which ``asyncllm serve``
accepts; other servers are sent the whole transcript instead when ``server_sessions=False``). Tabs share
the engine, so their turns are batched together.

Stop cancels the handler that streams the reply; closing its stream aborts the engine request (or drops
the HTTP connection, which makes our server abort it). A stopped or failed reply stays on screen but is
not part of the model's context: a ``Session`` records only finished turns. Clear closes the tab's
conversation (releasing its KV), and so does closing the tab.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from asyncllm.engine import AsyncEngine
    from asyncllm.session import Session

MISSING_GRADIO = "the Gradio chat UI needs the 'gradio' extra: pip install 'asyncllm[gradio]'"

UPDATE_INTERVAL = 0.05
"""Seconds between UI updates while a reply streams (deltas arriving in between are sent together)."""


def _import_gradio() -> Any:
    try:
        import gradio
    except ImportError as error:
        raise ImportError(f"{MISSING_GRADIO} ({error})") from error
    return gradio


@dataclass
class TurnUsage:
    """Token counts of one reply; ``cached_tokens`` are prompt tokens whose KV was reused."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: str | None


class Conversation(Protocol):
    """One tab's chat with a back end. ``stream`` yields text deltas; ``usage`` is set once it ends."""

    usage: TurnUsage | None

    def stream(self, content: str, *, temperature: float, top_p: float, max_tokens: int) -> AsyncIterator[str]:
        ...

    async def close(self) -> None:
        ...


class ChatBackend(Protocol):
    def new_conversation(self, system: str | None) -> Conversation:
        ...

    @property
    def max_tokens_limit(self) -> int:
        ...


# -- in-process engine ---------------------------------------------------------------------------------
class EngineConversation:
    """A ``Session`` on an in-process engine."""

    def __init__(self, engine: AsyncEngine, system: str | None, extra: dict[str, Any]) -> None:
        self.session: Session = engine.session(system=system)
        self.usage: TurnUsage | None = None
        self._extra = extra

    async def stream(self, content: str, *, temperature: float, top_p: float,
                     max_tokens: int) -> AsyncIterator[str]:
        self.usage = None
        sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, **self._extra}
        stream = self.session.stream_detailed(content, **sampling)
        try:
            async for out in stream:
                if out.text:
                    yield out.text
                if out.usage is not None:
                    self.usage = TurnUsage(out.usage.prompt_tokens, out.usage.completion_tokens,
                                           out.usage.cached_tokens, out.finish_reason)
        finally:
            await stream.aclose()  # aborts the request when the stream did not finish (Stop, tab closed)

    async def close(self) -> None:
        await self.session.close()


class EngineBackend:
    """Conversations as ``Session``s of ``engine``; ``sampling`` (e.g. ``seed=0``, ``stop=[...]``) is added to
    every turn and wins over the UI's sliders. The engine starts in the UI server's event loop on the first
    turn (``loop`` records it)."""

    def __init__(self, engine: AsyncEngine, **sampling: Any) -> None:
        self.engine = engine
        self.sampling = sampling
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def max_tokens_limit(self) -> int:
        return int(self.engine.max_model_len)

    def new_conversation(self, system: str | None) -> EngineConversation:
        self.loop = asyncio.get_running_loop()
        return EngineConversation(self.engine, system, self.sampling)


# -- OpenAI-compatible server -----------------------------------------------------------------------------
class HTTPConversation:
    """A chat against ``/v1/chat/completions`` with ``stream: true``.

    With ``server_sessions``, the first turn sends the system message and the user message with a new
    ``session_id`` and later turns send only the new user message (the server keeps the transcript and its
    KV); otherwise every turn sends the whole transcript.
    """

    def __init__(self, backend: OpenAIBackend, system: str | None) -> None:
        self._backend = backend
        self.session_id = f"gradio-{uuid.uuid4().hex}" if backend.server_sessions else None
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self._started = False
        self.usage: TurnUsage | None = None

    async def stream(self, content: str, *, temperature: float, top_p: float,
                     max_tokens: int) -> AsyncIterator[str]:
        self.usage = None
        user = {"role": "user", "content": content}
        body: dict[str, Any] = {
            "model": self._backend.model, "stream": True, "stream_options": {"include_usage": True},
            "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, **self._backend.extra_body,
        }
        if self.session_id is not None:
            body["session_id"] = self.session_id
            body["messages"] = [user] if self._started else [*self.messages, user]
        else:
            body["messages"] = [*self.messages, user]
        text: list[str] = []
        finish: str | None = None
        client = self._backend.client()
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise RuntimeError(_error_message(response))
            self._started = True
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise RuntimeError(str(chunk["error"].get("message", chunk["error"])))
                for choice in chunk.get("choices") or ():
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        text.append(delta)
                        yield delta
                    finish = choice.get("finish_reason") or finish
                usage = chunk.get("usage")
                if usage:
                    details = usage.get("prompt_tokens_details") or {}
                    self.usage = TurnUsage(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                                           details.get("cached_tokens") or 0, finish)
        if self.usage is not None:
            self.usage.finish_reason = finish
        if finish in ("stop", "length"):
            self.messages += [user, {"role": "assistant", "content": "".join(text)}]

    async def close(self) -> None:
        if self.session_id is not None and self._started:
            with contextlib.suppress(Exception):
                await self._backend.client().delete(f"/v1/sessions/{self.session_id}")


def _error_message(response: Any) -> str:
    try:
        return f"{response.status_code}: {response.json()['error']['message']}"
    except Exception:
        return f"{response.status_code}: {response.text[:500]}"


class OpenAIBackend:
    """Conversations against the OpenAI-compatible server at ``base_url`` (with or without ``/v1``)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, model: str | None = None,
                 server_sessions: bool = True, max_tokens_limit: int = 4096, timeout: float = 600.0,
                 transport: Any = None, **extra_body: Any) -> None:
        url = base_url.rstrip("/")
        self.base_url = url[:-3] if url.endswith("/v1") else url
        self.api_key = api_key
        self.model = model
        self.server_sessions = server_sessions
        self.extra_body = extra_body
        self._max_tokens_limit = max_tokens_limit
        self._timeout = timeout
        self._transport = transport
        self._client: Any = None

    @property
    def max_tokens_limit(self) -> int:
        return self._max_tokens_limit

    def client(self) -> Any:
        """One ``httpx.AsyncClient`` for every tab, created in the UI server's event loop."""
        if self._client is None:
            import httpx

            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=self._timeout,
                                             transport=self._transport)
        return self._client

    async def resolve_model(self) -> None:
        """Use the server's first model when none was given."""
        if self.model is None:
            response = await self.client().get("/v1/models")
            response.raise_for_status()
            self.model = response.json()["data"][0]["id"]

    def new_conversation(self, system: str | None) -> HTTPConversation:
        return HTTPConversation(self, system)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def as_backend(backend: Any) -> Any:
    """An ``AsyncEngine`` becomes an ``EngineBackend``, a URL string an ``OpenAIBackend``; a back end as is."""
    if isinstance(backend, str):
        return OpenAIBackend(backend)
    from asyncllm.engine import AsyncEngine

    if isinstance(backend, AsyncEngine):
        return EngineBackend(backend)
    if hasattr(backend, "new_conversation"):
        return backend
    raise TypeError(f"backend: expected an AsyncEngine, a base URL or a chat back end, got {type(backend)!r}")


def usage_line(usage: TurnUsage | None, seconds: float, stopped: bool) -> str:
    """The line shown under a reply: token counts and decode speed."""
    if usage is None:
        return "stopped" if stopped else ""
    rate = usage.completion_tokens / seconds if seconds > 0 else 0.0
    reused = f" ({usage.cached_tokens} reused)" if usage.cached_tokens else ""
    return (f"{usage.prompt_tokens} prompt tokens{reused} · {usage.completion_tokens} completion tokens "
            f"in {seconds:.2f} s · {rate:.1f} tok/s")


class _Tab:
    """What one browser tab holds in its ``gr.State``: its conversation, opened on the first turn."""

    def __init__(self) -> None:
        self.conversation: Conversation | None = None

    async def close(self) -> None:
        conversation, self.conversation = self.conversation, None
        if conversation is not None:
            await conversation.close()


def chat_ui(
    backend: Any,
    *,
    title: str = "asyncllm chat",
    system_prompt: str | None = None,
    default_temperature: float = 0.7,
    default_top_p: float = 0.95,
    default_max_tokens: int = 256,
) -> Any:
    """A ``gradio.Blocks`` chat over ``backend``: an ``AsyncEngine``, the base URL of an OpenAI-compatible
    server, or an ``EngineBackend`` / ``OpenAIBackend`` built with extra options.

    Launch it like any Blocks (``chat_ui(engine).launch()``); its handlers run in the Gradio server's event
    loop, so an engine passed in must not already be running in another loop.
    """
    gr = _import_gradio()
    chat_backend = as_backend(backend)
    limit = max(1, int(chat_backend.max_tokens_limit))
    tabs: dict[str, _Tab] = {}  # Gradio session hash -> the tab's state, to close it when the tab goes

    async def respond(message: str, history: list[Any], tab: _Tab | None, system: str, temperature: float,
                      top_p: float, max_tokens: float, request: gr.Request) -> AsyncIterator[Any]:
        history = list(history or [])
        message = (message or "").strip()
        if not message:
            yield history, tab, gr.update()
            return
        if tab is None:
            tab = _Tab()
        if request is not None and request.session_hash:
            tabs[request.session_hash] = tab
        if tab.conversation is None:
            if isinstance(chat_backend, OpenAIBackend):
                await chat_backend.resolve_model()
            tab.conversation = chat_backend.new_conversation(system.strip() or None)
        conversation = tab.conversation
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield history, tab, ""
        parts: list[str] = []
        start = time.perf_counter()
        last_update = start
        stopped = True
        try:
            async for delta in conversation.stream(message, temperature=float(temperature), top_p=float(top_p),
                                                   max_tokens=int(max_tokens)):
                parts.append(delta)
                now = time.perf_counter()
                if now - last_update >= UPDATE_INTERVAL:
                    last_update = now
                    history[-1] = {"role": "assistant", "content": "".join(parts)}
                    yield history, tab, gr.update()
            stopped = False
        except Exception as error:
            history[-1] = {"role": "assistant", "content": "".join(parts) + f"\n\n*error: {error}*"}
            yield history, tab, gr.update()
            return
        finally:
            if stopped:
                # Stop pressed (this generator was cancelled): the reply ends here, outside the context.
                history[-1] = {"role": "assistant", "content": "".join(parts)}
        seconds = time.perf_counter() - start
        line = usage_line(conversation.usage, seconds, stopped=False)
        reply = "".join(parts)
        history[-1] = {"role": "assistant", "content": f"{reply}\n\n*{line}*" if line else reply}
        yield history, tab, gr.update()

    async def clear(tab: _Tab | None) -> tuple[list[Any], _Tab | None, str]:
        if tab is not None:
            await tab.close()
        return [], tab, ""

    async def unload(request: gr.Request) -> None:
        tab = tabs.pop(request.session_hash, None) if request is not None else None
        if tab is not None:
            await tab.close()

    # Gradio finds its request argument by resolved annotation; ``gr`` is local here, so give it the class.
    respond.__annotations__ = {"request": gr.Request}
    unload.__annotations__ = {"request": gr.Request}

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}")
        chatbot = gr.Chatbot(label="chat", elem_id="chatbot", height=420)
        state = gr.State(None)
        with gr.Row():
            box = gr.Textbox(placeholder="Message", show_label=False, scale=6, elem_id="message")
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            stop = gr.Button("Stop", scale=1, elem_id="stop")
            new = gr.Button("Clear", scale=1, elem_id="clear")
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            system = gr.Textbox(label="System prompt (applies from the next new chat)", value=system_prompt or "",
                                lines=2, elem_id="system")
            temperature = gr.Slider(0.0, 2.0, value=default_temperature, step=0.05, label="Temperature",
                                    elem_id="temperature")
            top_p = gr.Slider(0.05, 1.0, value=default_top_p, step=0.05, label="Top-p", elem_id="top_p")
            max_tokens = gr.Slider(1, limit, value=min(default_max_tokens, limit), step=1, label="Max tokens",
                                   elem_id="max_tokens")
        inputs = [box, chatbot, state, system, temperature, top_p, max_tokens]
        outputs = [chatbot, state, box]
        submitted = box.submit(respond, inputs, outputs, concurrency_limit=None)
        clicked = send.click(respond, inputs, outputs, concurrency_limit=None)
        stop.click(None, cancels=[submitted, clicked])
        new.click(clear, [state], [chatbot, state, box], cancels=[submitted, clicked])
        demo.unload(unload)
    demo.chat_backend = chat_backend  # type: ignore[attr-defined]
    return demo
