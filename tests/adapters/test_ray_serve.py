"""Engine replicas on Ray Serve: a local Ray cluster with two replicas of the tiny random Llama on CPU,
driven over HTTP by httpx and the official ``openai`` client and checked against the engine's own greedy
answers computed directly. One cluster serves every test of the module; the test that kills a replica
runs last."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="needs Ray Serve: pip install 'asyncllm[ray]'")
serve = pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install 'asyncllm[ray]'")
openai = pytest.importorskip("openai")

import httpx  # noqa: E402
import torch  # noqa: E402

from asyncllm import AsyncEngine  # noqa: E402
from asyncllm.adapters.ray_serve import NAMESPACE, build_app, replica_actor_name  # noqa: E402
from asyncllm.adapters.replica_router import REPLICA_HEADER  # noqa: E402
from asyncllm.adapters.settings import ServerSettings  # noqa: E402

from ..core._tokenizers import word_piece_only_bias  # noqa: E402

APP = "asyncllm-test"
ENGINE = {"device": "cpu", "kv_cache_tokens": 4096, "num_threads": 1}
GREEDY_BODY = {"temperature": 0, "ignore_eos": True}
REPLICAS = {replica_actor_name(APP, 0), replica_actor_name(APP, 1)}

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def url(tiny_hf_dir: Path) -> Iterator[str]:
    """Two engine replicas behind the ingress on a local Ray cluster; the HTTP base URL."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024,
             log_to_driver=False, configure_logging=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(str(tiny_hf_dir), replicas=2, engine_kwargs=ENGINE, app_name=APP,
                            settings=ServerSettings(model_name="tiny"), replica_cpus=1, stats_ttl=0.2),
                  name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


class Reference:
    """The same model loaded directly in this process (one thread, like each replica), running in an event
    loop of its own that runs while an answer is computed."""

    def __init__(self, model: Path) -> None:
        self.engine = AsyncEngine.from_pretrained(model, **ENGINE, enable_prefix_caching=False)
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.engine.start())

    def greedy(self, messages: list[dict[str, str]], max_tokens: int, bias: dict[int, float] | None = None) -> str:
        """The engine's greedy answer to ``messages``, computed directly."""
        work = self.engine.generate(messages, max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                    logit_bias=bias)
        return self.loop.run_until_complete(work).text

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.aclose())
        self.loop.close()


@pytest.fixture(scope="module")
def reference(tiny_hf_dir: Path) -> Iterator[Reference]:
    threads = torch.get_num_threads()
    engine = Reference(tiny_hf_dir)
    yield engine
    engine.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bias(reference: Reference) -> dict[int, float]:
    """A ``logit_bias`` under which replies re-render token for token in the next turn's transcript, so a
    session turn's whole history can be reused."""
    return word_piece_only_bias(reference.engine.tokenizer)


def chat(url: str, messages: list[dict[str, str]], max_tokens: int, **extra: Any) -> httpx.Response:
    body = {"model": "tiny", "messages": messages, "max_tokens": max_tokens, **GREEDY_BODY, **extra}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response


def session_turns(url: str, session_id: str, turns: list[str], max_tokens: int,
                  transcript: list[dict[str, str]], bias: dict[int, float]) -> list[httpx.Response]:
    """Run ``turns`` on a session, extending ``transcript`` with each turn and its reply."""
    replies = []
    for content in turns:
        user = {"role": "user", "content": content}
        reply = chat(url, [user], max_tokens, session_id=session_id,
                     logit_bias={str(t): b for t, b in bias.items()})
        transcript += [user, {"role": "assistant", "content": reply.json()["choices"][0]["message"]["content"]}]
        replies.append(reply)
    return replies


def _stats(name: str) -> tuple[str, int, int]:
    """(incarnation, waiting, running) of an engine replica, asked directly."""
    return ray.get(ray.get_actor(name, namespace=NAMESPACE).stats.remote(), timeout=10)


