"""Engine replicas on Ray behind one OpenAI-compatible HTTP endpoint on Ray Serve (extra ``ray``).

>>> ray.init()
>>> serve.start(http_options={"host": "127.0.0.1", "port": 8000})
>>> serve.run(build_app("path/to/model", replicas=2, engine_kwargs={"device": "cuda"}, replica_gpus=1))

Layout: one Serve deployment, the **ingress** (a single Serve replica, no CPU reserved), owns N Ray actors,
the **engine replicas**. Each engine replica loads the model with the same ``from_pretrained`` arguments
(``engine_kwargs`` are passed through) and serves the unchanged OpenAI-compatible app of
``asyncllm.adapters.asgi`` in-process; the ingress forwards each HTTP request to one of them as a
``ForwardedRequest`` and streams the response back. Routing (session affinity by consistent hashing,
least-loaded otherwise, failover, transcripts for rebuilding sessions) is ``ReplicaRouter``'s.

Why actors and not one Serve deployment with N replicas: Serve's router picks replicas by queue length
and offers no consistent hashing on a request field, and it restarts a failed replica under the same
deployment while calls wait for it; the ingress needs to pick the exact replica and to route around a
dead one at once. The engine replicas are plain actors owned by the ingress: they end with it.

Engine replica actors are named ``<app>-replica-<i>`` in the Ray namespace ``NAMESPACE`` (for
``ray.get_actor``). An actor that Ray restarts (``max_restarts``) comes back empty, with a new
incarnation: its former sessions are rebuilt from their transcripts on their next turn.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

try:
    import ray
    import ray.exceptions
    from ray import serve
except ImportError as _error:  # pragma: no cover - depends on the environment
    raise ImportError(f"asyncllm.adapters.ray_serve needs Ray Serve: pip install 'asyncllm[ray]' ({_error})") \
        from _error

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from asyncllm.adapters.asgi_forward import ForwardedRequest, ResponseStart, run_asgi
from asyncllm.adapters.replica_router import (
    REPLICA_HEADER,
    ReplicaRouter,
    ReplicaStats,
    ReplicaUnavailable,
)
from asyncllm.adapters.session_transcripts import TranscriptStore
from asyncllm.adapters.settings import ServerSettings

__all__ = ["NAMESPACE", "ReplicaSetConfig", "build_app", "replica_actor_name"]

NAMESPACE = "asyncllm"
"""The Ray namespace of the engine replica actors."""

INGRESS_MAX_ONGOING_REQUESTS = 4096
"""Requests the ingress accepts at once (Serve's default of a few would queue streams behind each other)."""


TRANSCRIPT_GRACE = 60.0
"""Seconds an idle session's transcript outlives the session's own idle timeout on its replica."""


def replica_actor_name(app_name: str, index: int) -> str:
    return f"{app_name}-replica-{index}"


@dataclass(frozen=True)
class ReplicaSetConfig:
    """What every engine replica is built from, and the Ray resources each one reserves.

    ``engine_kwargs`` go to ``AsyncEngine.from_pretrained(model, **engine_kwargs)`` unchanged; when it
    names no ``num_threads``, each replica uses ``int(replica_cpus)`` threads (at least 1), so replicas
    sharing a machine do not oversubscribe its cores. ``max_restarts``: how often Ray restarts a replica
    that crashed (``ray.kill`` ends one for good). ``stats_ttl``: seconds a replica's load is trusted.
    """

    model: str
    replicas: int = 1
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    settings: ServerSettings = field(default_factory=ServerSettings)
    app_name: str = "asyncllm"
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    max_restarts: int = 0
    stats_ttl: float = 0.5
    ready_timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas: must be >= 1, got {self.replicas}")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ValueError("replica_cpus, replica_gpus: must be >= 0")
        if self.max_restarts < -1:
            raise ValueError(f"max_restarts: must be >= -1 (-1: always), got {self.max_restarts}")
        if not self.stats_ttl >= 0:
            raise ValueError(f"stats_ttl: must be >= 0 seconds, got {self.stats_ttl}")

    def replica_engine_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.engine_kwargs)
        kwargs.setdefault("num_threads", max(1, int(self.replica_cpus)))
        return kwargs


