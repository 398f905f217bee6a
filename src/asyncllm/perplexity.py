"""Sliding-window perplexity of a model on a text, through the engine's own model path.

``perplexity(model, text)`` loads ``model`` as ``AsyncEngine.from_pretrained`` does (``builder.load_model``:
the same kernel bundle, and packed quantized weights unless ``dequantize_weights``);
``perplexity_of_model(model, tokenizer, text)`` evaluates a model already in memory.

Windows follow Hugging Face's "Perplexity of fixed-length models": the text is tokenized once, with the
tokenizer's default special tokens (``Tokenizer.encode(text)``: a BOS only where the tokenizer's config adds
one, as a transformers tokenizer's ``__call__`` does), into ``n`` ids. For ``begin`` in
``range(0, n, stride)`` (``stride`` defaults to ``seqlen // 2``) the window is ``ids[begin:end]`` with
``end = min(begin + seqlen, n)``; its last ``end - prev_end`` tokens are targets, the earlier ones context;
the loop stops after the window that reaches ``n``. A target is predicted from the position before it
within its window, so a target in a window's first position is not scored: the text's first token never is,
and neither is the first token of each later window when ``stride == seqlen`` (then windows do not
overlap). With ``stride < seqlen`` every token but the first is scored exactly once. A window left with no
scored token (a one-token last window when ``stride == seqlen``) is not run. See ``plan_windows``.

Perplexity is ``exp(total NLL / scored tokens)``: token-weighted over the whole text, not a mean of
per-window values. Windows run ``batch_size`` at a time as one flat prefill step (``OfflineBatch``) over
scratch KV caches; logits are computed only for the rows that predict a target, in chunks of at most
``LOGITS_CHUNK_BYTES`` of float32, under ``torch.inference_mode()``; each target's log-probability comes
from a float32 log-softmax and the sums accumulate in float64.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from asyncllm.builder import engine_config, load_model
from asyncllm.config import EngineConfig, KernelBackendName
from asyncllm.corpus import stdlib_text
from asyncllm.kernels import KVCache
from asyncllm.kernels.kv_quant import KVBits
from asyncllm.models import CausalLM
from asyncllm.offline_batch import OfflineBatch
from asyncllm.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SEQLEN",
    "DEFAULT_STRIDE",
    "LOGITS_CHUNK_BYTES",
    "PerplexityResult",
    "ProgressCallback",
    "Window",
    "perplexity",
    "perplexity_of_model",
    "plan_windows",
]

DEFAULT_SEQLEN = 512
DEFAULT_STRIDE = 256
"""The stride at the default ``seqlen``; a ``stride`` of ``None`` is always ``seqlen // 2``."""
DEFAULT_BATCH_SIZE = 4
"""Windows per forward pass."""
LOGITS_CHUNK_BYTES = 256 * 1024 * 1024
"""Largest float32 logits tensor computed at once (rows x vocabulary x 4 bytes)."""

ProgressCallback = Callable[[int, int, float], None]
"""Called after each forward pass with (windows done, windows in all, seconds since the evaluation began)."""


@dataclass(frozen=True)
class Window:
    """One window: tokens ``begin:end`` of the text go through the model; tokens ``first_target:end`` are
    scored, each predicted from the token before it (``begin < first_target < end``)."""

    begin: int
    end: int
    first_target: int

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def targets(self) -> int:
        return self.end - self.first_target


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: must be an int >= {minimum}, got {value!r}")
    return value


def _check_window_shape(seqlen: int, stride: int | None) -> int:
    """The stride (``seqlen // 2`` for ``None``), once ``seqlen`` and ``stride`` are checked."""
    _check_int("seqlen", seqlen, 2)
    if stride is None:
        return seqlen // 2
    _check_int("stride", stride, 1)
    if stride > seqlen:
        raise ValueError(f"stride: must be at most seqlen={seqlen}, got {stride}")
    return stride


def plan_windows(num_tokens: int, seqlen: int, stride: int | None) -> list[Window]:
    """The windows over a text of ``num_tokens`` tokens (see the module docstring), in order; a ``stride``
    of ``None`` is ``seqlen // 2``.

    Raises ``ValueError`` naming ``seqlen`` (below 2), ``stride`` (below 1 or above ``seqlen``) or
    ``text`` (fewer than 2 tokens)."""
    stride = _check_window_shape(seqlen, stride)
    if not isinstance(num_tokens, int) or num_tokens < 2:
        raise ValueError(f"text: needs at least 2 tokens to score one, got {num_tokens}")
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + seqlen, num_tokens)
        first_target = max(begin + 1, prev_end)  # the last end - prev_end tokens, less a first position
        if first_target < end:
            windows.append(Window(begin, end, first_target))
        prev_end = end
        if end == num_tokens:
            break
    return windows


