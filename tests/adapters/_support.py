"""Helpers for the adapter tests: in-process ASGI clients, a real uvicorn server in a thread, and parsers
for server-sent events and the Prometheus text format written from their specifications."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

GREEDY = {"temperature": 0.0, "ignore_eos": True}


@contextlib.asynccontextmanager
async def asgi_client(app: Any, api_key: str | None = None) -> AsyncIterator[Any]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://asgi", headers=headers,
                                 timeout=60) as client:
        yield client


@contextlib.contextmanager
def running_server(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn (lifespan on) on 127.0.0.1 and a free port; always shut down."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="on", log_level="warning", timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        if thread.is_alive():
            raise RuntimeError("uvicorn did not shut down")


class ManualClock:
    """A monotonic clock that moves only when told to: pass it as ``create_app(..., clock=...)``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self.now += seconds


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> float:
    """Poll ``predicate`` until true; return the seconds it took; ``TimeoutError`` after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(interval)
    return time.monotonic() - start


async def async_wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.005)


def parse_sse(text: str) -> list[Any]:
    """Events of a ``text/event-stream`` body that uses only ``data:`` fields: JSON objects or ``"[DONE]"``.

    Checks the framing: every event is a single ``data: `` line followed by a blank line.
    """
    if not text.endswith("\n\n"):
        raise ValueError("stream does not end with a blank line")
    events: list[Any] = []
    for block in text[:-2].split("\n\n"):
        lines = block.split("\n")
        if len(lines) != 1 or not lines[0].startswith("data: "):
            raise ValueError(f"bad event framing: {block!r}")
        payload = lines[0][len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_prometheus(text: str) -> tuple[Samples, dict[str, str]]:
    """Samples keyed by (name, sorted labels) and each metric family's TYPE, per the 0.0.4 text format."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
            continue
        if line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise ValueError(f"bad sample line: {line!r}")
        name, _, label_text, value = match.groups()
        labels = tuple(sorted(_LABEL.findall(label_text or "")))
        samples[(name, labels)] = float(value.replace("+Inf", "inf"))
    return samples, types
