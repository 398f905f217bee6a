"""``asyncllm serve MODEL``: the OpenAI-compatible app on uvicorn (extra ``asgi``); with ``--replicas N``,
N engine replicas on Ray Serve (extra ``ray``, see ``asyncllm.adapters.ray_serve_cli``).

API keys come from ``--api-key`` (repeatable) and from the ``ASYNCLLM_API_KEYS`` environment variable
(comma-separated), which keeps them out of the process list.

Shutdown (SIGTERM or Ctrl-C): the listening socket closes at once and idle keep-alive connections are
closed; requests in flight get ``--shutdown-grace`` seconds to finish. Then the engine is closed, which ends
every stream still open with an error event and ``data: [DONE]`` (a non-streamed request gets 503), and the
process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

API_KEYS_ENV = "ASYNCLLM_API_KEYS"
DEFAULT_MAX_TOKENS = 512
"""The completion limit of a request that gives no ``max_tokens`` (``--default-max-tokens``)."""
DEFAULT_SHUTDOWN_GRACE = 10.0
"""Seconds in-flight requests get to finish after SIGTERM before their streams are ended."""
FLUSH_AFTER_GRACE = 5.0
"""Seconds, after the grace period, for the final error events to reach clients before tasks are cancelled."""


def add_serve_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` sub-command to an ``argparse`` sub-parsers object and return its parser."""
    from asyncllm.adapters.ray_serve_cli import add_replica_options
    from asyncllm.cli_options import engine_args as _engine_args

    serve = subparsers.add_parser("serve",
                                  help="serve an OpenAI-compatible HTTP API (needs the 'asgi' extra)")
    serve.add_argument("model", nargs="?", default=None,
                       help="HF directory, hub id or .gguf file (default: the SmolLM2 GGUF in the cache)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (0 picks a free one; default 8000)")
    serve.add_argument("--api-key", action="append", default=[], dest="api_keys",
                       help=f"accepted bearer token (repeatable; also ${API_KEYS_ENV}, comma-separated)")
    serve.add_argument("--model-name", default=None,
                       help="the model id clients send (default: the model file or directory name)")
    serve.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    serve.add_argument("--max-waiting", type=int, default=1024,
                       help="answer 503 while this many requests are queued (0: no limit)")
    serve.add_argument("--max-sessions", type=int, default=256,
                       help="open server-side sessions in all (default 256)")
    serve.add_argument("--max-sessions-per-key", type=int, default=64,
                       help="open sessions per API key (default 64; without keys only --max-sessions applies)")
    serve.add_argument("--session-idle-timeout", type=float, default=900.0, help="seconds")
    serve.add_argument("--default-max-tokens", type=int, default=None,
                       help=f"completion limit when a request gives none (default {DEFAULT_MAX_TOKENS}, "
                            f"or --max-tokens-limit if lower; 0: until the context is full)")
    serve.add_argument("--max-tokens-limit", type=int, default=None,
                       help="largest max_tokens a request may ask for; larger get 400 (default: the context)")
    serve.add_argument("--allowed-image-hosts", type=_host_list, action="extend", default=[], metavar="HOSTS",
                       help="comma-separated hosts whose http(s) image URLs may be fetched (repeatable; default: "
                            "none, only inline data: URLs are read)")
    serve.add_argument("--image-fetch-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="time limit of one image fetch (default %(default)g)")
    serve.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024, metavar="N",
                       help="largest encoded image fetched or inlined (default 20 MiB)")
    serve.add_argument("--max-images-per-request", type=int, default=None, metavar="N",
                       help="images one request may hold (default: the engine's, 8)")
    serve.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                       help="largest image, width times height (default: the engine's, 4096*4096)")
    serve.add_argument("--shutdown-grace", type=float, default=DEFAULT_SHUTDOWN_GRACE,
                       help=f"seconds in-flight requests get to finish after SIGTERM/Ctrl-C before their "
                            f"streams end with an error event (default {DEFAULT_SHUTDOWN_GRACE:g})")
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])
    add_replica_options(serve)
    _engine_args(serve)
    return serve


def _host_list(text: str) -> list[str]:
    return [host.strip() for host in text.split(",") if host.strip()]


def _image_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in ("max_images_per_request", "max_image_pixels")
            if getattr(args, name) is not None}


def _api_keys(args: argparse.Namespace) -> list[str]:
    keys = list(args.api_keys)
    keys.extend(k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip())
    return keys


def _model_path(args: argparse.Namespace) -> str:
    if args.model:
        return str(args.model)
    from asyncllm.assets import MISSING_DEFAULT_MODEL, default_model_path

    path = default_model_path()
    if path is None:
        raise SystemExit(MISSING_DEFAULT_MODEL)
    return str(path)


