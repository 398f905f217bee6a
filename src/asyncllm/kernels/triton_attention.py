"""Triton paged attention entry point with the signature of ``paged_attention_reference``."""

from __future__ import annotations

import torch

from asyncllm.kernels.kv_cache import KVCache
from asyncllm.kernels.metadata import AttentionMetadata, AttentionOptions
from asyncllm.kernels.triton_decode import paged_decode_attention
from asyncllm.kernels.triton_prefill import paged_prefill_attention


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    options: AttentionOptions | None = None,
) -> torch.Tensor:
    """Split-KV decode when every sequence has one new token (``meta.is_decode_only``), else the varlen
    causal prefill kernel. Chooses by host-side metadata only, so it never synchronises the device."""
    if meta.is_decode_only:
        return paged_decode_attention(q, k_cache, v_cache, meta, scale, options=options)
    return paged_prefill_attention(q, k_cache, v_cache, meta, scale, options=options)


def paged_attention_cache_triton(
    q: torch.Tensor, cache: KVCache, meta: AttentionMetadata, scale: float,
    options: AttentionOptions | None = None,
) -> torch.Tensor:
    """``paged_attention_triton`` over a quantized ``KVCache``: the kernels read its codes, scales and (4-bit
    keys) anchors in place."""
    bits = cache.bits
    if bits is None or cache.key_scales is None or cache.value_scales is None:
        return paged_attention_triton(q, cache.key, cache.value, meta, scale, options)
    scales = (cache.key_scales, cache.value_scales)
    anchors = cache.key_anchors
    if meta.is_decode_only:
        return paged_decode_attention(q, cache.key, cache.value, meta, scale, scales=scales, bits=bits,
                                      anchors=anchors, options=options)
    return paged_prefill_attention(q, cache.key, cache.value, meta, scale, scales=scales, bits=bits,
                                   anchors=anchors, options=options)