@dataclass(frozen=True)
class PerplexityResult:
    """``perplexity = exp(nll)``; ``nll``: mean negative log-likelihood in nats per scored token; ``tokens``:
    scored tokens; ``text_tokens``: the text's tokens; ``windows``: windows run; ``seconds``: the evaluation
    (tokenizing and forward passes); ``load_seconds``: loading the model (0 for a model in memory);
    ``kv_cache_dtype``: how the windows' keys and values were cached (``"auto"``: the compute dtype)."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seconds: float
    seqlen: int
    stride: int
    batch_size: int
    model: str
    text: str
    text_tokens: int
    load_seconds: float = 0.0
    kv_cache_dtype: str = "auto"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)


def default_text() -> tuple[str, str]:
    """The default evaluation text and its description: the held-out part of ``corpus.stdlib_text``."""
    version = ".".join(str(part) for part in sys.version_info[:2])
    return stdlib_text("heldout"), f"stdlib heldout (Python {version})"


def _describe(text: str) -> str:
    return f"text of {len(text)} characters"


def perplexity(
    model: str | os.PathLike[str],
    text: str | None = None,
    *,
    seqlen: int = DEFAULT_SEQLEN,
    stride: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | None = None,
    dtype: str | None = None,
    kernel_backend: KernelBackendName = "auto",
    dequantize_weights: bool = False,
    kv_cache_dtype: str = "auto",
    config: EngineConfig | None = None,
    text_name: str | None = None,
    progress: ProgressCallback | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` (anything ``AsyncEngine.from_pretrained`` loads: an HF directory, a ``.gguf``
    file, a hub id) on ``text`` (default: ``corpus.stdlib_text("heldout")``).

    The model and tokenizer are built by ``builder.load_model`` with ``config`` (default ``EngineConfig()``)
    and the given ``device``, ``dtype``, ``kernel_backend``, ``dequantize_weights`` and ``kv_cache_dtype``
    (``"int8"`` / ``"int4"``: the windows attend over a quantized KV cache, as the engine would). ``stride``
    ``None`` is ``seqlen // 2``; ``batch_size``: windows per forward pass. ``text_name``
    describes ``text`` in the result (default: its length). Window arguments are checked before the
    model is loaded; errors are ``ValueError`` naming the field."""
    stride = _check_window_shape(seqlen, stride)
    _check_int("batch_size", batch_size, 1)
    if text is None:
        text, default_name = default_text()
        text_name = text_name or default_name
    elif not isinstance(text, str):
        raise ValueError(f"text: must be a str or None, got {type(text).__name__}")
    overrides: dict[str, Any] = {"kernel_backend": kernel_backend}
    if device is not None:
        overrides["device"] = device
    if dtype is not None:
        overrides["dtype"] = dtype
    if dequantize_weights:
        overrides["dequantize_weights"] = True
    if kv_cache_dtype != "auto":
        overrides["kv_cache_dtype"] = kv_cache_dtype
    engine = engine_config(config, overrides)
    start = time.perf_counter()
    built, tokenizer = load_model(model, engine)
    load_seconds = time.perf_counter() - start
    result = perplexity_of_model(
        built, tokenizer, text, seqlen=seqlen, stride=stride, batch_size=batch_size,
        dtype=engine.resolved_dtype(), device=engine.resolved_device(), model_name=os.fspath(model),
        text_name=text_name, progress=progress, kv_cache_bits=engine.kv_cache_bits(),
    )
    return PerplexityResult(**{**result.as_dict(), "load_seconds": load_seconds})