def _model_name(args: argparse.Namespace, model: str) -> str:
    if args.model_name:
        return str(args.model_name)
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else (path.name or model)


def _default_max_tokens(args: argparse.Namespace) -> int | None:
    if args.default_max_tokens is not None:
        return args.default_max_tokens or None
    limit = args.max_tokens_limit
    return DEFAULT_MAX_TOKENS if limit is None or limit < 1 else min(DEFAULT_MAX_TOKENS, limit)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket bound to ``host:port``.

    Created with ``IPPROTO_TCP`` explicitly: asyncio sets ``TCP_NODELAY`` only on sockets whose ``proto``
    says TCP, and accepted sockets inherit it. With ``proto`` 0, Nagle's algorithm stays on, and a response
    written in two parts (headers, then body) waits for the client's delayed ACK: about 40 ms per response
    on a kept-alive connection.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # listen now, before the address is printed: a client connecting while the app still starts up
        # waits in the backlog instead of being refused (the server listens again with its own backlog)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _draining_server(config: Any, grace: float, end_streams: Any) -> Any:
    """A uvicorn server whose shutdown gives in-flight requests ``grace`` seconds, then awaits
    ``end_streams()`` (which must end them with an error) while uvicorn still waits for them to finish."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        interrupted = False
        """Whether a SIGINT (Ctrl-C) asked it to stop: uvicorn re-raises the signal after shutting down, but
        asyncio's runner may turn that into a normal return when the serving task is already finishing."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            if sig == signal.SIGINT:
                self.interrupted = True
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            async def end_after_grace() -> None:
                await asyncio.sleep(grace)
                await end_streams()

            ender = asyncio.ensure_future(end_after_grace())
            try:
                await super().shutdown(sockets)
            finally:
                ender.cancel()
                with contextlib.suppress(BaseException):
                    await ender

    return DrainingServer(config)


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, bind ``--host``/``--port``, print the address, and serve until interrupted."""
    try:
        import uvicorn

        from asyncllm.adapters.asgi import ServerSettings, create_app
    except ImportError as error:
        print(f"asyncllm serve needs the 'asgi' extra (pip install 'asyncllm[asgi]'): {error}",
              file=sys.stderr)
        return 2
    from asyncllm.adapters.ray_serve_cli import check_replica_options, run_replicas
    from asyncllm.cli_options import check_engine_options
    from asyncllm.cli_options import engine_overrides as _engine_overrides
    from asyncllm.config import EngineConfig
    from asyncllm.engine import AsyncEngine

    model = _model_path(args)
    try:
        settings = ServerSettings(
            model_name=_model_name(args, model), api_keys=tuple(_api_keys(args)),
            max_body_bytes=args.max_body_bytes, max_waiting=args.max_waiting or None,
            max_sessions=args.max_sessions, max_sessions_per_key=args.max_sessions_per_key,
            session_idle_timeout=args.session_idle_timeout, default_max_tokens=_default_max_tokens(args),
            max_tokens_limit=args.max_tokens_limit, allowed_image_hosts=tuple(args.allowed_image_hosts),
            image_fetch_timeout=args.image_fetch_timeout, max_image_bytes=args.max_image_bytes,
        )
        check_engine_options(args)
        overrides = {**_engine_overrides(args), **_image_overrides(args)}
        EngineConfig(**overrides)  # a bad limit is reported before the model loads
        check_replica_options(args)
        if not (args.shutdown_grace >= 0 and args.shutdown_grace < float("inf")):
            raise ValueError(f"--shutdown-grace: must be a number of seconds >= 0, got {args.shutdown_grace}")
    except ValueError as error:
        print(f"asyncllm serve: {error}", file=sys.stderr)
        return 2
    if args.replicas:
        return run_replicas(args, model, settings, overrides)
    print(f"loading {model} ...", file=sys.stderr, flush=True)
    engine = AsyncEngine.from_pretrained(model, **overrides)
    app = create_app(engine, settings=settings)

    try:
        sock = bind_socket(args.host, args.port)
    except OSError as error:
        print(f"asyncllm serve: cannot bind {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {settings.model_name!r} at http://{shown}:{port}/v1"
          f"{' (API key required)' if settings.api_keys else ''}", flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, lifespan="on",
                            timeout_graceful_shutdown=args.shutdown_grace + FLUSH_AFTER_GRACE)
    server = _draining_server(config, args.shutdown_grace, engine.aclose)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        return 130
    finally:
        sock.close()
    return 130 if server.interrupted else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m asyncllm.adapters.serve_cli serve MODEL ...``."""
    parser = argparse.ArgumentParser(prog="asyncllm")
    add_serve_command(parser.add_subparsers(dest="command", required=True))
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
