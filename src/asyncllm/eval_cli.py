"""``asyncllm eval perplexity MODEL``: sliding-window perplexity of a model on a text (``asyncllm.perplexity``).

The text is ``--text FILE`` (plain text, or JSON Lines with a ``text`` field per line: see
``corpus.read_text_file``), or by default the held-out part of the standard library's docstrings
(``corpus.stdlib_text("heldout")``, which depends on the Python version). Prints one line with the
perplexity, the scored tokens, the windows and the time, or with ``--json`` one JSON object
(``PerplexityResult.as_dict``). On a terminal, progress goes to stderr.

Exit status: 0 on success, 1 when the default model is not on this machine, 2 for an invalid argument, a
missing file or a text too short to score (the message names the field).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from asyncllm.perplexity import DEFAULT_BATCH_SIZE, DEFAULT_SEQLEN, DEFAULT_STRIDE, PerplexityResult


def add_eval_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` (with its ``perplexity`` sub-command) on an ``argparse`` sub-parser collection;
    dispatch it with ``run_eval(args)``."""
    parser: argparse.ArgumentParser = subparsers.add_parser("eval", help="evaluate a model (perplexity)")
    commands = parser.add_subparsers(dest="eval_command", required=True)
    ppl = commands.add_parser(
        "perplexity", help="sliding-window perplexity on a text (default: held-out stdlib docstrings)",
        description="Sliding-window perplexity (Hugging Face's fixed-length-model windows) through the "
                    "engine's model path.")
    ppl.add_argument("model", help="HF directory, hub id or .gguf file ('default' for the SmolLM2 GGUF)")
    ppl.add_argument("--text", default=None, metavar="FILE",
                     help="plain text, or .jsonl/.json lines with a 'text' field (default: the held-out "
                          "standard-library docstrings of this Python)")
    ppl.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN,
                     help=f"tokens per window (default {DEFAULT_SEQLEN})")
    ppl.add_argument("--stride", type=int, default=None,
                     help=f"tokens between window starts (default: half of --seqlen, {DEFAULT_STRIDE} at "
                          f"{DEFAULT_SEQLEN})")
    ppl.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                     help=f"windows per forward pass (default {DEFAULT_BATCH_SIZE})")
    ppl.add_argument("--json", action="store_true", help="print one JSON object instead of a line")
    ppl.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    ppl.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    ppl.add_argument("--kernel-backend", default="auto", choices=["auto", "torch", "triton"])
    ppl.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "int4", "k8v4"],
                     help="cache the windows' keys and values quantized, as the engine would (default: %(default)s)")
    ppl.add_argument("--dequantize-weights", action="store_true",
                     help="decode a quantized checkpoint to dense weights at load instead of keeping it packed")
    return parser


def _error(message: object) -> int:
    print(f"asyncllm eval: error: {message}", file=sys.stderr)
    return 2


def _model_path(model: str) -> str | None:
    if model != "default":
        return model
    from asyncllm.assets import default_model_path

    path = default_model_path()
    return None if path is None else str(path)


class _Progress:
    """A one-line progress report on stderr, rewritten in place (only on a terminal)."""

    def __init__(self) -> None:
        self.shown = False

    def __call__(self, done: int, total: int, elapsed: float) -> None:
        print(f"\r[eval] windows {done}/{total}, {elapsed:.1f} s", end="", file=sys.stderr, flush=True)
        self.shown = True

    def close(self) -> None:
        if self.shown:
            print(file=sys.stderr, flush=True)


def format_result(result: PerplexityResult) -> str:
    """The human line ``asyncllm eval perplexity`` prints."""
    return (f"perplexity {result.perplexity:.4f} (nll {result.nll:.4f} nats/token) over {result.tokens} "
            f"scored tokens in {result.windows} windows (seqlen {result.seqlen}, stride {result.stride}); "
            f"{result.seconds:.1f} s (load {result.load_seconds:.1f} s); {result.model} on {result.text}"
            + ("" if result.kv_cache_dtype == "auto" else f"; KV cache {result.kv_cache_dtype}"))


def run_eval(args: argparse.Namespace) -> int:
    """Run a parsed ``eval`` command; see the module docstring for the exit status."""
    from asyncllm.assets import MISSING_DEFAULT_MODEL
    from asyncllm.corpus import read_text_file
    from asyncllm.perplexity import perplexity

    model = _model_path(args.model)
    if model is None:
        print(MISSING_DEFAULT_MODEL, file=sys.stderr)
        return 1
    text = text_name = None
    if args.text is not None:
        try:
            text, text_name = read_text_file(args.text), str(args.text)
        except (FileNotFoundError, ValueError, UnicodeDecodeError) as error:
            return _error(f"--text: {error}")
    progress = _Progress() if sys.stderr.isatty() and not args.json else None
    try:
        print(f"loading {model} ...", file=sys.stderr, flush=True)
        result = perplexity(
            model, text, seqlen=args.seqlen, stride=args.stride, batch_size=args.batch_size,
            device=args.device, dtype=args.dtype, kernel_backend=args.kernel_backend,
            dequantize_weights=args.dequantize_weights, kv_cache_dtype=args.kv_cache_dtype, text_name=text_name,
            progress=progress,
        )
    except (FileNotFoundError, ValueError) as error:  # a bad option, model path or text: no traceback
        return _error(error)
    except KeyboardInterrupt:
        return 130
    finally:
        if progress is not None:
            progress.close()
    print(result.to_json() if args.json else format_result(result), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m asyncllm.eval_cli eval perplexity MODEL ...``."""
    parser = argparse.ArgumentParser(prog="asyncllm")
    add_eval_command(parser.add_subparsers(dest="command", required=True))
    return run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
