"""The HTTP edge against hostile bodies: every malformed input is a 4xx naming the field or the problem.

First the classes of input an attacker used, one test each (lone surrogates from ``\\ud800`` escapes, deep
nesting, Unicode digits, bare ``NaN`` tokens, wrong Content-Type); then a property-based fuzz of random JSON
shapes sent to both generation routes next to innocent requests on the same engine. The properties come
from the API contract (docs/asgi.md, "Errors"), not from the implementation: no response is a 5xx, every
error is OpenAI's error object whose ``param`` names a field (or whose ``code`` names a body-level problem),
innocent requests complete normally, and the engine ends with no KV block in use.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncllm.adapters.asgi import create_app
from asyncllm.adapters.asgi_io import MAX_JSON_DEPTH

from ._support import GREEDY, asgi_client, parse_sse

T = TypeVar("T")

JSON = {"content-type": "application/json"}
USER = [{"role": "user", "content": "hi"}]
BODY_LEVEL_CODES = {"invalid_json", "json_too_deep", "request_too_large", "unsupported_media_type"}
"""Errors about the body as a whole, which name the problem in ``code`` rather than a field."""


def names_a_field(status: int, error: dict[str, Any]) -> bool:
    """A 400 names its field as ``param`` and starts its message with it; 404/409/413/415 name theirs in
    ``param`` or ``code``."""
    param, message, code = error["param"], error["message"], error["code"]
    if isinstance(param, str) and param:
        return status != 400 or message.startswith(param + ":")
    return code in BODY_LEVEL_CODES


def assert_client_error(response: Any, status: int | None = None, param: str | None = None) -> dict[str, Any]:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    if status is not None:
        assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = json.loads(response.content.decode("utf-8"))["error"]  # strict UTF-8: a body is always encodable
    assert set(error) == {"message", "type", "param", "code"}
    assert names_a_field(response.status_code, error), error
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.fixture
async def served(make_tiny_engine: Any) -> Any:
    engine = make_tiny_engine()
    app = create_app(engine, model_name="tiny", default_max_tokens=2)
    try:
        yield engine, app
    finally:
        await engine.aclose()


# -- the classes, one at a time ------------------------------------------------------------------
async def test_lone_surrogates_in_any_string_of_any_route_are_400_naming_the_field(served: Any) -> None:
    engine, app = served
    cases = [
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
         "messages[0].content[0].text"),
        ("/v1/chat/completions", '{"messages": [{"role": "user\\ud800", "content": "x"}]}', "messages[0].role"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "model": "\\ud800"}', "model"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "session_id": "s\\udc00"}',
         "session_id"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "user": "\\ud800"}', "user"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "stop": ["ok", "\\ud800"]}',
         "stop[1]"),
        ("/v1/completions", '{"prompt": "\\ud800"}', "prompt"),
        ("/v1/completions", '{"prompt": ["\\ud800"]}', "prompt[0]"),
        ("/v1/completions", '{"prompt": "x", "stop": "\\udbff"}', "stop"),
        ("/v1/completions", '{"prompt": "x", "unknown_field": {"deeper": ["\\ud800"]}}', "unknown_field.deeper[0]"),
        ("/v1/completions", '{"prompt": "x", "\\ud800": 1}', '["\\ud800"]'),
        ("/v1/completions", '{"prompt": "x", "logit_bias": {"\\ud800": 1}}', 'logit_bias["\\ud800"]'),
        ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
        ("/tokenize", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
        ("/detokenize", '{"tokens": [1], "model": "\\ud800"}', "model"),
    ]
    async with asgi_client(app) as client:
        for url, body, param in cases:
            error = assert_client_error(await client.post(url, content=body, headers=JSON), 400, param)
            assert error["code"] == "invalid_string" and "U+D" in error["message"]
        # a correctly paired escape is one ordinary character
        r = await client.post("/tokenize", content='{"prompt": "\\ud83d\\ude00"}', headers=JSON)
        assert r.status_code == 200 and r.json()["tokens"] == engine.tokenizer.encode("\U0001F600")
    assert engine.stats().kv_blocks_used == 0


async def test_deep_nesting_is_400_and_the_limit_is_exact(served: Any) -> None:
    engine, app = served

    def nested(depth: int) -> str:  # ``depth`` levels of arrays, as the value of a top-level field
        return "[" * depth + "]" * depth

    async with asgi_client(app) as client:
        for depth in (100_000, 5_000, 990):  # beyond the C parser's recursion limit: RecursionError before
            error = assert_client_error(await client.post("/v1/completions", content=nested(depth),
                                                          headers=JSON), 400)
            assert error["code"] == "json_too_deep" and str(MAX_JSON_DEPTH) in error["message"]
        body = '{"prompt": "x", "max_tokens": 1, "extra": %s}'
        r = await client.post("/v1/completions", content=body % nested(MAX_JSON_DEPTH - 1), headers=JSON)
        assert r.status_code == 200, r.text  # the object is level 1, so the arrays reach MAX_JSON_DEPTH
        error = assert_client_error(await client.post(
            "/v1/completions", content=body % nested(MAX_JSON_DEPTH), headers=JSON), 400)
        assert error["code"] == "json_too_deep" and error["param"].startswith("extra[0]")
        for url in ("/v1/chat/completions", "/tokenize", "/detokenize"):
            error = assert_client_error(await client.post(url, content=nested(50), headers=JSON), 400)
            assert error["code"] == "json_too_deep"
    assert engine.stats().kv_blocks_used == 0


async def test_numbers_json_allows_python_to_produce_are_rejected_by_field(served: Any) -> None:
    _, app = served
    async with asgi_client(app) as client:
        async def post(fields: str) -> Any:
            return await client.post("/v1/completions", content='{"prompt": "x", "max_tokens": 1, ' + fields + "}",
                                     headers=JSON)
        assert_client_error(await post('"temperature": NaN'), 400, "temperature")
        assert_client_error(await post('"top_p": -Infinity'), 400, "top_p")
        assert_client_error(await post('"temperature": 1e400'), 400, "temperature")  # parses as inf
        assert_client_error(await post('"temperature": 1e300'), 400, "temperature")
        assert (await post('"temperature": 5e-324')).status_code == 200  # below the greedy epsilon: greedy
        assert_client_error(await post('"logit_bias": {"5": NaN}'), 400, "logit_bias")
        assert_client_error(await post('"logit_bias": {"\\u00b2": 1}'), 400, "logit_bias")
        assert_client_error(await post('"logit_bias": {"\\u0661": 1}'), 400, "logit_bias")
        assert_client_error(await post('"seed": 1' + "0" * 5000), 400)  # beyond int's digit limit
        assert_client_error(await post('"max_tokens": true'), 400, "max_tokens")
        assert_client_error(await post('"n": 1.0'), 400, "n")
        r = await post('"temperature": -0.0, "presence_penalty": -0.0, "top_p": 1e-300, "NaNfield": NaN')
        assert r.status_code == 200, r.text  # valid extremes, and an unknown field holding NaN is ignored


async def test_json_routes_require_application_json(served: Any) -> None:
    engine, app = served
    body = json.dumps({"messages": USER, "max_tokens": 1, **GREEDY})
    async with asgi_client(app) as client:
        for content_type in ("text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
                             "multipart/form-data; boundary=x", "application/jsonx",
                             "application/json; charset=latin-1", "application/json; foo=bar", ""):
            for url in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"):
                error = assert_client_error(await client.post(url, content=body,
                                                              headers={"content-type": content_type}), 415)
                assert error["code"] == "unsupported_media_type" and error["param"] == "Content-Type"
        assert_client_error(await client.post("/v1/chat/completions", content=body), 415)  # no header at all
        assert not engine.is_running  # a cross-site form post never reached the engine
        for content_type in ("application/json", 'Application/JSON; Charset="UTF-8"',
                             "application/json;charset=utf8", "application/json; charset=utf-8;"):
            r = await client.post("/v1/chat/completions", content=body, headers={"content-type": content_type})
            assert r.status_code == 200, (content_type, r.text)


async def test_bogus_content_length_is_not_a_500(served: Any) -> None:
    """"²" passes ``str.isdigit()`` (headers are latin-1) but not ``int()``; call the ASGI app directly, as an
    HTTP client library would refuse to send such a header."""
    _, app = served
    body = b'{"prompt": "hello"}'
    for length in (b"\xb2", b"\xb9\xb3", b"-5", b" 99999999999999999999999 "):
        status = await _raw_post(app, "/tokenize", body, [(b"content-type", b"application/json"),
                                                            (b"content-length", length)])
        assert status in (200, 413), (length, status)


async def _raw_post(app: Any, path: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "server": ("asgi", 80), "client": ("127.0.0.1", 1), "headers": [(b"host", b"asgi"), *headers]}
    await app(scope, receive, send)
    return int(sent[0]["status"])


# -- the fuzz ------------------------------------------------------------------------------------
DEEP = "\x00DEEP\x00"
HUGE_INT = "\x00HUGEINT\x00"

surrogate = st.integers(0xD800, 0xDFFF).map(chr)
texts = st.one_of(
    st.text(max_size=12),
    st.builds(lambda a, s, b: a + s + b, st.text(max_size=4), surrogate, st.text(max_size=4)),
    st.sampled_from(["\u00b2", "\u0661", "12", "-1", " 3", "user", "system", "assistant", "tiny", "text"]),
)
numbers = st.one_of(
    st.integers(-(10**30), 10**30),
    st.sampled_from([0, 1, 2, -1, 2**63, 2**64, -(2**63) - 1, 10**100, True, False]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e300, -1e300, -0.0, 5e-324, 2.2250738585072014e-308, 1e-45, float("nan"), float("inf")]),
)
scalars = st.one_of(st.none(), numbers, texts)
json_values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=12,
)
wild = st.one_of(json_values, st.sampled_from([DEEP, HUGE_INT]))


def bodies(field: Any, texts: st.SearchStrategy[str], ids: st.SearchStrategy[list[int]]
           ) -> tuple[st.SearchStrategy[dict[str, Any]], st.SearchStrategy[dict[str, Any]]]:
    """(chat bodies, completion bodies) whose values come from ``field(plausible values)``."""
    messages = st.lists(
        st.fixed_dictionaries(
            {"role": field(st.sampled_from(["user", "system", "assistant", "developer"])),
             "content": field(st.one_of(texts, st.lists(st.fixed_dictionaries(
                 {"type": field(st.just("text")), "text": field(texts)}), max_size=3)))},
            optional={"name": field(texts)}),
        min_size=1, max_size=3)
    generation = {
        "model": field(st.just("tiny")),
        "max_tokens": field(st.integers(1, 3)),
        "max_completion_tokens": field(st.integers(1, 3)),
        "temperature": field(st.floats(0, 2)),
        "top_p": field(st.floats(0, 1, exclude_min=True)),
        "top_k": field(st.integers(-1, 50)),
        "min_p": field(st.floats(0, 1)),
        "n": field(st.integers(1, 3)),
        "stream": field(st.booleans()),
        "stream_options": field(st.fixed_dictionaries({"include_usage": field(st.booleans())})),
        "stop": field(st.one_of(texts, st.lists(texts, max_size=3))),
        "stop_token_ids": field(ids),
        "seed": field(st.integers(-(2**63), 2**64 - 4)),
        "presence_penalty": field(st.floats(-2, 2)),
        "frequency_penalty": field(st.floats(-2, 2)),
        "repetition_penalty": field(st.floats(0.5, 2)),
        "logit_bias": field(st.dictionaries(st.integers(0, 40).map(str), st.floats(-100, 100), max_size=3)),
        "logprobs": field(st.one_of(st.booleans(), st.integers(0, 20))),
        "top_logprobs": field(st.integers(0, 20)),
        "min_tokens": field(st.integers(0, 2)),
        "ignore_eos": field(st.booleans()),
        "skip_special_tokens": field(st.booleans()),
        "user": field(texts),
        "session_id": field(texts),
    }
    chat = st.fixed_dictionaries({"messages": field(messages)}, optional=generation)
    completion = st.fixed_dictionaries({"prompt": field(st.one_of(texts, ids, st.lists(texts, max_size=2)))},
                                       optional=generation)
    return chat, completion


CLEAN_CHAT, CLEAN_COMPLETION = bodies(lambda s: s, st.text(max_size=12),
                                      st.lists(st.integers(0, 40), min_size=1, max_size=6))
HOSTILE_CHAT, HOSTILE_COMPLETION = bodies(lambda s: st.one_of(s, s, wild), texts,
                                          st.lists(st.integers(-2, 40), max_size=6))
FIELD_NAMES = ["messages", "prompt", "model", "max_tokens", "temperature", "top_p", "n", "stream",
               "stream_options", "stop", "stop_token_ids", "seed", "logit_bias", "logprobs", "top_logprobs",
               "min_tokens", "user", "session_id", "unknown"]
content_types = st.sampled_from(["application/json"] * 8 + ["application/json; charset=utf-8", "text/plain", ""])


@st.composite
def attacks(draw: Any) -> tuple[str, bytes, str]:
    chat = draw(st.booleans())
    kind = draw(st.sampled_from(["plain", "clean", "one wild field", "hostile", "anything"]))
    if kind == "plain":
        body = {"messages": [{"role": "user", "content": draw(st.text(max_size=20))}]} if chat else \
            {"prompt": draw(st.text(min_size=1, max_size=20))}
        body.update(max_tokens=draw(st.integers(1, 3)), stream=draw(st.booleans()))
    elif kind == "anything":
        body = draw(wild)
    elif kind == "hostile":
        body = draw(HOSTILE_CHAT if chat else HOSTILE_COMPLETION)
    else:
        body = draw(CLEAN_CHAT if chat else CLEAN_COMPLETION)
        if kind == "one wild field":
            body[draw(st.sampled_from(FIELD_NAMES))] = draw(wild)
    text = json.dumps(body, ensure_ascii=True, allow_nan=True)  # surrogates as \udXXX escapes, bare NaN tokens
    depth = draw(st.sampled_from([MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, 3000]))
    text = text.replace(json.dumps(DEEP), "[" * depth + "]" * depth)
    text = text.replace(json.dumps(HUGE_INT), "9" * 5000)
    url = "/v1/chat/completions" if chat else "/v1/completions"
    return url, text.encode("utf-8"), draw(content_types)


class LoopThread:
    """One event loop in a thread for the whole fuzz run, so every example shares one engine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    runner = LoopThread()
    try:
        yield runner
    finally:
        runner.close()


