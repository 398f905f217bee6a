"""Command line: ``asyncllm chat | generate | serve | quantize | eval perplexity | bench | fetch-default``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from asyncllm.adapters.gradio_cli import add_gradio_command, run_gradio
from asyncllm.adapters.serve_cli import add_serve_command, run_serve
from asyncllm.assets import fetch_default_model
from asyncllm.bench import add_bench_command, run_bench
from asyncllm.cli_options import (
    check_device,
    check_engine_options,
    check_sampling,
)
from asyncllm.cli_options import engine_args as _engine_args
from asyncllm.cli_options import engine_overrides as _engine_overrides
from asyncllm.cli_options import resolve_model as _resolve_model
from asyncllm.cli_options import sampling_args as _sampling_args
from asyncllm.cli_options import sampling_options as _sampling
from asyncllm.eval_cli import add_eval_command, run_eval
from asyncllm.quantize_cli import add_quantize_command, run_quantize

if TYPE_CHECKING:
    from asyncllm.outputs import Usage
    from asyncllm.streams import RequestStream


def package_version() -> str:
    """The installed distribution's version, else ``asyncllm.__version__`` (a source checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("asyncllm")
    except PackageNotFoundError:
        import asyncllm

        return str(getattr(asyncllm, "__version__", "unknown"))


async def _print_stream(stream: RequestStream) -> Usage | None:
    """Write a stream's text to stdout as it arrives; return its usage once finished."""
    async for out in stream:
        sys.stdout.write(out.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return stream.completion.usage if stream.completion is not None else None


async def _generate(args: argparse.Namespace) -> int:
    from asyncllm.engine import AsyncEngine

    engine = AsyncEngine.from_pretrained(_resolve_model(args.model), **_engine_overrides(args))
    async with engine:
        templated = not args.raw and engine.tokenizer.has_chat_template
        prompt: Any = [{"role": "user", "content": args.prompt}] if templated else args.prompt
        usage = await _print_stream(engine.stream_detailed(prompt, **_sampling(args)))
        if args.verbose and usage is not None:
            print(f"[prompt {usage.prompt_tokens} tokens, completion {usage.completion_tokens}]", file=sys.stderr)
    return 0


def _enable_line_editing() -> None:
    """Line editing and history for ``input()`` where the platform has ``readline``."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (importing it is what makes input() use it)


@contextlib.contextmanager
def _terminal_restored() -> Iterator[None]:
    """Put the terminal's settings back on the way out: quitting with Ctrl-C at the prompt leaves a
    ``readline`` read pending on its thread, with the terminal still in its editing mode."""
    try:
        import termios

        saved = termios.tcgetattr(sys.stdin.fileno())
    except Exception:  # not a terminal, or no termios on this platform
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)


async def _read_line(prompt: str) -> str:
    """``input(prompt)`` on a daemon thread, so that quitting never waits for a pending read.
    Raises ``EOFError`` at the end of input."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()

    def read() -> None:
        try:
            line: str | BaseException = input(prompt)
        except BaseException as error:  # EOFError, or an error of the terminal
            line = error
        loop.call_soon_threadsafe(_settle, future, line)

    threading.Thread(target=read, name="asyncllm-chat-input", daemon=True).start()
    return await future


def _settle(future: asyncio.Future[str], value: str | BaseException) -> None:
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


async def _chat(args: argparse.Namespace) -> int:
    from asyncllm.engine import AsyncEngine

    model = _resolve_model(args.model)
    if not args.quiet:
        print(f"loading {model} ...", file=sys.stderr)
    engine = AsyncEngine.from_pretrained(model, **_engine_overrides(args))
    _enable_line_editing()
    loop = asyncio.get_running_loop()
    with _terminal_restored():
        return await _chat_loop(engine, args, loop)


async def _chat_loop(engine: Any, args: argparse.Namespace, loop: asyncio.AbstractEventLoop) -> int:
    from asyncllm.chat_console import ChatConsole

    async with engine:
        console = ChatConsole(engine, system=args.system, sampling=_sampling(args), out=sys.stdout,
                              err=sys.stderr, verbose=args.verbose)
        reading: asyncio.Future[str] | None = None

        def on_interrupt() -> None:  # Ctrl-C: stop the reply in progress, else quit
            if not console.interrupt() and reading is not None:
                reading.cancel()

        try:
            loop.add_signal_handler(signal.SIGINT, on_interrupt)
            handled = True
        except (NotImplementedError, RuntimeError, ValueError):  # no signal handlers here: Ctrl-C quits
            handled = False
        print("chat ready: /help lists the commands, Ctrl-C stops a reply, /exit quits.", file=sys.stderr)
        try:
            while True:
                reading = asyncio.ensure_future(_read_line(console.prompt))
                try:
                    line = await reading
                except EOFError:
                    break
                except asyncio.CancelledError:
                    if reading.cancelled():  # Ctrl-C at the prompt
                        print(file=sys.stderr)
                        return 130
                    raise
                finally:
                    reading = None
                if not await console.handle(line):
                    break
        finally:
            if handled:
                loop.remove_signal_handler(signal.SIGINT)
            await console.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncllm", description="asyncio-native LLM inference")
    parser.add_argument("--version", action="version", version=f"asyncllm {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="streaming terminal chat (default model: SmolLM2-135M-Instruct)")
    chat.add_argument("model", nargs="?", default=None,
                      help="HF directory, hub id or .gguf file (default: the SmolLM2 GGUF in the cache)")
    chat.add_argument("--system", default=None, help="system message (default: none)")
    chat.add_argument("-v", "--verbose", action="store_true",
                      help="print token usage after each reply (default: off; /stats shows the last one)")
    _engine_args(chat)
    _sampling_args(chat)

    gen = sub.add_parser("generate", help="complete one prompt and stream it to stdout")
    gen.add_argument("model", help="HF directory, hub id or .gguf file ('default' for SmolLM2)")
    gen.add_argument("prompt")
    template = gen.add_mutually_exclusive_group()
    template.add_argument("--raw", action="store_true",
                          help="complete the prompt text as is (default: send it as a user message through "
                               "the model's chat template, when the model has one)")
    template.add_argument("--chat", action="store_true",
                          help="accepted for compatibility: the chat template is already the default")
    gen.add_argument("-v", "--verbose", action="store_true", help="print token usage after the reply (default: off)")
    _engine_args(gen)
    _sampling_args(gen)

    add_serve_command(sub)
    add_gradio_command(sub)
    add_quantize_command(sub)
    add_bench_command(sub)
    add_eval_command(sub)
    sub.add_parser("fetch-default", help="download the default model GGUF into ~/.cache/asyncllm")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("chat", "generate", "serve", "gradio") and args.model == "default":
        args.model = None  # the default model (SmolLM2 GGUF in the cache)
    try:  # options that need no model are checked before one is loaded
        if args.command in ("chat", "generate", "serve", "gradio"):
            check_engine_options(args)
        else:
            check_device(getattr(args, "device", None))
        if args.command in ("chat", "generate", "gradio"):
            check_sampling(args)
    except ValueError as error:
        print(f"asyncllm {args.command}: error: {error}", file=sys.stderr)
        return 2
    if args.command == "bench":
        return run_bench(args)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "gradio":
        return run_gradio(args)
    if args.command == "quantize":
        return run_quantize(args)
    if args.command == "eval":
        return run_eval(args)
    if args.command == "fetch-default":
        print(fetch_default_model())
        return 0
    runner = {"chat": _chat, "generate": _generate}[args.command]
    try:
        return asyncio.run(runner(args))
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError) as error:  # a bad model path or option: say so, no traceback
        print(f"asyncllm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