def perplexity_of_model(
    model: CausalLM,
    tokenizer: Tokenizer | None,
    token_ids_or_text: str | Sequence[int] | torch.Tensor,
    *,
    seqlen: int = DEFAULT_SEQLEN,
    stride: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    model_name: str | None = None,
    text_name: str | None = None,
    progress: ProgressCallback | None = None,
    kv_cache_bits: int | tuple[int, int] | None = None,
) -> PerplexityResult:
    """Perplexity of a built model (weights loaded) on a text, which ``tokenizer`` encodes with its default
    special tokens, or on token ids (then ``tokenizer`` may be ``None``).

    ``dtype`` and ``device`` are those of the model's activations and scratch KV caches (default: read off
    the model's norm weights). ``kv_cache_bits`` 8 / 4, or a ``(key_bits,
    value_bits)`` pair, quantizes those caches (``kernels.kv_quant``).
    ``seqlen`` may not exceed the model's positions."""
    stride = _check_window_shape(seqlen, stride)
    _check_int("batch_size", batch_size, 1)
    positions = int(getattr(model, "max_positions", None) or model.config.max_position_embeddings)
    if seqlen > positions:
        raise ValueError(f"seqlen: {seqlen} exceeds the model's {positions} positions")
    start = time.perf_counter()
    if isinstance(token_ids_or_text, str):
        if tokenizer is None:
            raise ValueError("tokenizer: needed to encode a text")
        text_name = text_name or _describe(token_ids_or_text)
        ids = tokenizer.encode(token_ids_or_text)
    else:
        ids = [int(i) for i in (token_ids_or_text.tolist() if isinstance(token_ids_or_text, torch.Tensor)
                                else token_ids_or_text)]
        text_name = text_name or f"{len(ids)} token ids"
    vocab = model.config.vocab_size
    if ids and (min(ids) < 0 or max(ids) >= vocab):
        raise ValueError(f"text: token ids must lie in [0, {vocab}), got {min(ids)}..{max(ids)}")
    windows = plan_windows(len(ids), seqlen, stride)
    model_dtype, model_device = _activation_dtype_device(model)
    dtype = dtype or model_dtype
    device = torch.device(device) if device is not None else model_device
    nll = _total_nll(model, torch.tensor(ids, dtype=torch.int64), windows, batch_size, dtype, device,
                     progress, start, kv_cache_bits)
    scored = sum(w.targets for w in windows)
    mean = nll / scored
    return PerplexityResult(
        perplexity=math.exp(mean), nll=mean, tokens=scored, windows=len(windows),
        seconds=time.perf_counter() - start, seqlen=seqlen, stride=stride, batch_size=batch_size,
        model=model_name or model.config.architecture, text=text_name, text_tokens=len(ids),
        kv_cache_dtype="auto" if kv_cache_bits is None else KVBits.of(kv_cache_bits).name,
    )


def _activation_dtype_device(model: CausalLM) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the model's norm weights, which every bundle keeps dense in the model's
    dtype (packed layers hold integer codes and their own scale dtypes)."""
    fallback: torch.Tensor | None = None
    for name, parameter in model.named_parameters():  # type: ignore[attr-defined]
        if name.endswith("norm.weight"):
            return parameter.dtype, parameter.device
        if fallback is None and parameter.is_floating_point():
            fallback = parameter
    if fallback is None:
        raise ValueError("model: has no floating-point parameter to take the activation dtype from; pass dtype")
    return fallback.dtype, fallback.device


def _total_nll(model: CausalLM, ids: torch.Tensor, windows: list[Window], batch_size: int, dtype: torch.dtype,
               device: torch.device, progress: ProgressCallback | None, start: float,
               kv_cache_bits: int | tuple[int, int] | None) -> float:
    """The summed negative log-likelihood of every window's targets, in nats."""
    num_layers = model.config.num_hidden_layers
    vocab = model.config.vocab_size
    chunk_rows = max(1, LOGITS_CHUNK_BYTES // (vocab * 4))
    caches: list[KVCache] = []
    cache_blocks = 0
    total = torch.zeros((), dtype=torch.float64, device=device)
    done = 0
    with torch.inference_mode():
        for first in range(0, len(windows), batch_size):
            group = windows[first:first + batch_size]
            batch = OfflineBatch.of([w.length for w in group], device=device)
            if batch.num_blocks > cache_blocks:  # every batch writes its slots before reading them: reuse
                caches = batch.scratch_caches(model.config, num_layers, dtype=dtype, device=device,
                                              bits=kv_cache_bits)
                cache_blocks = batch.num_blocks
            input_ids = torch.cat([ids[w.begin:w.end] for w in group]).to(device)
            hidden = model(input_ids, batch.positions, batch.meta, caches)
            rows = torch.cat([
                torch.arange(offset + w.first_target - 1 - w.begin, offset + w.length - 1)
                for w, offset in zip(group, batch.starts, strict=False)
            ]).to(device)
            targets = torch.cat([ids[w.first_target:w.end] for w in group]).to(device)
            for lo in range(0, rows.shape[0], chunk_rows):
                logits = model.compute_logits(hidden.index_select(0, rows[lo:lo + chunk_rows])).float()
                losses = torch.nn.functional.cross_entropy(logits, targets[lo:lo + chunk_rows], reduction="none")
                total += losses.double().sum()
                del logits, losses
            done += len(group)
            if progress is not None:
                progress(done, len(windows), time.perf_counter() - start)
    return float(total)