def test_fuzzed_bodies_are_2xx_or_4xx_naming_a_field_next_to_innocent_requests(
        make_tiny_engine: Any, loop_thread: LoopThread) -> None:
    engine = make_tiny_engine()
    app = create_app(engine, model_name="tiny", default_max_tokens=2, max_body_bytes=64 * 1024)
    innocent = {"messages": USER, "max_tokens": 2, **GREEDY}
    seen: dict[int, int] = {}

    async def exchange(url: str, body: bytes, content_type: str) -> None:
        async with asgi_client(app) as client:
            attack, good = await asyncio.gather(
                client.post(url, content=body, headers={"content-type": content_type}),
                client.post("/v1/chat/completions", json=innocent))
        seen[attack.status_code] = seen.get(attack.status_code, 0) + 1
        assert good.status_code == 200, good.text
        good_body = good.json()
        assert good_body["choices"][0]["finish_reason"] == "length"
        assert good_body["usage"]["completion_tokens"] == 2
        if attack.status_code == 200:
            if attack.headers["content-type"].startswith("text/event-stream"):
                events = parse_sse(attack.content.decode("utf-8"))
                assert events[-1] == "[DONE]"
                assert not any(isinstance(e, dict) and "error" in e for e in events), events
            else:
                reply = attack.json()
                assert reply["choices"] and reply["usage"]["completion_tokens"] >= 0
        else:
            assert_client_error(attack)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(attacks())
    def check(case: tuple[str, bytes, str]) -> None:
        loop_thread.run(exchange(*case))

    try:
        check()

        async def finish() -> None:
            await app.state.server.sessions.aclose()
            for _ in range(200):  # aborted requests release their blocks on the engine's next step
                if engine.stats().kv_blocks_used == 0 and engine.stats().running == 0:
                    break
                await asyncio.sleep(0.01)
        loop_thread.run(finish())
        stats = engine.stats()
        assert stats.kv_blocks_used == 0 and stats.running == 0 and stats.waiting == 0, stats
        assert engine.failure is None
        assert seen.get(200, 0) > 0 and any(400 <= s < 500 for s in seen), seen  # both sides were exercised
    finally:
        loop_thread.run(engine.aclose())
