"""Routing over engine replicas without Ray: the consistent-hash ring, and ``ReplicaRouter`` over
in-process replicas (the real OpenAI-compatible app on tiny engines) that tests can take down, cut off
mid-stream or restart; answers are checked against the engine's greedy answers computed directly. Also
the ``serve --replicas`` options that are refused before anything starts."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip("starlette")

from asyncllm import AsyncEngine
from asyncllm.adapters.asgi import create_app
from asyncllm.adapters.asgi_forward import ForwardedRequest, ResponseStart, run_asgi
from asyncllm.adapters.hash_ring import HashRing
from asyncllm.adapters.replica_router import ReplicaRouter, ReplicaStats, ReplicaUnavailable
from asyncllm.adapters.session_transcripts import TranscriptStore
from asyncllm.cli import main

from ..core._tokenizers import word_piece_only_bias

JSON = ((b"content-type", b"application/json"),)


# -- the ring -------------------------------------------------------------------------------------
def test_ring_moves_only_the_keys_of_the_member_that_changed() -> None:
    keys = [f"session-{i}" for i in range(2000)]
    three = HashRing(["a", "b", "c"])
    four = HashRing(["d", "c", "b", "a"])  # insertion order does not matter
    before = {k: three.owner(k) for k in keys}
    after = {k: four.owner(k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(after[k] == "d" for k in moved)  # only keys the new member now owns moved
    assert 0.1 < len(moved) / len(keys) < 0.4  # about its fair share (1/4)
    assert all(four.owner(k, exclude={"d"}) == before[k] for k in keys)  # removing it moves only its keys
    assert {three.owner(k) for k in keys} == {"a", "b", "c"}
    assert three.owner("x", exclude={"a", "b", "c"}) is None and HashRing().owner("x") is None


# -- in-process replicas ------------------------------------------------------------------------
class LocalReplica:
    """A ``Replica`` running the OpenAI-compatible app in this event loop; ``alive`` and ``cut_after``
    (body chunks before the connection drops) simulate failures, ``restart`` a fresh process."""

    def __init__(self, name: str, engine: AsyncEngine) -> None:
        self.name = name
        self.engine = engine
        self.alive = True
        self.cut_after: int | None = None
        self.incarnation = 0
        self.requests: list[str] = []
        self.app = create_app(engine, model_name="tiny", manage_engine=False)

    async def restart(self) -> None:
        """Come back as a fresh process would: no sessions, their KV released."""
        await self.app.state.server.sessions.aclose()
        self.alive, self.incarnation = True, self.incarnation + 1
        self.app = create_app(self.engine, model_name="tiny", manage_engine=False)

    async def stats(self) -> ReplicaStats:
        if not self.alive:
            raise ReplicaUnavailable(self.name)
        stats = self.engine.stats()
        return ReplicaStats(str(self.incarnation), stats.waiting, stats.running)

    async def stream(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        if not self.alive:
            raise ReplicaUnavailable(self.name)
        self.requests.append(request.method)
        chunks = 0
        async for item in run_asgi(self.app, request):
            if isinstance(item, bytes):
                if self.cut_after is not None and chunks >= self.cut_after:
                    self.alive = False
                    raise ReplicaUnavailable(self.name)
                chunks += 1
            yield item


@pytest.fixture
async def replicas(make_tiny_engine: Any) -> AsyncIterator[tuple[LocalReplica, LocalReplica, AsyncEngine]]:
    """Two replicas ``a`` and ``b``, and a reference engine with the same weights."""
    engines = [make_tiny_engine(), make_tiny_engine(), make_tiny_engine(enable_prefix_caching=False)]
    try:
        yield LocalReplica("a", engines[0]), LocalReplica("b", engines[1]), engines[2]
    finally:
        for engine in engines:
            await engine.aclose()


def make_router(*replicas: LocalReplica) -> ReplicaRouter:
    return ReplicaRouter(replicas, transcripts=TranscriptStore(max_sessions=64, idle_timeout=600), stats_ttl=0)


def owned_by(name: str, members: list[str]) -> str:
    """A session id that ``name`` owns on the ring of ``members``."""
    ring = HashRing(members)
    return next(f"s{i}" for i in range(1000) if ring.owner(f"s{i}") == name)


async def send(router: ReplicaRouter, body: dict[str, Any], method: str = "POST",
               path: str = "/v1/chat/completions") -> tuple[int, str, bytes]:
    request = ForwardedRequest(method, path, headers=JSON, body=json.dumps(body).encode())
    reply = await router.handle(request)
    return reply.start.status, reply.replica, b"".join([chunk async for chunk in reply.body])


def turn(content: str, session_id: str, bias: dict[int, float], **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "session_id": session_id, "max_tokens": 5,
            "temperature": 0, "ignore_eos": True, "logit_bias": {str(t): b for t, b in bias.items()}, **extra}


async def greedy(engine: AsyncEngine, messages: list[dict[str, str]], bias: dict[int, float]) -> str:
    return (await engine.generate(messages, max_tokens=5, temperature=0.0, ignore_eos=True, logit_bias=bias)).text


async def test_a_session_is_rebuilt_on_the_survivor_and_back_on_a_restarted_replica(
        replicas: tuple[LocalReplica, LocalReplica, AsyncEngine]) -> None:
    a, b, reference = replicas
    bias = word_piece_only_bias(reference.tokenizer)
    router = make_router(a, b)
    sid = owned_by("a", ["a", "b"])
    transcript: list[dict[str, str]] = []

    async def chat_turn(content: str, stream: bool = False) -> tuple[str, dict[str, Any]]:
        extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
        status, replica, body = await send(router, turn(content, sid, bias, **extra))
        assert status == 200, body
        if stream:
            events = [json.loads(e.removeprefix(b"data: ")) for e in body.split(b"\n\n")
                      if e and e != b"data: [DONE]"]
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
            usage = events[-1]["usage"]
        else:
            reply = json.loads(body)
            text, usage = reply["choices"][0]["message"]["content"], reply["usage"]
        transcript.extend([{"role": "user", "content": content}, {"role": "assistant", "content": text}])
        assert text == await greedy(reference, transcript[:-1], bias)
        return replica, usage

    assert (await chat_turn("Hello there."))[0] == "a"
    a.alive = False
    # moving it needs the transcript the router keeps, which a later turn only extends
    status, _, body = await send(router, {**turn("x", sid, bias), "messages": [{"role": "user", "content": "x"}] * 2})
    assert status == 400 and json.loads(body)["error"]["param"] == "messages"
    replica, usage = await chat_turn("And then?")  # recomputed on b from the transcript
    assert replica == "b" and router.live == {"b"}
    assert usage["prompt_tokens"] == len(reference.encode_prompt(transcript[:3]))
    replica, usage = await chat_turn("Go on.", stream=True)  # b now holds it, with its KV
    assert replica == "b" and usage["prompt_tokens_details"]["cached_tokens"] > 0
    await a.restart()  # back, empty: once a probe finds it, it is the id's owner again and the session is
    await router.refresh()  # rebuilt there
    replica, usage = await chat_turn("Why?")
    assert replica == "a" and usage["prompt_tokens"] == len(reference.encode_prompt(transcript[:7]))
    assert a.engine.stats().sessions_pinned == 1
    assert b.engine.stats().sessions_pinned == 0  # the copy on the replica it left was deleted
    # deleting it ends it; the same id then starts a new session
    status, _, body = await send(router, {}, "DELETE", f"/v1/sessions/{sid}")
    assert status == 200 and json.loads(body)["deleted"] is True
    status, _, body = await send(router, turn("Hi.", sid, bias))
    assert status == 200 and json.loads(body)["usage"]["prompt_tokens"] == len(
        reference.encode_prompt([{"role": "user", "content": "Hi."}]))


async def test_deleting_a_session_whose_replica_is_gone(replicas: tuple[LocalReplica, LocalReplica, AsyncEngine]
                                                        ) -> None:
    a, b, reference = replicas
    bias = word_piece_only_bias(reference.tokenizer)
    router = make_router(a, b)
    sid = owned_by("b", ["a", "b"])
    assert (await send(router, turn("Hello there.", sid, bias)))[:2] == (200, "b")
    b.alive = False
    status, _, body = await send(router, {}, "DELETE", f"/v1/sessions/{sid}")
    assert status == 200 and json.loads(body) == {"id": sid, "object": "session", "deleted": True}
    status, _, body = await send(router, {}, "DELETE", f"/v1/sessions/{sid}")  # nothing left of it
    assert status == 404 and json.loads(body)["error"]["code"] == "session_not_found"


async def test_failures_before_and_after_the_first_byte(replicas: tuple[LocalReplica, LocalReplica, AsyncEngine]
                                                        ) -> None:
    a, b, reference = replicas
    router = make_router(a, b)
    messages = [{"role": "user", "content": "Count."}]
    expected = (await reference.generate(messages, max_tokens=8, temperature=0.0, ignore_eos=True)).text
    body = {"messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    # a replica that is down before answering: the request goes to the other one
    a.alive = False
    status, replica, raw = await send(router, body)
    assert (status, replica) == (200, "b") and json.loads(raw)["choices"][0]["message"]["content"] == expected
    # a stream cut after its first chunks cannot be replayed: it ends with an error event and [DONE]
    b.cut_after = 2
    status, replica, raw = await send(router, {**body, "stream": True})
    assert (status, replica) == (200, "b")
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]" and json.loads(events[-2])["error"]["code"] == "replica_unavailable"
    assert len(events) == 4 and router.live == frozenset()  # role chunk, one delta, the error, [DONE]
    # no replica at all
    status, _, raw = await send(router, body)
    assert status == 503 and json.loads(raw)["error"]["code"] == "replica_unavailable"
    # one back: it serves everything
    await a.restart()
    await router.refresh()
    status, replica, raw = await send(router, {**body, "stream": True})
    assert (status, replica) == (200, "a")
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in raw.split(b"\n\n") if e and e != b"data: [DONE]"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected


# -- command line -------------------------------------------------------------------------------
def test_replicas_without_ray_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert main(["serve", "model-dir", "--replicas", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'asyncllm[ray]'" in err and "Traceback" not in err


@pytest.mark.parametrize(("option", "message"), [(["--replicas", "-1"], "--replicas"),
                                                 (["--ray-address", "auto"], "--ray-address"),
                                                 (["--replicas", "2", "--replica-cpus", "-1"], "--replica-cpus")])
def test_replica_options_are_checked_before_anything_starts(option: list[str], message: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "model-dir", "--device", "cpu", *option]) == 2
    assert message in capsys.readouterr().err
