"""Command-line options shared by ``asyncllm`` sub-commands (``chat``, ``generate``, ``serve``, ``gradio``):
the engine and sampling options, their mapping to ``EngineConfig`` / sampling keywords, and the checks that
run before any model loads. Every sub-command module imports this one; it imports none of them."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from asyncllm import assets

if TYPE_CHECKING:
    from asyncllm.config import EngineConfig


def check_device(device: str | None) -> None:
    """Refuse, with ``ValueError`` naming ``device``, a device this process cannot use: a malformed name,
    CUDA on a torch without a usable GPU, or a GPU index past the last. ``None`` and ``auto`` pass."""
    if device is None or device in ("auto", "cpu"):
        return
    kind, colon, index = device.partition(":")
    if kind != "cuda" or (colon and not index.isdigit()):
        raise ValueError(f"device: must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"device: {device!r} requested, but no CUDA GPU is usable (torch {torch.__version__}, "
                         f"{build}); use --device cpu or auto")
    if index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"device: {device!r} requested, but only {torch.cuda.device_count()} CUDA GPU(s) "
                         f"are visible")


def check_sampling(args: argparse.Namespace) -> None:
    """Validate the sampling options (``ValueError`` naming the field) before any model is loaded."""
    from asyncllm.sampling_params import SamplingParams

    SamplingParams(**sampling_options(args))


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"512MiB"``, ``"2GB"``, ``"1.5 GiB"`` or a plain byte count -> bytes (argparse reports the
    ``ValueError`` of a malformed size as an invalid value of the option)."""
    number = text.strip().rstrip("bBiIkKmMgGtT ")
    unit = text.strip()[len(number):].strip().lower()
    if unit not in _BYTE_UNITS:
        raise ValueError(f"unknown size unit {unit!r} in {text!r} (use B, KB, MB, GB, KiB, MiB or GiB)")
    value = float(number) * _BYTE_UNITS[unit]
    if not value > 0:
        raise ValueError(f"a size must be positive, got {text!r}")
    return int(value)


def resolve_model(model: str | None) -> str:
    """``model``, or the default model's path (``SystemExit`` with how to fetch it when it is missing)."""
    if model:
        return model
    path = assets.default_model_path()
    if path is None:
        raise SystemExit(assets.MISSING_DEFAULT_MODEL)
    return str(path)


def engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine options shared by ``chat``, ``generate``, ``serve`` and ``gradio`` (``engine_overrides``
    maps them to ``EngineConfig`` fields)."""
    from asyncllm.config import EngineConfig

    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N or auto: CUDA when a GPU is usable, else CPU (default: %(default)s)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="weight and activation dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--kv-cache-tokens", type=int, default=None, metavar="N",
                        help=f"KV pool size in tokens on CPU (default: {EngineConfig.kv_cache_tokens})")
    parser.add_argument("--gpu-memory-fraction", type=float, default=None, metavar="F",
                        help=f"share of the GPU's memory the weights and KV pool may use on CUDA, in (0, 1] "
                             f"(default: {EngineConfig.gpu_memory_fraction})")
    parser.add_argument("--max-model-len", type=int, default=None, metavar="N",
                        help="context bound in tokens (default: the model's positions, capped by the KV pool)")
    parser.add_argument("--max-batch-size", "--max-num-seqs", dest="max_num_seqs", type=int, default=None,
                        metavar="N",
                        help=f"most sequences decoded together in one step; more requests wait "
                             f"(default: {EngineConfig.max_num_seqs})")
    parser.add_argument("--kv-cache-dtype", default="auto", metavar="DTYPE",
                        help="how keys and values are cached: auto (the model's dtype), int8 (quantized per "
                             "token and head as they are written: about 1.9x the tokens of a 16-bit cache in the "
                             "same memory), k8v4 (keys int8, values int4: about 2.5x) or int4 (keys as residuals "
                             "against each block's first token, a scale pair per 16 dimensions: about 2.8x) "
                             "(default: %(default)s)")
    parser.add_argument("--quant-policy", type=int, default=0, metavar="BITS",
                        help="the same choice in bits: 8 (int8), 4 (int4) or 0 (off) (default: %(default)s)")
    parser.add_argument("--kv-cache-memory", type=parse_bytes, default=None, metavar="SIZE",
                        help="the KV pool's memory budget (all layers, with any scales), e.g. 512MiB or 2GB; "
                             "when given it sizes the pool instead of the token count or GPU memory fraction "
                             "(default: not set)")
    parser.add_argument("--rope-scaling-factor", type=float, default=None, metavar="F",
                        help="extend the model's context F times with dynamic NTK rotary scaling, replacing "
                             "the checkpoint's own rope scaling (default: the checkpoint's)")
    parser.add_argument("--threads", dest="num_threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch's ops and the native kernels (default: the CPUs this process "
                             "may use: affinity, cgroup quota and physical cores, the least of them)")
    parser.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N",
                        help="split the model over N ranks, each a worker process: cuda:0..N-1 over NCCL, or CPU "
                             "processes over gloo sharing the CPUs (--threads then counts per rank); Llama-family "
                             "text models (default: 1, no split)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar while the model loads (default: a bar on stderr when it is a "
                             "terminal and loading takes over a second)")
    parser.add_argument("--dequantize-weights", action="store_true",
                        help="decode a quantized checkpoint (GGUF, AWQ, GPTQ, compressed-tensors) to dense "
                             "weights at load instead of keeping it packed (default: keep it packed)")


def sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256, help="completion limit (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="0 is greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None,
                        help="makes sampling reproducible (default: none, a different reply each run)")


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``EngineConfig`` keyword overrides that the ``engine_args`` options ask for."""
    overrides: dict[str, Any] = {"device": args.device, "dtype": args.dtype, "max_model_len": args.max_model_len}
    for name in ("kv_cache_tokens", "gpu_memory_fraction", "max_num_seqs", "num_threads", "tensor_parallel_size"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.kv_cache_dtype != "auto":
        overrides["kv_cache_dtype"] = args.kv_cache_dtype
    if args.quant_policy:
        overrides["quant_policy"] = args.quant_policy
    if args.kv_cache_memory is not None:
        overrides["kv_cache_bytes"] = args.kv_cache_memory
    if args.dequantize_weights:
        overrides["dequantize_weights"] = True
    if getattr(args, "rope_scaling_factor", None) is not None:
        overrides["rope_scaling_factor"] = args.rope_scaling_factor
    if args.quiet:
        overrides["load_progress"] = False
    return overrides


def check_engine_options(args: argparse.Namespace) -> None:
    """Refuse, with ``ValueError``, ``engine_args`` options that cannot work, before any model loads:
    an unusable device and out-of-range ``EngineConfig`` values (``kv_cache_dtype``, ``quant_policy``, ...)."""
    from asyncllm.config import EngineConfig

    check_device(args.device)
    config = EngineConfig(**engine_overrides(args))
    check_tensor_parallel_devices(config)


def check_tensor_parallel_devices(config: EngineConfig) -> None:
    """Refuse, with ``ValueError`` naming ``tensor_parallel_size``, more CUDA ranks than visible GPUs."""
    size = config.tensor_parallel_size
    if size == 1 or config.device == "cpu":
        return
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < size:
        raise ValueError(f"tensor_parallel_size: {size} ranks need {size} CUDA GPUs, "
                         f"{torch.cuda.device_count()} are visible")


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "seed": getattr(args, "seed", None)}
