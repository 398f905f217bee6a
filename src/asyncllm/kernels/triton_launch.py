"""Host-side helpers shared by the Triton kernels: tile padding, dot precision, input checks.

Nothing here touches device memory or synchronises the device; every value comes from tensor
shapes, dtypes and host-side metadata.
"""

from __future__ import annotations

import os

import torch
import triton

from asyncllm.kernels.kv_quant import KVBits, code_width, key_scheme
from asyncllm.kernels.metadata import AttentionMetadata

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Softmax runs in the log2 domain: scores are scaled by ``scale * LOG2E`` and exponentiated with exp2.
LOG2E = 1.4426950408889634

# tl.dot needs every operand dimension to be at least 16.
MIN_DOT_DIM = 16


def pow2_at_least(n: int, floor: int = 1) -> int:
    """Smallest power of two ``>= max(n, floor)``."""
    return max(triton.next_power_of_2(max(n, 1)), floor)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: full IEEE fp32 for fp32 operands (TF32 would cost ~1e-3 relative
    error), the default for fp16/bf16 where tensor cores are exact per product."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands must be widened to fp32 first.

    The Triton CPU interpreter multiplies bf16 operands as their raw 16-bit integer patterns, so under
    the interpreter bf16 tiles are converted to fp32 (same values) before each dot (triton-lang/triton
    issue 11584). Compiled kernels keep bf16 operands for the tensor cores.
    """
    return dtype == torch.bfloat16 and interpreting()


def check_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: dtype must be float32, float16 or bfloat16, got {tensor.dtype}")


def check_paged_inputs(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None, bits: KVBits | None = None,
    anchors: torch.Tensor | None = None,
) -> tuple[int, int, int]:
    """Validate paged-attention operands (shapes and dtypes only); returns ``(Hq, Hk, D)``. A quantized
    cache (``bits``: the key and value codes' widths, 8 or 4 each) holds ``uint8`` codes, each tensor at
    its own width, and ``scales`` = (key, value) ``(scale, zero)`` pairs ``[num_blocks, block_size, Hk, 2]``
    in ``q``'s dtype (``kernels.kv_quant``); 4-bit keys are anchored and grouped (``kv_quant.key_scheme``):
    key pairs ``[num_blocks, block_size, Hk, groups, 2]`` and ``anchors`` (the cache's ``key_anchors``)
    ``[num_blocks, Hk, D]`` in ``q``'s dtype on the cache's device, unit stride last; no other cache has
    anchors."""
    if bits is not None:
        return _check_quantized(q, k_cache, v_cache, meta, scales, bits, anchors)
    if anchors is not None:
        raise ValueError("key_anchors: only a cache with 4-bit keys has them")
    if q.dim() != 3:
        raise ValueError(f"q: expected [T, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache: expected [num_blocks, block_size, Hk, D], got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: shape {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}")
    if v_cache.stride() != k_cache.stride():
        raise ValueError("v_cache: strides must equal k_cache's (one slot offset serves both)")
    check_dtype("q", q)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"k_cache/v_cache: dtype must equal q's {q.dtype}, "
                         f"got {k_cache.dtype}/{v_cache.dtype}")
    if k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"k_cache: head_dim {k_cache.shape[3]} differs from q's {q.shape[2]}")
    return _heads_and_tables(q, k_cache, meta)


def _check_quantized(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
    scales: tuple[torch.Tensor, torch.Tensor] | None, bits: KVBits, anchors: torch.Tensor | None,
) -> tuple[int, int, int]:
    bits = KVBits.of(bits)
    if scales is None:
        raise ValueError("scales: a quantized cache needs its key and value scales")
    if q.dim() != 3:
        raise ValueError(f"q: expected [T, Hq, D], got shape {tuple(q.shape)}")
    check_dtype("q", q)
    head_dim = q.shape[2]
    width = code_width(head_dim, bits.key)
    if k_cache.dim() != 4 or k_cache.shape[3] != width or k_cache.dtype != torch.uint8:
        raise ValueError(f"k_cache: expected uint8 codes [num_blocks, block_size, Hk, {width}], got "
                         f"{k_cache.dtype} {tuple(k_cache.shape)}")
    value_shape = (*k_cache.shape[:3], code_width(head_dim, bits.value))
    if tuple(v_cache.shape) != value_shape or v_cache.dtype != torch.uint8:
        raise ValueError(f"v_cache: expected uint8 codes {value_shape}, got {v_cache.dtype} {tuple(v_cache.shape)}")
    expected = (*k_cache.shape[:3], 2)
    scheme = key_scheme(head_dim, bits.key)
    key_expected = (*k_cache.shape[:3], scheme.groups(head_dim), 2) if scheme.anchored else expected
    for name, pairs, shape in zip(("key_scales", "value_scales"), scales, (key_expected, expected), strict=True):
        if tuple(pairs.shape) != shape or pairs.dtype != q.dtype or pairs.stride(-1) != 1:
            raise ValueError(f"{name}: expected {q.dtype} {shape} with unit stride last, got "
                             f"{pairs.dtype} {tuple(pairs.shape)}")
    if not scheme.anchored:
        if anchors is not None:
            raise ValueError(f"key_anchors: only a cache with 4-bit keys has them, got {bits.key}-bit keys")
    else:
        shape = (k_cache.shape[0], k_cache.shape[2], head_dim)
        if anchors is None:
            raise ValueError(f"key_anchors: 4-bit keys need their blocks' anchors {shape}")
        if (tuple(anchors.shape) != shape or anchors.dtype != q.dtype or anchors.device != k_cache.device
                or anchors.stride(-1) != 1):
            raise ValueError(f"key_anchors: expected {q.dtype} {shape} on {k_cache.device} with unit stride "
                             f"last, got {anchors.dtype} {tuple(anchors.shape)} on {anchors.device}")
    return _heads_and_tables(q, k_cache, meta)


def cache_operands(
    k_cache: torch.Tensor, v_cache: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None,
    bits: KVBits | None, anchors: torch.Tensor | None, head_dim: int,
) -> tuple[tuple, tuple, dict]:
    """The paged attention kernels' scale and anchor operands, once ``check_paged_inputs`` has passed: the
    pointers ``(k_scales, v_scales, anchors)``, the strides (key pairs: block, slot, head, group; value
    pairs: block, slot, head; anchors: block, head) and the key constexprs ``K_GROUP`` (dimensions per key
    pair) and ``K_ANCHORED``. Placeholders (the caches, unread) stand in for what a cache lacks."""
    k_scales, v_scales = scales if scales is not None else (k_cache, v_cache)  # unread when unquantized
    scheme = None if bits is None else key_scheme(head_dim, bits.key)
    group = head_dim
    group_stride = 0
    if scheme is not None and scheme.anchored:
        group, group_stride = scheme.group_size, k_scales.stride(3)
    anchor_strides = anchors.stride()[:2] if anchors is not None else (0, 0)
    pointers = (k_scales, v_scales, anchors if anchors is not None else k_cache)
    strides = (*k_scales.stride()[:3], group_stride, *v_scales.stride()[:3], *anchor_strides)
    return pointers, strides, {"K_GROUP": group, "K_ANCHORED": anchors is not None}


def _heads_and_tables(q: torch.Tensor, k_cache: torch.Tensor, meta: AttentionMetadata) -> tuple[int, int, int]:
    """``(Hq, Hk, D)`` once the query heads group over the cache's KV heads and the block tables fit ``meta``."""
    num_heads, head_dim, num_kv_heads = q.shape[1], q.shape[2], k_cache.shape[2]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"q: {num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if meta.block_tables.dim() != 2 or meta.block_tables.shape[0] != meta.num_seqs:
        raise ValueError(f"meta.block_tables: expected [{meta.num_seqs}, max_blocks], got "
                         f"{tuple(meta.block_tables.shape)}")
    return num_heads, num_kv_heads, head_dim
