"""``quantize``: a model to a weight-only int4 / int8 compressed-tensors checkpoint, by AWQ or round-to-nearest.

The steps, whatever the source (HF directory, hub id, GGUF file; quantized sources are dequantized first):

1. the model is built dense in float32 over the engine's kernels on ``device``;
2. ``method="awq"``: ``samples`` windows of ``seqlen`` tokens, evenly spaced over the calibration text (the
   standard library's documentation by default, ``asyncllm.corpus``), run through the decoder one layer at
   a time (``awq_layers``); ``method="rtn"`` skips calibration;
3. every decoder linear is quantized round-to-nearest (``quant.rtn``), asymmetric unless ``symmetric``,
   with scales rounded to float16, in groups of ``group_size`` inputs, or, for a linear whose input size
   it does not divide, of the largest power of two that does (said on stderr; such models get one
   ``config_groups`` entry per group size);
4. the checkpoint is written as compressed-tensors ``pack-quantized`` with the tokenizer and chat
   template (``ct_writer``), atomically: a temporary sibling directory renamed at the end.

Memory: the dense float32 model plus one layer's calibration activations (``samples * seqlen`` rows).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TextIO

import torch

from asyncllm.quant.awq_search import QuantScheme

Method = Literal["awq", "rtn"]
METHODS: tuple[Method, ...] = ("awq", "rtn")
DEFAULT_SAMPLES = 32
DEFAULT_SEQLEN = 256
MIN_GROUP_SIZE = 16


@dataclass(frozen=True)
class QuantizeResult:
    """What ``quantize`` wrote and how long it took."""

    out: Path
    method: Method
    bits: int
    symmetric: bool
    group_sizes: dict[str, int]
    """Group size of each quantized linear, by Hugging Face module name."""
    calibration_tokens: int
    seconds: float
    layer_errors: list[dict[str, tuple[float, float]]] = field(default_factory=list)
    """AWQ: per layer, each smoothing group's block error ``(rtn, awq)`` on the calibration data."""