class EngineReplica:
    """One ``AsyncEngine`` and its OpenAI-compatible app (run as a Ray actor; one event loop)."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], settings: ServerSettings) -> None:
        from asyncllm.adapters.asgi import create_app
        from asyncllm.engine import AsyncEngine

        self.incarnation = uuid.uuid4().hex
        self.engine = AsyncEngine.from_pretrained(model, **engine_kwargs)
        self.app = create_app(self.engine, settings=settings, manage_engine=False)

    async def ready(self) -> str:
        await self.engine.start()
        return self.incarnation

    async def stats(self) -> tuple[str, int, int]:
        stats = self.engine.stats()
        return self.incarnation, stats.waiting, stats.running

    async def handle(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        async for item in run_asgi(self.app, request):
            yield item


class RayReplica:
    """``Replica`` over an ``EngineReplica`` actor: Ray errors become ``ReplicaUnavailable``."""

    def __init__(self, name: str, actor: Any) -> None:
        self.name = name
        self._actor = actor

    async def stats(self) -> ReplicaStats:
        try:
            incarnation, waiting, running = await self._actor.stats.remote()
        except ray.exceptions.RayError as error:
            raise ReplicaUnavailable(f"{self.name}: {type(error).__name__}") from error
        return ReplicaStats(incarnation, waiting, running)

    async def stream(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        refs = self._actor.handle.options(num_returns="streaming").remote(request)
        finished = False
        try:
            try:
                async for ref in refs:
                    yield await ref
            except ray.exceptions.RayError as error:
                raise ReplicaUnavailable(f"{self.name}: {type(error).__name__}") from error
            finished = True
        finally:
            if not finished:  # the client went away (or the replica failed): stop the work there
                with contextlib.suppress(Exception):  # best effort: the replica may already be gone
                    ray.cancel(refs)


class Ingress:
    """The Serve deployment: starts the engine replicas, then routes every HTTP request to one of them."""

    def __init__(self, config: ReplicaSetConfig) -> None:
        remote = ray.remote(EngineReplica)
        actors = []
        for index in range(config.replicas):
            actors.append(remote.options(
                name=replica_actor_name(config.app_name, index), namespace=NAMESPACE,
                num_cpus=config.replica_cpus, num_gpus=config.replica_gpus,
                max_restarts=config.max_restarts, max_concurrency=INGRESS_MAX_ONGOING_REQUESTS,
            ).remote(config.model, config.replica_engine_kwargs(), config.settings))
        ray.get([actor.ready.remote() for actor in actors], timeout=config.ready_timeout)
        replicas = [RayReplica(replica_actor_name(config.app_name, i), a) for i, a in enumerate(actors)]
        settings = config.settings
        # kept longer and more of them than the replicas keep sessions, so that a session a replica still
        # holds always has its transcript here (a replica that ended one answers 404 and it is dropped)
        transcripts = TranscriptStore(max_sessions=2 * settings.max_sessions * config.replicas,
                                      idle_timeout=settings.session_idle_timeout + TRANSCRIPT_GRACE)
        self._actors = actors  # the ingress owns them: they live as long as it does
        self.router = ReplicaRouter(replicas, transcripts=transcripts, stats_ttl=config.stats_ttl)

    async def __call__(self, request: Request) -> Response:
        path, root = request.scope["path"], request.scope.get("root_path", "")
        if root and path.startswith(root):  # served under a route prefix: the app's routes start at /v1
            path = path[len(root):] or "/"
        forwarded = ForwardedRequest(request.method, path, request.url.query.encode("latin-1"),
                                     tuple(request.headers.raw), await request.body())
        reply = await self.router.handle(forwarded)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in reply.start.headers
                   if k.lower() != b"content-length"}
        if reply.replica:
            headers[REPLICA_HEADER] = reply.replica
        return StreamingResponse(reply.body, status_code=reply.start.status, headers=headers)


IngressDeployment = serve.deployment(name="ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                                     max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS)(Ingress)


def build_app(model: str, *, replicas: int = 1, engine_kwargs: dict[str, Any] | None = None,
              settings: ServerSettings | None = None, **options: Any) -> Any:
    """The Serve application (pass it to ``serve.run``): ``replicas`` engine replicas of ``model``.

    ``options`` are further ``ReplicaSetConfig`` fields (``app_name``, ``replica_cpus``, ``replica_gpus``,
    ``max_restarts``, ``stats_ttl``, ``ready_timeout``). ``app_name`` must match the ``name`` given to
    ``serve.run`` when more than one application runs in the cluster (it names the replica actors).
    """
    config = ReplicaSetConfig(model=str(model), replicas=replicas, engine_kwargs=dict(engine_kwargs or {}),
                              settings=settings or ServerSettings(), **options)
    return IngressDeployment.bind(config)
