"""``asyncllm quantize MODEL --out DIR``: AWQ or round-to-nearest W4A16 / W8A16 into a compressed-tensors
checkpoint (``asyncllm.quant.quantize_model``). Progress and notices go to stderr, the summary to stdout."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from asyncllm.quant.quantize_model import DEFAULT_SAMPLES, DEFAULT_SEQLEN, METHODS

_DTYPES = ("float16", "bfloat16", "float32")


def add_quantize_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``quantize`` sub-command to an ``argparse`` sub-parsers object and return its parser."""
    parser = subparsers.add_parser(
        "quantize", help="quantize a model's weights (AWQ or RTN, int4/int8) into a compressed-tensors directory")
    parser.add_argument("model", help="HF directory, hub id or .gguf file ('default' for SmolLM2)")
    parser.add_argument("--out", required=True, help="directory to create (written atomically)")
    parser.add_argument("--method", default="awq", choices=METHODS, help="awq (default) or rtn")
    parser.add_argument("--bits", type=int, default=4, help="4 (default) or 8")
    parser.add_argument("--group-size", type=int, default=128,
                        help="inputs per quantization group, a power of two (default 128; linears it does not "
                             "divide use the largest power of two that does)")
    parser.add_argument("--symmetric", action="store_true", help="symmetric codes (default asymmetric)")
    parser.add_argument("--calib", default=None,
                        help="calibration text: plain text, or JSON Lines with a 'text' field (default: the "
                             "standard library's documentation, offline)")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                        help=f"calibration windows (default {DEFAULT_SAMPLES})")
    parser.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN,
                        help=f"tokens per calibration window (default {DEFAULT_SEQLEN})")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=_DTYPES,
                        help="dtype of the unquantized tensors written (default: the source's, else float16)")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR once the new one is complete")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_quantize(args: argparse.Namespace) -> int:
    """Run the ``quantize`` sub-command; returns the exit status (2 for bad arguments, 130 when
    interrupted: nothing is left behind either way)."""
    import torch

    from asyncllm.assets import MISSING_DEFAULT_MODEL, default_model_path
    from asyncllm.quant.quantize_model import quantize

    model = args.model
    if model == "default":
        path = default_model_path()
        if path is None:
            print(MISSING_DEFAULT_MODEL, file=sys.stderr)
            return 2
        model = str(path)
    try:
        result = quantize(
            model, args.out, method=args.method, bits=args.bits, group_size=args.group_size,
            symmetric=args.symmetric, calib=args.calib, samples=args.samples, seqlen=args.seqlen,
            device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None,
            overwrite=args.overwrite, progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print("asyncllm quantize: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError) as error:
        print(f"asyncllm quantize: error: {error}", file=sys.stderr)
        return 2
    sizes = sorted(set(result.group_sizes.values()))
    print(f"wrote {result.out}: {result.method} int{result.bits} "
          f"{'symmetric' if result.symmetric else 'asymmetric'}, {len(result.group_sizes)} linears in groups of "
          f"{'/'.join(str(s) for s in sizes)}, {result.calibration_tokens} calibration tokens, "
          f"{result.seconds:.1f} s")
    return 0
