"""An OpenAI-compatible ASGI app over one ``AsyncEngine`` (extra ``asgi``: Starlette).

>>> app = FastAPI(lifespan=engine.lifespan)
>>> app.mount("/llm", create_app(engine, model_name="smollm2", api_keys=["sk-..."]))

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models[/{model}]``,
``DELETE /v1/sessions/{id}``, ``POST /tokenize``, ``POST /detokenize`` (these need an API key when keys are
configured) and the open ``GET /health`` and ``GET /metrics``. Chat messages to a vision-language model may
hold ``image_url`` parts: ``data:`` URLs, or ``http(s)`` URLs of the hosts in ``allowed_image_hosts``
(``chat_images``; a bad image is a 400 naming its part).

Lifecycle: the engine starts on the first request that needs it (mounted sub-apps receive no lifespan
events); served as the top-level app, the app's own lifespan starts the engine and closes it (and its
sessions) at shutdown. The app keeps serving after every error it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asyncllm.adapters.asgi_io import (
    ClientDisconnected,
    EventStreamResponse,
    SafeJSONResponse,
    read_json,
    until_disconnect,
)
from asyncllm.adapters.chat_images import resolve_images
from asyncllm.adapters.errors import APIError, invalid, not_found, unavailable
from asyncllm.adapters.generation import RunningRequest, api_error_of
from asyncllm.adapters.metrics import CONTENT_TYPE
from asyncllm.adapters.openai_format import ResponseFormatter
from asyncllm.adapters.openai_schema import (
    GenerationRequest,
    RequestLimits,
    ensure_object,
    parse_chat_request,
    parse_completion_request,
    parse_detokenize_request,
    parse_tokenize_request,
)
from asyncllm.adapters.server_metrics import ServerMetrics
from asyncllm.adapters.sessions import SessionGoneError, SessionKey, SessionLimitError, SessionRegistry
from asyncllm.adapters.settings import ServerSettings
from asyncllm.engine import AsyncEngine, EngineClosedError
from asyncllm.event_loop import require_asyncio
from asyncllm.images import PreparedImage
from asyncllm.sampling import SamplingParams
from asyncllm.session import SessionBusyError, SessionClosedError
from asyncllm.streams import RequestStream

__all__ = ["OpenAIServer", "ServerSettings", "create_app"]

CLIENT_CLOSED_REQUEST = 499
"""Status recorded in metrics when the client disconnected before a non-streaming response was ready."""


def create_app(
    engine: AsyncEngine,
    *,
    model_name: str | None = None,
    api_keys: Sequence[str] | None = None,
    settings: ServerSettings | None = None,
    manage_engine: bool = True,
    clock: Callable[[], float] | None = None,
    **options: Any,
) -> Starlette:
    """The OpenAI-compatible app for ``engine``.

    ``model_name``, ``api_keys`` and ``options`` (further ``ServerSettings`` fields: ``max_body_bytes``,
    ``max_waiting``, ...) override ``settings`` (default: ``ServerSettings()``). ``manage_engine``: when this
    app is served as the top-level ASGI app, its lifespan starts the engine and closes it at shutdown (a
    mounted app never receives lifespan events). ``clock``: monotonic seconds for session idle timeouts and
    latency metrics (default: ``time.monotonic`` and ``time.perf_counter``); tests pass a clock they advance.
    ``app.state.server`` is the ``OpenAIServer`` behind the routes.
    """
    changes: dict[str, Any] = dict(options)
    if model_name is not None:
        changes["model_name"] = model_name
    if api_keys is not None:
        changes["api_keys"] = tuple(api_keys)
    server = OpenAIServer(engine, replace(settings or ServerSettings(), **changes), clock=clock)
    return server.build(manage_engine=manage_engine)


class OpenAIServer:
    """The state and request handlers behind one app: settings, metrics and the session registry."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings,
                 *, clock: Callable[[], float] | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.sessions = SessionRegistry(engine, max_sessions=settings.max_sessions,
                                        max_sessions_per_key=settings.max_sessions_per_key
                                        if settings.api_keys else None,
                                        idle_timeout=settings.session_idle_timeout,
                                        clock=clock or time.monotonic)
        self.metrics = ServerMetrics(engine, lambda: len(self.sessions), clock=clock or time.perf_counter)
        self.limits = RequestLimits(vocab_size=engine.model_config.vocab_size, max_n=settings.max_n)
        self._image_policy = settings.image_fetch_policy()
        self._keys = [key.encode("utf-8") for key in settings.api_keys]
        self._created = int(time.time())

    # -- app assembly --------------------------------------------------------------------------
    def build(self, *, manage_engine: bool = True) -> Starlette:
        route = self._route
        routes = [
            route("/v1/chat/completions", "chat_completions", self.chat_completions, ["POST"]),
            route("/v1/completions", "completions", self.completions, ["POST"]),
            route("/v1/models", "models", self.list_models, ["GET"]),
            route("/v1/models/{model:path}", "model", self.get_model, ["GET"]),
            route("/v1/sessions/{session_id:path}", "delete_session", self.delete_session, ["DELETE"]),
            route("/tokenize", "tokenize", self.tokenize, ["POST"]),
            route("/detokenize", "detokenize", self.detokenize, ["POST"]),
            route("/health", "health", self.health, ["GET"]),
            route("/metrics", "metrics", self.metrics_endpoint, ["GET"]),
        ]
        app = Starlette(routes=routes, exception_handlers={HTTPException: self._http_exception},
                        lifespan=self._lifespan if manage_engine else None)
        app.state.server = self
        return app

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: object) -> AsyncIterator[None]:
        require_asyncio("the OpenAI-compatible ASGI app")
        await self.engine.start()
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await self.sessions.aclose()
            await self.engine.aclose()

    def _route(self, path: str, name: str, handler: Callable[[Request, float], Awaitable[Response]],
               methods: list[str]) -> Route:
        async def endpoint(request: Request) -> Response:
            require_asyncio("the OpenAI-compatible ASGI app")
            arrival = self.metrics.clock()
            try:
                response = await handler(request, arrival)
            except APIError as error:
                response = _error_response(error)
            except ClientDisconnected:
                response = Response(status_code=CLIENT_CLOSED_REQUEST)
            except Exception as error:
                response = _error_response(api_error_of(error))
            self.metrics.http_requests.inc(labels=(name, str(response.status_code)))
            return response

        return Route(path, endpoint, methods=methods, name=name)

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        code = {404: "not_found", 405: "method_not_allowed"}.get(status)
        return _error_response(APIError(status, str(getattr(exc, "detail", exc)), code=code))

    # -- shared checks -------------------------------------------------------------------------
    def _principal(self, request: Request) -> int | None:
        """The index of the request's API key (``None`` when keys are not required); 401 otherwise."""
        if not self._keys:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        presented = token.strip().encode("utf-8")
        matched: int | None = None
        for index, key in enumerate(self._keys):  # compare with every key: timing reveals no prefix
            if hmac.compare_digest(presented, key) and scheme.lower() == "bearer":
                matched = index
        if matched is None:
            message = ("Incorrect API key provided." if token else
                       "Missing API key: send it as 'Authorization: Bearer <key>'.")
            raise APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return matched

    async def _engine_ready(self) -> None:
        try:
            await self.engine.start()
        except EngineClosedError as error:
            raise unavailable(f"the engine is not running: {error}", "engine_unavailable") from error
        if self.engine.failure is not None or not self.engine.is_running:
            raise unavailable("the engine is shutting down or has failed", "engine_unavailable")

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.model_name:
            raise not_found(f"The model '{model}' does not exist; this server serves "
                            f"'{self.settings.model_name}'.", "model_not_found", "model")

    def _check_load(self) -> None:
        limit = self.settings.max_waiting
        if limit is not None and self.engine.stats().waiting >= limit:
            raise unavailable(f"the server is overloaded ({limit} requests waiting); retry later",
                              "overloaded", retry_after=1)

    def _check_max_tokens_limit(self, req: GenerationRequest) -> None:
        limit, asked = self.settings.max_tokens_limit, req.params.max_tokens
        if limit is not None and asked is not None and asked > limit:
            field = req.max_tokens_field
            raise invalid(f"{field}: this server allows at most {limit} completion tokens per request, but "
                          f"{asked} were requested", field)

    async def _body(self, request: Request) -> Any:
        return ensure_object(await read_json(request, self.settings.max_body_bytes))

    # -- generation ----------------------------------------------------------------------------
    async def chat_completions(self, request: Request, arrival: float) -> Response:
        return await self._generate(request, arrival, chat=True)

    async def completions(self, request: Request, arrival: float) -> Response:
        return await self._generate(request, arrival, chat=False)

    async def _generate(self, request: Request, arrival: float, *, chat: bool) -> Response:
        principal = self._principal(request)
        await self.sessions.sweep()
        body = await self._body(request)
        req = parse_chat_request(body, self.limits) if chat else parse_completion_request(body, self.limits)
        self._check_model(req.model)
        self._check_max_tokens_limit(req)
        await self._engine_ready()
        self._check_load()
        if chat:
            messages = await resolve_images(self.engine, req.prompt, self._image_policy)  # type: ignore[arg-type]
            req = replace(req, prompt=messages)
        renames = {"prompt": "messages"} if chat else {}
        if req.session_id is not None:
            key: SessionKey = (principal, req.session_id)
            streams = [await self._session_turn(key, req)]
            on_end: Callable[[], None] | None = functools.partial(self.sessions.touch, key)
        else:
            streams = await self._submit(req)
            on_end = None
        formatter = ResponseFormatter(self.engine.tokenizer, chat=chat, model=self.settings.model_name,
                                      include_usage_field=req.stream and req.include_usage,
                                      session_id=req.session_id)
        running = RunningRequest(streams, [self.metrics.timer(arrival) for _ in streams], formatter,
                                 include_usage=req.include_usage, renames=renames, on_end=on_end)
        if req.stream:
            return EventStreamResponse(running.events())
        return JSONResponse(await until_disconnect(request.receive, running.complete()))

    async def _encode(self, req: GenerationRequest) -> tuple[list[int], list[Any]]:
        """The prompt's token ids and (chat) its prepared images, in prompt order."""
        if isinstance(req.prompt, list) and all(isinstance(t, int) for t in req.prompt):
            return list(req.prompt), []  # type: ignore[arg-type]
        param = "messages" if req.chat else "prompt"
        try:
            return await asyncio.to_thread(self.engine.encode_with_images, req.prompt)
        except jinja2.TemplateError as error:
            raise _template_error(error, param) from error
        except ValueError as error:
            raise api_error_of(error, {"prompt": param}) from error

    def _fit_max_tokens(self, params: SamplingParams, prompt_len: int, param: str,
                        max_field: str = "max_tokens") -> SamplingParams:
        """Enforce the context limit with OpenAI's error code and apply ``default_max_tokens``."""
        limit = self.engine.max_model_len
        room = limit - prompt_len
        if room <= 0:
            raise invalid(f"{param}: this model's maximum context length is {limit} tokens, but the prompt "
                          f"has {prompt_len} tokens", param, "context_length_exceeded")
        if params.max_tokens is None:
            default = self.settings.default_max_tokens
            return params if default is None else replace(params, max_tokens=min(default, room))
        if params.max_tokens > room:
            raise invalid(f"{max_field}: this model's maximum context length is {limit} tokens; the prompt "
                          f"has {prompt_len} tokens, leaving room for {room} completion tokens, but "
                          f"{params.max_tokens} were requested", max_field, "context_length_exceeded")
        return params

    def _prompt_len(self, ids: list[int], images: list[Any]) -> int:
        """The prompt's length once each image's placeholder is expanded to its feature rows."""
        vision = self.engine.model_config.vision
        if vision is None:
            return len(ids)
        return len(ids) + sum((image.num_tokens if isinstance(image, PreparedImage) else vision.num_image_tokens) - 1
                              for image in images)

    async def _submit(self, req: GenerationRequest) -> list[RequestStream]:
        ids, images = await self._encode(req)
        param = "messages" if req.chat else "prompt"
        streams: list[RequestStream] = []
        try:
            for params in req.choice_params():
                fitted = self._fit_max_tokens(params, self._prompt_len(ids, images), param, req.max_tokens_field)
                streams.append(self.engine.stream_detailed(ids, params=fitted, images=images))
        except Exception as error:
            for stream in streams:
                await stream.aclose()
            raise api_error_of(error, {"prompt": param, "images": "messages"}) from error
        return streams

    async def _session_turn(self, key: SessionKey, req: GenerationRequest) -> RequestStream:
        """Start a turn on the session ``key``, opening it on its first turn.

        First turn: ``messages`` may seed the transcript (a system message, earlier turns) and must end
        with the user message of this turn. Later turns: ``messages`` is exactly the new user message.
        """
        messages: list[dict[str, Any]] = list(req.prompt)  # type: ignore[arg-type]
        last = len(messages) - 1
        if messages[last]["role"] != "user":
            raise invalid(f"messages[{last}].role: a session turn must end with a user message",
                          f"messages[{last}].role")
        try:
            session = self.sessions.get(key)
        except SessionGoneError as error:
            raise not_found(f"session {key[1]!r} expired or was evicted; its context is gone, so start a new "
                            f"session with a new session_id", "session_not_found", "session_id") from error
        created = session is None
        if session is None:
            try:
                session = self.sessions.create(key, messages[:last])
            except SessionLimitError as error:
                raise unavailable(str(error), "too_many_sessions", retry_after=1) from error
            await self.sessions.flush()
        elif last != 0:
            raise invalid("messages: a turn on an existing session sends only its new user message",
                          "messages")
        renames = {"prompt": "messages", "content": f"messages[{last}].content",
                   "max_tokens": req.max_tokens_field, "images": "messages"}
        try:
            params = req.params
            if params.max_tokens is None and self.settings.default_max_tokens is not None:
                transcript = [*session.messages, messages[last]]
                ids, images = await asyncio.to_thread(self.engine.encode_with_images, transcript)
                params = self._fit_max_tokens(params, self._prompt_len(ids, images), "messages")
            stream = session.stream_detailed(messages[last]["content"], params=params)
        except SessionBusyError as error:
            raise APIError(409, f"session {key[1]!r} already has a turn in progress; wait for it to finish",
                           param="session_id", code="session_busy") from error
        except SessionClosedError as error:
            raise not_found(f"session {key[1]!r} was closed", "session_not_found", "session_id") from error
        except Exception as error:
            if created:
                self.sessions.discard(key)
                await self.sessions.flush()
            if isinstance(error, jinja2.TemplateError):
                raise _template_error(error) from error
            raise api_error_of(error, renames) from error
        self.sessions.touch(key)
        return stream

    async def delete_session(self, request: Request, arrival: float) -> Response:
        principal = self._principal(request)
        await self.sessions.sweep()
        session_id = request.path_params["session_id"]
        try:
            closed = await self.sessions.close((principal, session_id))
        except SessionBusyError as error:
            raise APIError(409, f"session {session_id!r} has a turn in progress; wait for it or disconnect "
                           f"it first", param="session_id", code="session_busy") from error
        if not closed:
            raise not_found(f"no open session {session_id!r}", "session_not_found", "session_id")
        return JSONResponse({"id": session_id, "object": "session", "deleted": True})

    # -- models, tokenizer, health, metrics ----------------------------------------------------
    def _model_card(self) -> dict[str, Any]:
        return {"id": self.settings.model_name, "object": "model", "created": self._created,
                "owned_by": "asyncllm", "max_model_len": self.engine.max_model_len}

    async def list_models(self, request: Request, arrival: float) -> Response:
        self._principal(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def get_model(self, request: Request, arrival: float) -> Response:
        self._principal(request)
        model = request.path_params["model"]
        self._check_model(model)
        return JSONResponse(self._model_card())

    async def tokenize(self, request: Request, arrival: float) -> Response:
        self._principal(request)
        req = parse_tokenize_request(await self._body(request))
        self._check_model(req.model)
        tokenizer = self.engine.tokenizer
        try:
            if req.messages is not None:
                ids = await asyncio.to_thread(tokenizer.apply_chat_template, req.messages,
                                              add_generation_prompt=req.add_generation_prompt)
            else:
                ids = await asyncio.to_thread(tokenizer.encode, req.prompt or "",
                                              add_special_tokens=req.add_special_tokens)
        except jinja2.TemplateError as error:
            raise _template_error(error) from error
        except ValueError as error:
            raise api_error_of(error) from error
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_model_len})

    async def detokenize(self, request: Request, arrival: float) -> Response:
        self._principal(request)
        ids, model, skip_special = parse_detokenize_request(await self._body(request), self.limits.vocab_size)
        self._check_model(model)
        text = self.engine.tokenizer.decode(ids, skip_special_tokens=skip_special)
        return JSONResponse({"prompt": text})

    async def health(self, request: Request, arrival: float) -> Response:
        await self.sessions.sweep()
        await self._engine_ready()
        return JSONResponse({"status": "ok"})

    async def metrics_endpoint(self, request: Request, arrival: float) -> Response:
        await self.sessions.sweep()
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)


def _template_error(error: jinja2.TemplateError, param: str = "messages") -> APIError:
    return invalid(f"{param}: the chat template rejected the messages: {error}", param)


def _error_response(error: APIError) -> JSONResponse:
    return SafeJSONResponse(error.body(), status_code=error.status, headers=error.headers or None)
