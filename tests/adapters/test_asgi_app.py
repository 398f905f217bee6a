"""The OpenAI-compatible app in process (httpx + ASGITransport) on the tiny random Llama.

References are independent: a second engine with the same weights driven through the Python API
(``engine.generate``), the tokenizer itself, and the OpenAI API reference for shapes and status codes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from asyncllm import AsyncEngine
from asyncllm.adapters.asgi import create_app

from ..core._tokenizers import word_piece_only_bias
from ._support import GREEDY, ManualClock, asgi_client, async_wait_until, parse_prometheus, parse_sse

KEY = "sk-test-key"
USER = [{"role": "user", "content": "Name three rivers."}]


@pytest.fixture
async def engines(make_tiny_engine: Any) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    """(served engine, reference engine with the same weights and no prefix caching)."""
    served, reference = make_tiny_engine(), make_tiny_engine(enable_prefix_caching=False)
    try:
        yield served, reference
    finally:
        await served.aclose()
        await reference.aclose()


async def test_chat_and_completions_equal_engine_generate(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    served, reference = engines
    app = create_app(served, model_name="tiny", api_keys=[KEY])
    assert not served.is_running  # the engine starts lazily, on the first request
    async with asgi_client(app, KEY) as client:
        r = await client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": USER, "max_tokens": 12, **GREEDY})
        assert r.status_code == 200, r.text
        assert served.is_running
        body = r.json()
        expected = await reference.generate(USER, max_tokens=12, **GREEDY)
        assert body["object"] == "chat.completion" and body["model"] == "tiny"
        assert body["id"].startswith("chatcmpl-")
        choice = body["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": expected.text}
        assert choice["finish_reason"] == expected.finish_reason == "length"
        assert body["usage"]["prompt_tokens"] == expected.usage.prompt_tokens
        assert body["usage"]["completion_tokens"] == 12
        assert body["usage"]["total_tokens"] == expected.usage.prompt_tokens + 12

        text_prompt = "The quick brown fox"
        ids = served.tokenizer.encode(text_prompt)
        expected = await reference.generate(text_prompt, max_tokens=9, **GREEDY)
        for prompt in (text_prompt, [text_prompt], ids, [ids]):
            r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 9, **GREEDY})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
            assert body["choices"][0]["text"] == expected.text
            assert body["usage"]["prompt_tokens"] == len(ids)

        # stop strings are honoured exactly as the engine honours them
        stop = expected.text[3:6]
        if stop.strip():
            r = await client.post("/v1/completions", json={
                "prompt": text_prompt, "max_tokens": 9, "stop": [stop], **GREEDY})
            with_stop = await reference.generate(text_prompt, max_tokens=9, stop=[stop], **GREEDY)
            assert r.json()["choices"][0]["text"] == with_stop.text
            assert r.json()["choices"][0]["finish_reason"] == "stop"


async def test_n_choices_use_seed_plus_index(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    served, reference = engines
    params = {"temperature": 1.0, "top_p": 0.9, "max_tokens": 8, "ignore_eos": True}
    async with asgi_client(create_app(served)) as client:
        r = await client.post("/v1/completions", json={
            "prompt": "Once upon a time", "n": 3, "seed": 41, **params})
        assert r.status_code == 200, r.text
        texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
        expected = [(await reference.generate("Once upon a time", seed=41 + i, **params)).text
                    for i in range(3)]
        assert texts == expected
        assert r.json()["usage"]["completion_tokens"] == 24


async def test_logprobs_match_the_engine(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    served, reference = engines
    expected = await reference.generate(USER, max_tokens=4, logprobs=3, **GREEDY)
    assert expected.logprobs is not None
    decode = served.tokenizer.decode
    async with asgi_client(create_app(served)) as client:
        r = await client.post("/v1/chat/completions", json={
            "messages": USER, "max_tokens": 4, "logprobs": True, "top_logprobs": 3, **GREEDY})
        content = r.json()["choices"][0]["logprobs"]["content"]
        assert len(content) == 4
        for entry, lp in zip(content, expected.logprobs, strict=True):
            token = decode([lp.token_id], skip_special_tokens=False)
            assert entry["token"] == token and entry["bytes"] == list(token.encode())
            assert entry["logprob"] == pytest.approx(lp.logprob, abs=1e-5)
            assert [t["token"] for t in entry["top_logprobs"]] == [
                decode([t], skip_special_tokens=False) for t, _ in lp.top]
            top_values = [t["logprob"] for t in entry["top_logprobs"]]
            assert top_values == pytest.approx([v for _, v in lp.top], abs=1e-5)

        r = await client.post("/v1/completions", json={
            "prompt": [1, 2, 3], "max_tokens": 3, "logprobs": 2, **GREEDY})
        lp_json = r.json()["choices"][0]["logprobs"]
        reference_ids = (await reference.generate([1, 2, 3], max_tokens=3, **GREEDY)).token_ids
        tokens = [decode([t], skip_special_tokens=False) for t in reference_ids]
        assert lp_json["tokens"] == tokens
        assert lp_json["text_offset"] == [sum(len(t) for t in tokens[:i]) for i in range(3)]
        tops = lp_json["top_logprobs"]
        assert all(len(top) <= 2 and tok in top for tok, top in zip(tokens, tops, strict=True))


async def test_sse_framing_for_chat_with_two_choices(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    served, reference = engines
    expected = await reference.generate(USER, max_tokens=10, **GREEDY)
    async with asgi_client(create_app(served)) as client:
        r = await client.post("/v1/chat/completions", json={
            "messages": USER, "max_tokens": 10, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}, **GREEDY})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    usage_event = events[-2]
    assert usage_event["choices"] == [] and usage_event["usage"]["completion_tokens"] == 20
    assert usage_event["usage"]["prompt_tokens"] == expected.usage.prompt_tokens
    chunks = events[:-2]
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks)
    assert len({c["id"] for c in events[:-1]}) == 1
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"].get("role") == "assistant"
        assert all("role" not in c["delta"] for c in mine[1:])
        finishing = [c for c in mine if c["finish_reason"] is not None]
        assert len(finishing) == 1 and finishing[0] is mine[-1] and finishing[0]["finish_reason"] == "length"
        assert "".join(c["delta"].get("content", "") for c in mine) == expected.text


async def test_streamed_completion_without_usage(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    served, reference = engines
    expected = await reference.generate("Hello", max_tokens=6, **GREEDY)
    async with asgi_client(create_app(served)) as client:
        r = await client.post("/v1/completions", json={
            "prompt": "Hello", "max_tokens": 6, "stream": True, **GREEDY})
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and "usage" not in c and len(c["choices"]) == 1
               for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.text
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("length") == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_every_error_status_and_the_server_keeps_serving(make_tiny_engine: Any) -> None:
    engine = make_tiny_engine(max_num_seqs=1)
    app = create_app(engine, model_name="tiny", api_keys=[KEY, "sk-second"], max_body_bytes=2048,
                     max_waiting=1)

    async def ok(client: Any) -> None:
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, **GREEDY})
        assert r.status_code == 200, r.text

    def check(r: Any, status: int, param: str | None = None, code: str | None = None) -> None:
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param
        if code is not None:
            assert error["code"] == code

    try:
        async with asgi_client(app, KEY) as client:
            url = "/v1/chat/completions"
            check(await client.post(url, json={"messages": USER, "temperature": -1}), 400, "temperature")
            await ok(client)
            check(await client.post(url, content=b"{not json", headers={"content-type": "application/json"}),
                  400, None, "invalid_json")
            check(await client.post(url, json=["a list"]), 400, None, "invalid_json")
            check(await client.post(url, json={"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://x"}}]}]}), 400, "messages[0].content[0]")
            check(await client.post(url, json={"messages": [{"role": "user", "content": "word " * 500}],
                                               "max_tokens": 4}), 413)
            long_ids = [5] * engine.max_model_len
            async with asgi_client(create_app(engine, max_body_bytes=1 << 20)) as big:
                check(await big.post("/v1/completions", json={"prompt": long_ids}), 400, "prompt",
                      "context_length_exceeded")
                too_many = {"prompt": [5] * 10, "max_tokens": engine.max_model_len}
                check(await big.post("/v1/completions", json=too_many), 400, "max_tokens",
                      "context_length_exceeded")
                too_many = {"messages": USER, "max_completion_tokens": engine.max_model_len}
                check(await big.post("/v1/chat/completions", json=too_many), 400, "max_completion_tokens",
                      "context_length_exceeded")
            await ok(client)
            check(await client.post(url, json={"messages": USER, "model": "gpt-4"}), 404, "model",
                  "model_not_found")
            check(await client.get("/v1/models/gpt-4"), 404, "model", "model_not_found")
            check(await client.delete("/v1/sessions/nope"), 404, "session_id", "session_not_found")
            check(await client.get("/v1/unknown"), 404)

            async def chunked() -> AsyncIterator[bytes]:
                for _ in range(10):
                    yield b" " * 300
            check(await client.post(url, content=chunked(), headers={"content-type": "application/json"}), 413, None,
                  "request_too_large")
            await ok(client)

            async with asgi_client(app) as anonymous, asgi_client(app, "sk-wrong") as wrong:
                check(await anonymous.post(url, json={"messages": USER}), 401, None, "invalid_api_key")
                check(await wrong.post(url, json={"messages": USER}), 401, None, "invalid_api_key")
                check(await wrong.get("/v1/models"), 401, None, "invalid_api_key")
                check(await wrong.post("/tokenize", json={"prompt": "x"}), 401, None, "invalid_api_key")
                assert (await anonymous.get("/health")).status_code == 200
                assert (await anonymous.get("/metrics")).status_code == 200
            async with asgi_client(app, "sk-second") as second:
                await ok(second)

            # 503: with one sequence slot, a running and a waiting request reach max_waiting=1
            running = engine.stream_detailed("Once", max_tokens=2000, ignore_eos=True)
            waiting = engine.stream_detailed("Twice", max_tokens=2000, ignore_eos=True)
            first = asyncio.ensure_future(running.__anext__())
            second_task = asyncio.ensure_future(waiting.__anext__())
            await async_wait_until(lambda: engine.stats().waiting >= 1 and engine.stats().running == 1)
            r = await client.post(url, json={"messages": USER, "max_tokens": 2})
            check(r, 503, None, "overloaded")
            assert r.headers["retry-after"] == "1"
            for task in (first, second_task):
                task.cancel()
            await asyncio.gather(first, second_task, return_exceptions=True)
            await running.aclose()
            await waiting.aclose()
            await async_wait_until(lambda: engine.stats().running == 0 and engine.stats().waiting == 0)
            await ok(client)

            samples, _ = parse_prometheus((await client.get("/metrics")).text)
            statuses = {dict(labels)["status"] for (name, labels) in samples
                        if name == "asyncllm_http_requests_total"}
            assert {"200", "400", "401", "404", "413", "503"} <= statuses

            await engine.aclose()
            check(await client.get("/health"), 503, None, "engine_unavailable")
            check(await client.post(url, json={"messages": USER}), 503, None, "engine_unavailable")
    finally:
        await engine.aclose()


async def test_engine_closing_mid_stream_sends_an_error_event(make_tiny_engine: Any) -> None:
    engine = make_tiny_engine()
    async with asgi_client(create_app(engine)) as client:
        request = asyncio.ensure_future(client.post("/v1/completions", json={
            "prompt": "Once upon a time", "max_tokens": 2000, "stream": True, **GREEDY}))
        # a second KV block in use: past the prompt and a dozen streamed tokens
        await async_wait_until(lambda: engine.stats().running == 1 and engine.stats().kv_blocks_used >= 2)
        await engine.aclose()
        r = await request
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "engine_unavailable" and error["type"] == "server_error"
    assert all("choices" in e for e in events[:-2]) and len(events) > 3


async def test_models_tokenize_detokenize(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    served, _ = engines
    tok = served.tokenizer
    async with asgi_client(create_app(served, model_name="smol", api_keys=[KEY]), KEY) as client:
        models = (await client.get("/v1/models")).json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["smol"]
        assert (await client.get("/v1/models/smol")).json()["id"] == "smol"

        r = await client.post("/tokenize", json={"prompt": "Hello world, héllo"})
        assert r.json()["tokens"] == tok.encode("Hello world, héllo")
        assert r.json()["count"] == len(r.json()["tokens"])
        assert r.json()["max_model_len"] == served.max_model_len
        r = await client.post("/tokenize", json={"messages": USER})
        assert r.json()["tokens"] == tok.apply_chat_template(USER, add_generation_prompt=True)
        chat_ids = r.json()["tokens"]
        r = await client.post("/detokenize", json={"tokens": chat_ids})
        assert r.json()["prompt"] == tok.render_chat(USER, add_generation_prompt=True)
        r = await client.post("/detokenize", json={"tokens": chat_ids, "skip_special_tokens": True})
        assert r.json()["prompt"] == tok.decode(chat_ids, skip_special_tokens=True)
        assert (await client.post("/detokenize", json={"tokens": [10**9]})).status_code == 400
        assert (await client.post("/tokenize", json={"prompt": "x", "model": "other"})).status_code == 404


async def test_session_turns_reuse_kv_and_match_stateless_generation(
        engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    served, reference = engines
    system = {"role": "system", "content": "You are terse."}
    first_user = {"role": "user", "content": "Name a river."}
    second_user = {"role": "user", "content": "How long is it?"}
    # replies the re-rendered transcript repeats token for token (see ``word_piece_only_bias``)
    bias = word_piece_only_bias(served.tokenizer)
    params = {"max_tokens": 8, "temperature": 0.0, "logit_bias": {str(t): b for t, b in bias.items()}}
    async with asgi_client(create_app(served)) as client:
        url = "/v1/chat/completions"
        r1 = await client.post(url, json={"session_id": "conv-1", "messages": [system, first_user], **params})
        assert r1.status_code == 200, r1.text
        reply1 = r1.json()["choices"][0]["message"]["content"]
        r2 = await client.post(url, json={"session_id": "conv-1", "messages": [second_user], **params})
        assert r2.status_code == 200, r2.text
        body = r2.json()
        assert body["session_id"] == "conv-1"
        usage1, usage2 = r1.json()["usage"], body["usage"]
        assert usage2["prompt_tokens_details"]["cached_tokens"] >= usage1["prompt_tokens"] + usage1[
            "completion_tokens"] - 1
        transcript = [system, first_user, {"role": "assistant", "content": reply1}, second_user]
        expected = await reference.generate(transcript, **{**params, "logit_bias": bias})
        assert body["choices"][0]["message"]["content"] == expected.text
        assert usage2["prompt_tokens"] == expected.usage.prompt_tokens

        # a streamed turn continues the same transcript
        third_user = {"role": "user", "content": "And its source?"}
        reply2 = body["choices"][0]["message"]["content"]
        r3 = await client.post(url, json={"session_id": "conv-1", "messages": [third_user], "stream": True,
                                          "stream_options": {"include_usage": True}, **params})
        events = parse_sse(r3.text)
        streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
        transcript += [{"role": "assistant", "content": reply2}, third_user]
        expected = await reference.generate(transcript, **{**params, "logit_bias": bias})
        assert streamed == expected.text
        assert events[-2]["usage"]["prompt_tokens_details"]["cached_tokens"] >= usage2["prompt_tokens"]

        # later turns take exactly one new user message
        r = await client.post(url, json={"session_id": "conv-1", "messages": [system, second_user]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = await client.post(url, json={"session_id": "conv-2", "messages": [system]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"

        r = await client.delete("/v1/sessions/conv-1")
        assert r.status_code == 200 and r.json() == {"id": "conv-1", "object": "session", "deleted": True}
        assert (await client.delete("/v1/sessions/conv-1")).status_code == 404
        await async_wait_until(lambda: served.stats().kv_blocks_used == 0)


async def test_busy_session_is_409_and_disconnect_frees_it(make_tiny_engine: Any) -> None:
    engine = make_tiny_engine()
    try:
        async with asgi_client(create_app(engine, max_sessions=1)) as client:
            url = "/v1/chat/completions"
            long_turn = asyncio.ensure_future(client.post(url, json={
                "session_id": "s", "messages": USER, "max_tokens": 2000, **GREEDY}))
            await async_wait_until(lambda: engine.stats().running == 1)
            r = await client.post(url, json={"session_id": "s", "messages": USER, "max_tokens": 2})
            assert r.status_code == 409 and r.json()["error"]["code"] == "session_busy"
            r = await client.delete("/v1/sessions/s")
            assert r.status_code == 409
            # the only session slot is busy: no idle session can make room for another
            r = await client.post(url, json={"session_id": "other", "messages": USER, "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_sessions"
            long_turn.cancel()  # the client goes away: the turn is aborted and the session is free again
            await asyncio.gather(long_turn, return_exceptions=True)
            await async_wait_until(lambda: engine.stats().running == 0)
            r = await client.post(url, json={"session_id": "s", "messages": USER, "max_tokens": 2})
            assert r.status_code == 200, r.text
            assert (await client.delete("/v1/sessions/s")).status_code == 200
            await async_wait_until(lambda: engine.stats().kv_blocks_used == 0)
    finally:
        await engine.aclose()


async def test_session_idle_timeout_cap_and_key_scoping(make_tiny_engine: Any) -> None:
    engine = make_tiny_engine()
    clock = ManualClock()
    app = create_app(engine, api_keys=["sk-a", "sk-b"], max_sessions=2, session_idle_timeout=1.0, clock=clock)
    turn = {"messages": USER, "max_tokens": 2, **GREEDY}
    url = "/v1/chat/completions"
    try:
        async with asgi_client(app, "sk-a") as a, asgi_client(app, "sk-b") as b:
            assert (await a.post(url, json={"session_id": "one", **turn})).status_code == 200
            assert (await a.post(url, json={"session_id": "two", **turn})).status_code == 200
            # another key cannot see, continue or delete a's sessions
            assert (await b.delete("/v1/sessions/one")).status_code == 404
            # a third session evicts the least recently used idle one
            assert (await a.post(url, json={"session_id": "three", **turn})).status_code == 200
            r = await a.post(url, json={"session_id": "one", **turn})
            assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
            samples, _ = parse_prometheus((await a.get("/metrics")).text)
            assert samples[("asyncllm_sessions_open", ())] == 2
            await async_wait_until(
                lambda: engine.stats().sessions_pinned == 2 and engine.stats().running == 0)

            clock.advance(0.75)
            assert (await a.get("/health")).status_code == 200  # any request sweeps idle sessions
            assert len(app.state.server.sessions) == 2
            clock.advance(0.25)  # idle for exactly session_idle_timeout
            assert (await a.get("/health")).status_code == 200
            assert len(app.state.server.sessions) == 0
            await async_wait_until(lambda: engine.stats().kv_blocks_used == 0)
            r = await a.post(url, json={"session_id": "two", **turn})
            assert r.status_code == 404 and r.json()["error"]["param"] == "session_id"
    finally:
        await engine.aclose()


async def test_metrics_count_tokens_and_latencies(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    served, _ = engines
    async with asgi_client(create_app(served)) as client:
        usages = []
        for max_tokens in (3, 5):
            r = await client.post("/v1/completions", json={
                "prompt": "Hello", "max_tokens": max_tokens, **GREEDY})
            usages.append(r.json()["usage"])
        r = await client.post("/v1/chat/completions", json={
            "messages": USER, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True},
            **GREEDY})
        usages.append(parse_sse(r.text)[-2]["usage"])
        text = (await client.get("/metrics")).text
    samples, types = parse_prometheus(text)
    assert types["asyncllm_time_to_first_token_seconds"] == "histogram"
    assert types["asyncllm_kv_blocks_used"] == "gauge"
    assert samples[("asyncllm_generation_tokens_total", ())] == sum(u["completion_tokens"] for u in usages)
    assert samples[("asyncllm_prompt_tokens_total", ())] == sum(u["prompt_tokens"] for u in usages)
    assert samples[("asyncllm_requests_finished_total", (("finish_reason", "length"),))] == 3
    for name in ("asyncllm_time_to_first_token_seconds", "asyncllm_time_per_output_token_seconds",
                 "asyncllm_e2e_request_latency_seconds"):
        assert samples[(f"{name}_count", ())] == 3
        buckets = sorted((float(dict(labels)["le"].replace("+Inf", "inf")), value)
                         for (metric, labels), value in samples.items() if metric == f"{name}_bucket")
        counts = [value for _, value in buckets]
        assert counts == sorted(counts) and counts[-1] == 3
    assert samples[("asyncllm_kv_blocks_used", ())] == served.stats().kv_blocks_used
    assert samples[("asyncllm_kv_blocks_total", ())] == served.stats().kv_blocks_total
    assert samples[("asyncllm_requests_running", ())] == 0
    assert samples[("asyncllm_engine_up", ())] == 1
    assert samples[("asyncllm_http_requests_total", (("endpoint", "completions"), ("status", "200")))] == 2


async def test_json_body_shape_is_openai(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    served, _ = engines
    async with asgi_client(create_app(served)) as client:
        r = await client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, **GREEDY})
    body = json.loads(r.text)
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert set(body["choices"][0]) == {"index", "message", "logprobs", "finish_reason"}
    assert body["choices"][0]["logprobs"] is None
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens",
                                  "prompt_tokens_details"}
