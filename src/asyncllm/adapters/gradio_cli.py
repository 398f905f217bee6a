"""``asyncllm gradio MODEL``: the Gradio chat UI (extra ``gradio``) over an in-process engine."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_gradio_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``gradio`` sub-command to an ``argparse`` sub-parsers object and return its parser."""
    from asyncllm.cli_options import engine_args as _engine_args

    parser = subparsers.add_parser("gradio", help="a browser chat UI on Gradio (needs the 'gradio' extra)")
    parser.add_argument("model", nargs="?", default=None,
                        help="HF directory, hub id or .gguf file (default: the SmolLM2 GGUF in the cache)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="TCP port (default 7860)")
    parser.add_argument("--share", choices=["never", "always"], default="never",
                        help="'always' asks Gradio for a public share link (default never)")
    parser.add_argument("--title", default="asyncllm chat")
    parser.add_argument("--system", default=None, help="default system prompt")
    parser.add_argument("--max-tokens", type=int, default=256, help="the max-tokens slider's start value")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    _engine_args(parser)
    return parser


def run_gradio(args: argparse.Namespace) -> int:
    """Load the model, build the UI and serve it until interrupted."""
    from asyncllm.adapters.gradio import MISSING_GRADIO, chat_ui

    try:
        import gradio  # noqa: F401
    except ImportError:
        print(f"asyncllm gradio: {MISSING_GRADIO}", file=sys.stderr)
        return 2
    from asyncllm.cli_options import engine_overrides as _engine_overrides
    from asyncllm.cli_options import resolve_model as _resolve_model
    from asyncllm.engine import AsyncEngine

    model = _resolve_model(args.model)
    print(f"loading {model} ...", file=sys.stderr, flush=True)
    try:
        engine = AsyncEngine.from_pretrained(model, **_engine_overrides(args))
    except (FileNotFoundError, ValueError) as error:
        print(f"asyncllm gradio: error: {error}", file=sys.stderr)
        return 2
    demo = chat_ui(engine, title=args.title, system_prompt=args.system, default_temperature=args.temperature,
                   default_top_p=args.top_p, default_max_tokens=args.max_tokens)
    try:
        demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share == "always")
    except KeyboardInterrupt:
        return 130
    return 0
