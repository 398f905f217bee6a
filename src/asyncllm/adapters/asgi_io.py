"""ASGI plumbing: checked JSON bodies, client-disconnect watching and a server-sent-events response.

A JSON body is accepted only with ``Content-Type: application/json`` (optionally ``; charset=utf-8``), so a
web page cannot make a browser send it without a CORS preflight; it is at most ``max_bytes`` long, nests at
most ``max_depth`` levels and holds only strings that encode as UTF-8 (JSON's ``\\ud800`` escapes can
produce lone surrogates, which no tokenizer can encode). Each rejection is an ``APIError`` naming the
problem, and the offending field where there is one.

Disconnects are detected by reading ``receive`` for ``http.disconnect`` concurrently with the work, not
by a failing ``send`` (servers may drop writes to a closed connection silently), so an abandoned request
is cancelled while it is still queued or generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from asyncllm.adapters.errors import APIError

T = TypeVar("T")

DONE = "[DONE]"

MAX_JSON_DEPTH = 32
"""The deepest nesting of arrays and objects a request body may have (a chat request needs 4)."""

JSON_MEDIA_TYPE = "application/json"

_ASCII_DIGITS = re.compile(r"[0-9]+")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ClientDisconnected(Exception):
    """The client closed the connection before the response was complete."""


def check_json_content_type(content_type: str | None) -> None:
    """415 unless ``content_type`` is ``application/json``, with at most a ``charset=utf-8`` parameter."""
    media_type, *parameters = (content_type or "").split(";")
    ok = media_type.strip().lower() == JSON_MEDIA_TYPE
    for parameter in parameters:
        if not parameter.strip():  # a stray ";"
            continue
        name, _, value = parameter.partition("=")
        if name.strip().lower() != "charset" or value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            ok = False
    if not ok:
        shown = "none" if content_type is None else repr(content_type)
        raise APIError(415, f"Content-Type: must be {JSON_MEDIA_TYPE} (optionally with charset=utf-8), got "
                       f"{shown}", param="Content-Type", code="unsupported_media_type")


async def read_json(request: Request, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The request body parsed as JSON and checked by ``check_json_value``: 415 for a wrong Content-Type,
    413 when it exceeds ``max_bytes`` (by ``Content-Length`` or as streamed), 400 when it is not valid UTF-8
    JSON, nests deeper than ``max_depth`` or holds a string that does not encode as UTF-8."""
    check_json_content_type(request.headers.get("content-type"))
    declared = request.headers.get("content-length", "").strip()
    if _ASCII_DIGITS.fullmatch(declared) and (len(declared) > 18 or int(declared) > max_bytes):
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
        value = json.loads(b"".join(chunks))
    except RecursionError as error:
        raise _too_deep(max_depth, None) from error
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise APIError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from error
    check_json_value(value, max_depth)
    return value


def json_path(parts: tuple[str | int, ...]) -> str:
    """``("messages", 0, "content")`` -> ``messages[0].content``; keys that are not identifiers are quoted
    (``["a b"]``) with non-ASCII escaped, so a path is always printable."""
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _IDENTIFIER.fullmatch(part):
            path += f".{part}" if path else part
        else:
            path += "[" + json.dumps(part[:64] + ("..." if len(part) > 64 else "")) + "]"
    return path


def check_json_value(value: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """400 unless every array and object in ``value`` is nested at most ``max_depth`` levels deep (the top
    level is level 1) and every string, object keys included, encodes as UTF-8; ``param`` names the first
    offending field. Iterative, so no input can exhaust the stack."""
    stack: list[tuple[Any, int, tuple[str | int, ...]]] = [(value, 0, ())]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, (dict, list)):
            if depth + 1 > max_depth:
                raise _too_deep(max_depth, path)
            if isinstance(item, dict):
                for key, child in item.items():
                    _check_text(key, (*path, key))
                    stack.append((child, depth + 1, (*path, key)))
            else:
                stack.extend((child, depth + 1, (*path, i)) for i, child in enumerate(item))


def _check_text(text: str, path: tuple[str | int, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        where = json_path(path) or "the request body"
        char = text[error.start]
        raise APIError(400, f"{where}: must be valid Unicode text; it holds the unpaired surrogate "
                       f"U+{ord(char):04X} at index {error.start}", param=json_path(path) or None,
                       code="invalid_string") from None


def _too_deep(max_depth: int, path: tuple[str | int, ...] | None) -> APIError:
    where = json_path(path) if path else ""
    if where:
        return APIError(400, f"{where}: nests JSON deeper than {max_depth} levels", param=where,
                        code="json_too_deep")
    return APIError(400, f"the request body nests JSON deeper than {max_depth} levels", code="json_too_deep")


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body exceeds {max_bytes} bytes", code="request_too_large")


class SafeJSONResponse(JSONResponse):
    """A ``JSONResponse`` whose body is always encodable: a lone surrogate is sent as its JSON escape."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
        return text.encode("utf-8", "backslashreplace")


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
    return b"data: " + payload.encode("utf-8", "backslashreplace") + b"\n\n"


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