def test_session_turns_land_on_one_replica_and_reuse_its_kv(url: str, reference: Reference,
                                                            bias: dict[int, float]) -> None:
    transcript: list[dict[str, str]] = []
    replies = session_turns(url, "affinity", ["Hello there.", "And then?", "Tell me more."], 6, transcript, bias)
    assert len({r.headers[REPLICA_HEADER] for r in replies}) == 1
    assert replies[0].headers[REPLICA_HEADER] in REPLICAS
    for turn, reply in enumerate(replies):
        usage = reply.json()["usage"]
        if turn:  # the previous turns' KV is reused: their prompt and reply are not computed again
            before = replies[turn - 1].json()["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] >= (before["prompt_tokens"]
                                                                       + before["completion_tokens"] - 1)
        # every answer is the engine's greedy answer for the transcript so far
        expected = reference.greedy(transcript[: 2 * turn + 1], 6, bias)
        assert reply.json()["choices"][0]["message"]["content"] == expected


def test_requests_without_a_session_spread_over_both_replicas(url: str) -> None:
    messages = [{"role": "user", "content": "Count to ten."}]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: chat(url, messages, 24), range(8)))
    served_by = [r.headers[REPLICA_HEADER] for r in replies]
    assert set(served_by) == REPLICAS, served_by
    assert len({r.json()["choices"][0]["message"]["content"] for r in replies}) == 1


def test_official_openai_client(url: str, reference: Reference) -> None:
    messages = [{"role": "user", "content": "Name three rivers."}]
    expected = reference.greedy(messages, 10)
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        assert [m.id for m in client.models.list()] == ["tiny"]
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                               extra_body={"ignore_eos": True})
        assert reply.choices[0].message.content == expected
        assert reply.usage is not None and reply.usage.completion_tokens == 10
        stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True})
        chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10


def test_bad_input_is_answered_by_the_replica_app(url: str) -> None:
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": [], "max_tokens": 2},
                          timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"


def test_a_client_leaving_mid_stream_stops_the_generation(url: str) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Talk."}], "max_tokens": 2000,
            "stream": True, **GREEDY_BODY}  # seconds of work if it were not stopped
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as response:
        replica = response.headers[REPLICA_HEADER]
        lines = response.iter_lines()
        assert next(line for line in lines if '"content":"' in line and '"role"' not in line)
        assert _stats(replica)[2] == 1
    deadline = time.monotonic() + 1  # the whole reply would take about 2 s more
    while _stats(replica)[2]:
        assert time.monotonic() < deadline, "the replica kept generating for a client that left"
        time.sleep(0.02)


def test_killing_a_replica_loses_no_request_and_sessions_move(url: str, reference: Reference,
                                                              bias: dict[int, float]) -> None:
    transcript: list[dict[str, str]] = []
    (first,) = session_turns(url, "failover", ["Hello there."], 6, transcript, bias)
    doomed = first.headers[REPLICA_HEADER]
    (survivor,) = REPLICAS - {doomed}
    messages = [{"role": "user", "content": "Write a long story."}]
    expected = reference.greedy(messages, 500)

    with ThreadPoolExecutor(6) as pool:
        pending = [pool.submit(chat, url, messages, 500) for _ in range(6)]
        deadline = time.monotonic() + 30
        while _stats(doomed)[2] == 0:  # wait until the doomed replica is generating some of them
            assert time.monotonic() < deadline, "no request reached the replica"
            time.sleep(0.01)
        ray.kill(ray.get_actor(doomed, namespace=NAMESPACE))
        replies = [p.result(timeout=90) for p in pending]
    # every request finished (those cut short on the dead replica were retried on the survivor)
    for reply in replies:
        body = reply.json()
        assert body["usage"]["completion_tokens"] == 500
        assert body["choices"][0]["message"]["content"] == expected
    assert {r.headers[REPLICA_HEADER] for r in replies} == {survivor}

    # the session continues on the survivor: rebuilt from its transcript, its answer is the engine's greedy
    # answer for the whole transcript
    (turn,) = session_turns(url, "failover", ["And then?"], 6, transcript, bias)
    assert turn.headers[REPLICA_HEADER] == survivor
    assert turn.json()["choices"][0]["message"]["content"] == reference.greedy(transcript[:3], 6, bias)
    assert turn.json()["usage"]["prompt_tokens"] == len(reference.engine.encode_prompt(transcript[:3]))
    # ... and from then on it lives there, with its KV
    (again,) = session_turns(url, "failover", ["Go on."], 6, transcript, bias)
    assert again.headers[REPLICA_HEADER] == survivor
    usage = turn.json()["usage"]
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= (usage["prompt_tokens"]
                                                                               + usage["completion_tokens"] - 1)
    assert again.json()["choices"][0]["message"]["content"] == reference.greedy(transcript[:5], 6, bias)
