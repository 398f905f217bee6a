"""Routing OpenAI-compatible requests over several engine replicas, with session affinity and failover.

- A chat request with a ``session_id`` goes to the replica that owns the id on a consistent-hash ring of
  the live replicas (``HashRing``): every turn of a session reaches the replica holding its KV, and adding
  or removing a replica moves only the sessions that replica gains or loses.
- Any other request goes to the least-loaded live replica: ``waiting + running`` from each replica's
  stats (refreshed at most every ``stats_ttl`` seconds) plus the requests sent to it since that refresh.
- The router keeps each session's transcript (``TranscriptStore``). When a session's owner is no longer
  the replica that holds it (that replica died, restarted, or the ring changed), the turn is sent to the new
  owner as a first turn whose messages are the whole transcript plus the new user message, so the
  session is recomputed there transparently.
- A replica that fails before the first body byte of a response reached the client is taken off the ring
  and the request is sent to the next replica; a response that has started streaming cannot be replayed,
  so its stream ends with an error event. Replicas off the ring are probed at each stats refresh and
  come back when they answer.

The router speaks to replicas through ``Replica`` (``stats`` and ``stream``); ``asyncllm.adapters.ray_serve``
provides one over Ray actors, and tests can provide in-process ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from asyncllm.adapters.asgi_forward import ForwardedRequest, ReplyCollector, ResponseStart, error_code
from asyncllm.adapters.asgi_io import sse_event
from asyncllm.adapters.errors import APIError, invalid, unavailable
from asyncllm.adapters.hash_ring import HashRing
from asyncllm.adapters.session_transcripts import Home, Message, TranscriptKey, TranscriptStore

logger = logging.getLogger("asyncllm.adapters")

REPLICA_HEADER = "x-asyncllm-replica"
"""Response header naming the replica that answered."""

CHAT_PATH = "/v1/chat/completions"
SESSIONS_PREFIX = "/v1/sessions/"


class ReplicaUnavailable(Exception):
    """The replica could not be reached or died while answering."""


@dataclass(frozen=True)
class ReplicaStats:
    """A replica's load and ``incarnation`` (a new value each time the replica process starts, so a
    restarted replica is known not to hold the sessions of its previous life)."""

    incarnation: str
    waiting: int
    running: int


class Replica(Protocol):
    name: str

    async def stats(self) -> ReplicaStats: ...

    def stream(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        """The response: a ``ResponseStart``, then body chunks; ``ReplicaUnavailable`` on failure."""
        ...


@dataclass
class Reply:
    """A response on its way to the client; ``body`` yields every chunk (the first one already read)."""

    start: ResponseStart
    replica: str
    body: AsyncIterator[bytes]


def _json_response(error: APIError) -> Reply:
    async def body() -> AsyncIterator[bytes]:
        yield json.dumps(error.body()).encode()

    headers = [(b"content-type", b"application/json")]
    headers.extend((k.lower().encode(), v.encode()) for k, v in error.headers.items())
    return Reply(ResponseStart(error.status, tuple(headers)), "", body())


def _principal_digest(request: ForwardedRequest) -> str:
    return hashlib.sha256((request.header("authorization") or "").encode("utf-8")).hexdigest()


class ReplicaRouter:
    """Routes requests over ``replicas`` (names must be unique). ``clock``: monotonic seconds."""

    def __init__(self, replicas: Sequence[Replica], *, transcripts: TranscriptStore, stats_ttl: float = 0.5,
                 probe_timeout: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        names = [r.name for r in replicas]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"replicas: need at least one, with unique names; got {names}")
        self._replicas = {r.name: r for r in replicas}
        self._transcripts = transcripts
        self._stats_ttl = stats_ttl
        self._probe_timeout = probe_timeout
        self._clock = clock
        self._ring = HashRing()
        self._incarnation: dict[str, str] = {}  # live replicas only
        self._load: dict[str, int] = {}
        self._refreshed_at = -math.inf
        self._refreshing: asyncio.Future[None] | None = None

    # -- membership and load ---------------------------------------------------------------------
    @property
    def live(self) -> frozenset[str]:
        """Names of the replicas on the ring."""
        return self._ring.members

    def load(self, name: str) -> int:
        return self._load.get(name, 0)

    async def refresh(self) -> None:
        """Probe every replica now: those that answer are on the ring with their load, the others off."""
        results = await asyncio.gather(*(self._probe(r) for r in self._replicas.values()))
        for name, stats in zip(self._replicas, results, strict=True):
            if stats is None:
                self._down(name)
            else:
                self._incarnation[name] = stats.incarnation
                self._load[name] = stats.waiting + stats.running
                self._ring.add(name)
        self._refreshed_at = self._clock()

    async def _probe(self, replica: Replica) -> ReplicaStats | None:
        try:
            return await asyncio.wait_for(replica.stats(), self._probe_timeout)
        except (ReplicaUnavailable, asyncio.TimeoutError):
            return None

    async def _fresh(self) -> None:
        """Start a refresh when the stats are older than ``stats_ttl`` (one at a time). Only a router with
        no live replica waits for it; the others route on the stats they have while it runs, so a replica
        that is slow to answer its probe never holds requests up."""
        if self._clock() - self._refreshed_at < self._stats_ttl:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self.refresh())
        if not self._ring:
            await asyncio.shield(self._refreshing)

    def _down(self, name: str) -> None:
        if name in self._ring:
            logger.warning("replica %s is unavailable; routing around it", name)
        self._ring.remove(name)
        self._incarnation.pop(name, None)
        self._load.pop(name, None)

    def _least_loaded(self, exclude: set[str]) -> str | None:
        candidates = [n for n in self._replicas if n in self._ring and n not in exclude]
        return min(candidates, key=lambda n: self._load.get(n, 0), default=None)

    # -- forwarding ------------------------------------------------------------------------------
    async def _attempt(self, name: str, request: ForwardedRequest) -> Reply | None:
        """Send ``request`` to ``name``; ``None`` (and ``name`` is off the ring) if it failed before the
        first body chunk, which is the last moment the request can still go elsewhere."""
        self._load[name] = self._load.get(name, 0) + 1
        stream = self._replicas[name].stream(request)
        try:
            start = await stream.__anext__()
            if not isinstance(start, ResponseStart):
                raise ReplicaUnavailable(f"{name} answered without a response start")
            first = await anext_or_none(stream)
        except (ReplicaUnavailable, StopAsyncIteration):
            self._down(name)
            with contextlib.suppress(Exception):
                await stream.aclose()
            return None
        streaming = (start.header("content-type") or "").startswith("text/event-stream")
        return Reply(start, name, self._rest(name, stream, first, streaming))

    async def _rest(self, name: str, stream: AsyncIterator[ResponseStart | bytes], first: bytes | None,
                    streaming: bool) -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield first
            async for chunk in stream:
                if isinstance(chunk, bytes):
                    yield chunk
        except ReplicaUnavailable:
            self._down(name)
            if streaming:
                error = unavailable(f"replica {name} failed while streaming this response",
                                    "replica_unavailable")
                yield sse_event(error.body()) + sse_event("[DONE]")
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]

    async def _any(self, request: ForwardedRequest, choose: Callable[[set[str]], str | None]) -> Reply:
        tried: set[str] = set()
        while True:
            await self._fresh()
            name = choose(tried)
            if name is None:
                return _json_response(unavailable("no replica is available; retry later",
                                                  "replica_unavailable", retry_after=1))
            reply = await self._attempt(name, request)
            if reply is not None:
                return reply
            tried.add(name)

    async def handle(self, request: ForwardedRequest) -> Reply:
        """Route ``request`` and return its reply; never raises for a replica failure."""
        if request.method == "POST" and request.path == CHAT_PATH:
            body = _json_object(request.body)
            session_id = body.get("session_id") if body is not None else None
            if isinstance(session_id, str) and session_id and body is not None:
                return await self._session_turn(request, body, session_id)
        if request.method == "DELETE" and request.path.startswith(SESSIONS_PREFIX):
            return await self._delete_session(request, request.path[len(SESSIONS_PREFIX):])
        return await self._any(request, self._least_loaded)

    # -- sessions --------------------------------------------------------------------------------
    def _home(self, name: str) -> Home:
        return (name, self._incarnation.get(name, ""))

    async def _session_turn(self, request: ForwardedRequest, body: dict[str, Any], session_id: str) -> Reply:
        key: TranscriptKey = (_principal_digest(request), session_id)
        messages = body.get("messages")
        tried: set[str] = set()
        while True:
            await self._fresh()
            name = self._ring.owner(session_id, exclude=tried)
            if name is None:
                return _json_response(unavailable("no replica is available; retry later",
                                                  "replica_unavailable", retry_after=1))
            home = self._home(name)
            record = self._transcripts.get(key)
            forwarded = request
            base: list[Message] | None = None
            if record is None:
                if isinstance(messages, list) and messages:
                    base = list(messages[:-1])
            elif record.home == home:
                base = record.messages
            else:
                if not (isinstance(messages, list) and len(messages) == 1):
                    return _json_response(invalid("messages: a turn on an existing session sends only its new "
                                                  "user message", "messages"))
                base = record.messages
                forwarded = request.with_body(json.dumps({**body, "messages": [*base, *messages]}).encode())
                await self._close_elsewhere(request, session_id, name, record.home)
            reply = await self._attempt(name, forwarded)
            if reply is None:
                tried.add(name)
                continue
            return await self._observe_turn(reply, key, home, base, messages, record is not None)

    async def _observe_turn(self, reply: Reply, key: TranscriptKey, home: Home, base: list[Message] | None,
                            messages: Any, known: bool) -> Reply:
        if reply.start.status != 200 or base is None:
            if reply.start.status == 404 and known:
                first = await anext_or_none(reply.body)
                if first is not None and error_code(first) == "session_not_found":
                    self._transcripts.drop(key)
                reply.body = _prepend(first, reply.body)
            return reply
        self._transcripts.place(key, base, home)
        user = messages[-1]
        streaming = (reply.start.header("content-type") or "").startswith("text/event-stream")
        collector = ReplyCollector(streaming=streaming)
        inner = reply.body

        async def observed() -> AsyncIterator[bytes]:
            async for chunk in inner:
                collector.feed(chunk)
                yield chunk
            collector.finish()
            self._transcripts.record_turn(key, user, collector.text, collector.finish_reason)

        reply.body = observed()
        return reply

    async def _close_elsewhere(self, request: ForwardedRequest, session_id: str, target: str,
                               old: Home | None) -> None:
        """Before rebuilding a session on ``target``: end any copy ``target`` still holds from an earlier
        stay, and the copy on the replica it is leaving if that one is still up (best effort)."""
        names = [target]
        if old is not None and old[0] != target and self._incarnation.get(old[0]) == old[1]:
            names.append(old[0])
        delete = ForwardedRequest("DELETE", SESSIONS_PREFIX + session_id,
                                  headers=tuple((k, v) for k, v in request.headers
                                                if k.lower() == b"authorization"))
        for name in names:
            stream = self._replicas[name].stream(delete)
            try:
                async for _ in stream:
                    pass
            except ReplicaUnavailable:
                pass
            finally:
                with contextlib.suppress(Exception):
                    await stream.aclose()  # type: ignore[attr-defined]

    async def _delete_session(self, request: ForwardedRequest, session_id: str) -> Reply:
        key: TranscriptKey = (_principal_digest(request), session_id)
        record = self._transcripts.get(key)

        def choose(tried: set[str]) -> str | None:
            if record is not None and record.home is not None:
                name = record.home[0]
                if name not in tried and self._home(name) == record.home:
                    return name
            return self._ring.owner(session_id, exclude=tried)

        reply = await self._any(request, choose)
        if reply.start.status == 200:
            self._transcripts.drop(key)
        elif reply.start.status == 404 and record is not None:
            # the replica holding it went away: the transcript was all that was left of it
            self._transcripts.drop(key)
            with contextlib.suppress(Exception):
                await reply.body.aclose()  # type: ignore[attr-defined]
            return _deleted(session_id, reply.replica)
        return reply


def _deleted(session_id: str, replica: str) -> Reply:
    async def body() -> AsyncIterator[bytes]:
        yield json.dumps({"id": session_id, "object": "session", "deleted": True}).encode()

    return Reply(ResponseStart(200, ((b"content-type", b"application/json"),)), replica, body())


async def _prepend(first: bytes | None, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first is not None:
        yield first
    async for chunk in rest:
        yield chunk


async def anext_or_none(stream: AsyncIterator[Any]) -> Any:
    """The next item of ``stream``, or ``None`` when it is exhausted."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
