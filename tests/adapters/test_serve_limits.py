"""Per-API-key session caps and the server's max_tokens default and cap, in process (httpx +
ASGITransport) on the tiny random Llama, plus the session registry's eviction order on its own."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from asyncllm.adapters.asgi import create_app
from asyncllm.adapters.sessions import SessionGoneError, SessionLimitError, SessionRegistry
from asyncllm.adapters.settings import ServerSettings

from ._support import GREEDY, asgi_client, async_wait_until

USER = [{"role": "user", "content": "Name three rivers."}]
URL = "/v1/chat/completions"


class _FakeSession:
    def __init__(self) -> None:
        self.busy = False
        self.closed = False

    async def close(self) -> None:
        assert not self.busy, "a busy session was closed"
        self.closed = True


class _FakeEngine:
    def session(self, messages: Any) -> _FakeSession:
        return _FakeSession()


async def test_registry_evicts_within_the_key_first_and_never_a_busy_session() -> None:
    registry = SessionRegistry(_FakeEngine(), max_sessions=4, max_sessions_per_key=3,  # type: ignore[arg-type]
                               idle_timeout=60.0)
    b1 = registry.create(("b", "1"), [])
    b2 = registry.create(("b", "2"), [])
    b1.busy = True  # type: ignore[attr-defined]
    for i in range(10):  # key a churns through its own cap: only its own sessions are evicted
        registry.create(("a", str(i)), [])
        await registry.flush()
        assert registry.get(("b", "1")) is b1 and registry.get(("b", "2")) is b2
        assert registry.count("a") == min(i + 1, 2)  # the global cap (4) leaves a two of its three
    assert registry.count("b") == 2 and len(registry) == 4
    with pytest.raises(SessionGoneError):
        registry.get(("a", "0"))

    # the global cap forces an eviction for a key with no idle session: the globally least recently used
    # idle session goes (a9: a8 is busy and b2 was used since), and b's busy session stays
    registry.get(("a", "8")).busy = True  # type: ignore[union-attr]
    registry.touch(("b", "2"))
    registry.create(("c", "1"), [])
    await registry.flush()
    with pytest.raises(SessionGoneError):
        registry.get(("a", "9"))
    assert registry.get(("b", "1")) is b1 and registry.get(("b", "2")) is b2 and not b1.closed
    assert registry.get(("a", "8")) is not None and registry.count("c") == 1


async def test_registry_full_of_busy_sessions_refuses_instead_of_evicting() -> None:
    registry = SessionRegistry(_FakeEngine(), max_sessions=3, max_sessions_per_key=2,  # type: ignore[arg-type]
                               idle_timeout=60.0)
    for i in range(2):
        registry.create(("a", str(i)), []).busy = True  # type: ignore[attr-defined]
    with pytest.raises(SessionLimitError, match="of this API key"):  # a is at its own cap, all busy
        registry.create(("a", "x"), [])
    b = registry.create(("b", "1"), [])  # b is unaffected by a's busy sessions
    b.busy = True  # type: ignore[attr-defined]
    with pytest.raises(SessionLimitError, match="all 3 sessions"):
        registry.create(("c", "1"), [])
    assert len(registry) == 3


async def test_one_key_cannot_evict_or_block_another_keys_sessions(make_tiny_engine: Any) -> None:
    engine = make_tiny_engine()
    app = create_app(engine, api_keys=["sk-a", "sk-b"], max_sessions=3, max_sessions_per_key=2)
    turn = {"messages": USER, "max_tokens": 2, **GREEDY}
    try:
        async with asgi_client(app, "sk-a") as a, asgi_client(app, "sk-b") as b:
            assert (await b.post(URL, json={"session_id": "b-idle", **turn})).status_code == 200
            for i in range(5):  # a fills its cap again and again
                r = await a.post(URL, json={"session_id": f"a{i}", **turn})
                assert r.status_code == 200, r.text
            r = await b.post(URL, json={"session_id": "b-idle", "messages": USER, "max_tokens": 2})
            assert r.status_code == 200, r.text  # b's session survived a's churn

            # b opens a session with a long turn at the global cap (3): b's own idle session makes room
            long_turn = asyncio.ensure_future(b.post(URL, json={
                "session_id": "b-busy", "messages": USER, "max_tokens": 2000, **GREEDY}))
            registry = app.state.server.sessions
            await async_wait_until(lambda: registry.get((1, "b-busy")) is not None and engine.stats().running == 1)
            assert len(registry) == 3 and registry.count(0) == 2  # a keeps its two sessions
            with pytest.raises(SessionGoneError):
                registry.get((1, "b-idle"))
            for i in range(5, 9):
                r = await a.post(URL, json={"session_id": f"a{i}", **turn})
                assert r.status_code == 200, r.text
            assert registry.get((1, "b-busy")) is not None and registry.get((1, "b-busy")).busy
            assert registry.count(1) == 1 and registry.count(0) == 2
            # a session of a's with a turn in progress blocks only a: b can still open one
            assert (await b.post(URL, json={"session_id": "b-new", **turn})).status_code == 200
            long_turn.cancel()
            await asyncio.gather(long_turn, return_exceptions=True)
    finally:
        await engine.aclose()


async def test_default_max_tokens_and_the_per_request_cap(make_tiny_engine: Any) -> None:
    assert ServerSettings().default_max_tokens == 512
    with pytest.raises(ValueError, match="default_max_tokens"):
        ServerSettings(default_max_tokens=100, max_tokens_limit=50)
    engine = make_tiny_engine()
    app = create_app(engine, default_max_tokens=7, max_tokens_limit=20)
    try:
        async with asgi_client(app) as client:
            r = await client.post("/v1/completions", json={"prompt": "Hello", **GREEDY})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 7
            r = await client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 20, **GREEDY})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20
            for field, endpoint, body in (
                ("max_tokens", "/v1/completions", {"prompt": "Hello"}),
                ("max_tokens", URL, {"messages": USER}),
                ("max_completion_tokens", URL, {"messages": USER}),
                ("max_tokens", URL, {"messages": USER, "session_id": "s"}),
            ):
                r = await client.post(endpoint, json={**body, field: 21})
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert error["param"] == field and field in error["message"] and "20" in error["message"]
            r = await client.post(URL, json={"messages": USER, "session_id": "s", **GREEDY})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 7
    finally:
        await engine.aclose()
