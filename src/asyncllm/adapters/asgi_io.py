"""ASGI plumbing: size-limited JSON bodies, client-disconnect watching and a server-sent-events response.

Disconnects are detected by reading ``receive`` for ``http.disconnect`` concurrently with the work, not
by a failing ``send`` (servers may drop writes to a closed connection silently), so an abandoned request
is cancelled while it is still queued or generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from asyncllm.adapters.errors import APIError

T = TypeVar("T")

DONE = "[DONE]"


class ClientDisconnected(Exception):
    """The client closed the connection before the response was complete."""


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request body parsed as JSON; 413 when it exceeds ``max_bytes`` (by ``Content-Length`` or as
    streamed), 400 when it is not valid UTF-8 JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(max_bytes)
            chunks.append(chunk)
    except ClientDisconnect as error:
        raise ClientDisconnected() from error
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from error


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body exceeds {max_bytes} bytes", code="request_too_large")


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once the client has gone (the request body must already be consumed)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ``ClientDisconnected``."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


def sse_event(data: Mapping[str, Any] | str) -> bytes:
    """``data: <json>\\n\\n`` (``json.dumps`` never emits raw newlines, so one ``data:`` line suffices)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + payload.encode("utf-8") + b"\n\n"


class EventStreamResponse(Response):
    """A ``text/event-stream`` response over ``events`` that stops (closing ``events``, which must release
    whatever it holds in its ``finally``) as soon as the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[Mapping[str, Any] | str], *,
                 headers: Mapping[str, str] | None = None) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        pump = asyncio.ensure_future(self._pump(send))
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not pump.done():
                pump.cancel()
            await asyncio.gather(pump, watcher, return_exceptions=True)
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        if pump.done() and not pump.cancelled() and pump.exception() is not None:
            error = pump.exception()
            if not isinstance(error, OSError):
                raise error  # type: ignore[misc]

    async def _pump(self, send: Send) -> None:
        async for event in self._events:
            await send({"type": "http.response.body", "body": sse_event(event), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
