"""Carrying an HTTP request to an ASGI app in another process and its response back, as plain values.

``ForwardedRequest`` is what a router sends (method, path, query, headers, whole body); ``run_asgi`` runs
it through an ASGI app in the current event loop and yields the response as a ``ResponseStart`` followed
by body chunks. ``ReplyCollector`` reads a chat reply's text and finish reason from those chunks (one JSON
body, or server-sent events).

Invariants of ``run_asgi``: the first item is always a ``ResponseStart`` (a 500 one if the app failed
before answering); when the consumer stops early, the app sees ``http.disconnect`` (so it aborts its
engine requests) and is cancelled if it has not finished within ``DISCONNECT_GRACE`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from asyncllm.adapters.errors import SERVER_ERROR, error_body

Headers = tuple[tuple[bytes, bytes], ...]

DISCONNECT_GRACE = 5.0
"""Seconds an app gets to wind down after its consumer went away, before it is cancelled."""


@dataclass(frozen=True)
class ForwardedRequest:
    """One HTTP request with its whole body."""

    method: str
    path: str
    query_string: bytes = b""
    headers: Headers = ()
    body: bytes = b""

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode("latin-1")
        for key, value in self.headers:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return None

    def with_body(self, body: bytes) -> ForwardedRequest:
        """The same request with another body (``Content-Length`` adjusted)."""
        headers = tuple((k, v) for k, v in self.headers if k.lower() != b"content-length")
        return ForwardedRequest(self.method, self.path, self.query_string,
                                (*headers, (b"content-length", str(len(body)).encode())), body)


@dataclass(frozen=True)
class ResponseStart:
    status: int
    headers: Headers = ()

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode("latin-1")
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == wanted), None)


def _scope(request: ForwardedRequest) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": request.method, "scheme": "http", "path": request.path,
            "raw_path": request.path.encode("utf-8"), "query_string": request.query_string,
            "root_path": "", "headers": [(k.lower(), v) for k, v in request.headers],
            "client": None, "server": None}


async def run_asgi(app: Any, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
    """Serve ``request`` with the ASGI ``app``: a ``ResponseStart``, then the non-empty body chunks."""
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_read = False

    async def receive() -> dict[str, Any]:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await queue.put(message)

    async def serve() -> None:
        try:
            await app(_scope(request), receive, send)
        finally:
            await queue.put(None)

    task = asyncio.ensure_future(serve())
    started = False
    try:
        while True:
            message = await queue.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                started = True
                yield ResponseStart(int(message["status"]),
                                    tuple((bytes(k), bytes(v)) for k, v in message.get("headers", ())))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
        if not started:
            body = error_body("internal error: the app did not answer", type=SERVER_ERROR, code="internal_error")
            yield ResponseStart(500, ((b"content-type", b"application/json"),))
            yield json.dumps(body).encode()
    finally:
        gone.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), DISCONNECT_GRACE)
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            await task


@dataclass
class ReplyCollector:
    """The text and finish reason of choice 0 of a chat reply, read from its body chunks.

    ``streaming``: the body is server-sent events (``data: <json>`` chunks with ``delta.content``);
    otherwise one JSON body with ``message.content``. An error body or event leaves ``finish_reason``
    ``None``.
    """

    streaming: bool
    text: str = ""
    finish_reason: str | None = None
    _buffer: bytearray = field(default_factory=bytearray)

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        if not self.streaming:
            return
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                return
            event, self._buffer = bytes(self._buffer[:end]), self._buffer[end + 2:]
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self._event(line[5:].strip())

    def _event(self, data: bytes) -> None:
        if data == b"[DONE]":
            return
        try:
            body = json.loads(data)
        except ValueError:
            return
        for choice in body.get("choices") or () if isinstance(body, dict) else ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                delta = choice.get("delta") or {}
                content = delta.get("content") if isinstance(delta, dict) else None
                if isinstance(content, str):
                    self.text += content
                if choice.get("finish_reason") is not None:
                    self.finish_reason = str(choice["finish_reason"])

    def finish(self) -> None:
        """Read a whole (non-streamed) body; call once after the last chunk."""
        if self.streaming:
            return
        try:
            body = json.loads(bytes(self._buffer))
            choice = body["choices"][0]
            self.text = str(choice["message"]["content"])
            self.finish_reason = str(choice["finish_reason"])
        except (ValueError, KeyError, IndexError, TypeError):
            self.finish_reason = None


def error_code(body: bytes) -> str | None:
    """The ``error.code`` of an OpenAI error body, or ``None``."""
    try:
        value = json.loads(body)
        code = value["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None