def check_arguments(method: str, bits: int, group_size: int, samples: int, seqlen: int) -> None:
    """``ValueError`` naming the first bad argument."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"bits: expected 4 or 8, got {bits!r}")
    if (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < MIN_GROUP_SIZE
            or group_size & (group_size - 1)):
        raise ValueError(f"group_size: expected a power of two >= {MIN_GROUP_SIZE}, got {group_size!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples: expected a positive integer, got {samples!r}")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen: expected an integer >= 2, got {seqlen!r}")


def group_size_for(in_features: int, requested: int) -> int:
    """``requested`` when it divides ``in_features``, else the largest power of two that does (below it);
    ``ValueError`` when that is below 16."""
    if in_features % requested == 0:
        return requested
    size = in_features & -in_features
    size = min(size, requested)
    if size < MIN_GROUP_SIZE:
        raise ValueError(f"group_size: no power-of-two group of at least {MIN_GROUP_SIZE} divides "
                         f"{in_features} input features")
    return size


def calibration_windows(token_ids: list[int], samples: int, seqlen: int) -> list[list[int]]:
    """``samples`` windows of ``seqlen`` tokens evenly spaced over ``token_ids`` (all of them when it holds
    fewer); ``ValueError`` when it holds not even one."""
    count = len(token_ids) // seqlen
    if count == 0:
        raise ValueError(f"calib: the text has {len(token_ids)} tokens, fewer than one window of seqlen={seqlen}")
    taken = min(samples, count)
    picks = sorted({round(i * (count - 1) / max(1, taken - 1)) for i in range(taken)})
    return [token_ids[i * seqlen:(i + 1) * seqlen] for i in picks]


def quantize(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    method: Method = "awq",
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = False,
    calib: str | os.PathLike[str] | None = None,
    samples: int = DEFAULT_SAMPLES,
    seqlen: int = DEFAULT_SEQLEN,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: TextIO | None = None,
) -> QuantizeResult:
    """Quantize ``model`` into the directory ``out`` (see the module docstring); returns what was done.

    ``dtype``: the dtype of the checkpoint's unquantized tensors (embeddings, norms; default the source's
    ``torch_dtype``, float16 when it has none); ``device``: where the work runs (CUDA when available);
    ``overwrite``: replace an existing ``out`` once the new checkpoint is complete. ``log`` (stderr by
    default) receives the notices; ``progress`` shows a bar per layer there."""
    check_arguments(method, bits, group_size, samples, seqlen)
    from asyncllm.builder import model_from_checkpoint
    from asyncllm.config import EngineConfig
    from asyncllm.loaders import load_checkpoint
    from asyncllm.quant.ct_writer import write_quantized_checkpoint
    from asyncllm.quant.hf_export import hf_tensors
    from asyncllm.quant.rtn import quantize_rtn

    log = log if log is not None else sys.stderr
    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out: {out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    resolved = torch.device(device) if device is not None else _default_device()
    checkpoint = load_checkpoint(model, dequantize_weights=True)
    config = EngineConfig(device=str(resolved), dtype="float32", dequantize_weights=True)
    built = model_from_checkpoint(checkpoint, config)
    scheme = QuantScheme(bits=bits, symmetric=symmetric, scale_dtype=torch.float16)
    noted: set[tuple[int, int]] = set()

    def group_for(in_features: int) -> int:
        size = group_size_for(in_features, group_size)
        if size != group_size and (in_features, size) not in noted:
            noted.add((in_features, size))
            print(f"asyncllm quantize: {in_features} input features are not a multiple of group size "
                  f"{group_size}; those linears use groups of {size}", file=log)
        return size

    tokens = 0
    layer_errors: list[dict[str, tuple[float, float]]] = []
    if method == "awq":
        text = _calibration_text(calib)
        tokenizer = _tokenizer(checkpoint)
        windows = calibration_windows(tokenizer.encode(text, add_special_tokens=False), samples, seqlen)
        tokens = sum(len(w) for w in windows)
        layer_errors = _calibrate(built, windows, scheme, group_for, resolved, progress, log)
    dense, linears = hf_tensors(built)
    del built
    quantized = {}
    group_sizes: dict[str, int] = {}
    for name, weight in linears.items():
        size = group_for(int(weight.shape[1]))
        quantized[name] = quantize_rtn(weight, bits, size, symmetric, scale_dtype=scheme.scale_dtype)
        group_sizes[name] = size
    out_dtype = dtype if dtype is not None else _source_dtype(checkpoint.hf_config)
    write_quantized_checkpoint(out, hf_config=checkpoint.hf_config, dense=dense, quantized=quantized, bits=bits,
                               symmetric=symmetric, scale_dtype=torch.float16, tokenizer_from=checkpoint,
                               dtype=out_dtype, overwrite=overwrite)
    return QuantizeResult(out, method, bits, symmetric, group_sizes, tokens, time.perf_counter() - started,
                          layer_errors)


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _calibration_text(calib: str | os.PathLike[str] | None) -> str:
    from asyncllm.corpus import read_text_file, stdlib_text

    return stdlib_text("calibration") if calib is None else read_text_file(calib)


def _tokenizer(checkpoint):  # type: ignore[no-untyped-def]
    from asyncllm.builder import load_tokenizer

    return load_tokenizer(checkpoint)


def _source_dtype(hf_config: dict[str, object]) -> torch.dtype:
    name = hf_config.get("torch_dtype") or hf_config.get("dtype")
    candidate = getattr(torch, name, None) if isinstance(name, str) else None
    return candidate if isinstance(candidate, torch.dtype) and candidate.is_floating_point else torch.float16


def _calibrate(model: torch.nn.Module, windows: list[list[int]], scheme: QuantScheme,
               group_for: Callable[[int], int], device: torch.device, progress: bool,
               log: TextIO) -> list[dict[str, tuple[float, float]]]:
    from asyncllm.offline_batch import OfflineBatch
    from asyncllm.quant.awq_layers import LayerCalibration

    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    embed = getattr(decoder, "embed_tokens", None)
    if layers is None or embed is None:
        raise ValueError(f"model: AWQ needs a decoder with embed_tokens and layers, not {type(model).__name__}")
    batch = OfflineBatch.of([len(w) for w in windows], device=device)
    (cache,) = batch.scratch_caches(model.config, 1, dtype=torch.float32, device=device)
    calibration = LayerCalibration(scheme, group_for, batch, cache)
    ids = torch.tensor([t for w in windows for t in w], dtype=torch.int64, device=device)
    errors: list[dict[str, tuple[float, float]]] = []
    bar = _progress_bar(len(layers), progress, log)
    try:
        with torch.inference_mode():
            hidden = embed(ids)
            for index, layer in enumerate(layers):
                hidden, report = calibration.run(layer, index, hidden)
                errors.append({name: (s.rtn_error, s.error) for name, s in report.searches.items()})
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return errors


def _progress_bar(total: int, enabled: bool, log: TextIO):  # type: ignore[no-untyped-def]
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with transformers; without it, no bar
        return None
    return tqdm(total=total, desc="AWQ", unit="layer", file=log, dynamic_ncols=True)
