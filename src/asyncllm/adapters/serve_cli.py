"""``asyncllm serve MODEL``: the OpenAI-compatible app on uvicorn (extra ``asgi``).

API keys come from ``--api-key`` (repeatable) and from the ``ASYNCLLM_API_KEYS`` environment variable
(comma-separated), which keeps them out of the process list.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

API_KEYS_ENV = "ASYNCLLM_API_KEYS"


def add_serve_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` sub-command to an ``argparse`` sub-parsers object and return its parser."""
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
    serve.add_argument("--max-sessions", type=int, default=256)
    serve.add_argument("--session-idle-timeout", type=float, default=900.0, help="seconds")
    serve.add_argument("--default-max-tokens", type=int, default=None)
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    serve.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    serve.add_argument("--kv-cache-tokens", type=int, default=None, help="KV pool size in tokens (CPU)")
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--max-num-seqs", type=int, default=None)
    return serve


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


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, bind ``--host``/``--port``, print the address, and serve until interrupted."""
    try:
        import uvicorn

        from asyncllm.adapters.asgi import ServerSettings, create_app
    except ImportError as error:
        print(f"asyncllm serve needs the 'asgi' extra (pip install 'asyncllm[asgi]'): {error}",
              file=sys.stderr)
        return 2
    from asyncllm.engine import AsyncEngine

    model = _model_path(args)
    try:
        settings = ServerSettings(
            model_name=_model_name(args, model), api_keys=tuple(_api_keys(args)),
            max_body_bytes=args.max_body_bytes, max_waiting=args.max_waiting or None,
            max_sessions=args.max_sessions, session_idle_timeout=args.session_idle_timeout,
            default_max_tokens=args.default_max_tokens,
        )
    except ValueError as error:
        print(f"asyncllm serve: {error}", file=sys.stderr)
        return 2
    overrides: dict[str, Any] = {"device": args.device, "dtype": args.dtype,
                                 "max_model_len": args.max_model_len}
    if args.kv_cache_tokens is not None:
        overrides["kv_cache_tokens"] = args.kv_cache_tokens
    if args.max_num_seqs is not None:
        overrides["max_num_seqs"] = args.max_num_seqs
    print(f"loading {model} ...", file=sys.stderr, flush=True)
    engine = AsyncEngine.from_pretrained(model, **overrides)
    app = create_app(engine, settings=settings)

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as error:
        sock.close()
        print(f"asyncllm serve: cannot bind {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {settings.model_name!r} at http://{shown}:{port}/v1"
          f"{' (API key required)' if settings.api_keys else ''}", flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, lifespan="on", timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        return 130
    finally:
        sock.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m asyncllm.adapters.serve_cli serve MODEL ...``."""
    parser = argparse.ArgumentParser(prog="asyncllm")
    add_serve_command(parser.add_subparsers(dest="command", required=True))
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
