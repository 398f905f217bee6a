"""Triton paged attention entry point with the signature of ``paged_attention_reference``."""

from __future__ import annotations

import torch

from asyncllm.kernels.metadata import AttentionMetadata
from asyncllm.kernels.triton_decode import paged_decode_attention
from asyncllm.kernels.triton_prefill import paged_prefill_attention


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Split-KV decode when every sequence has one new token (``meta.is_decode_only``), else the varlen
    causal prefill kernel. Chooses by host-side metadata only, so it never synchronises the device."""
    if meta.is_decode_only:
        return paged_decode_attention(q, k_cache, v_cache, meta, scale)
    return paged_prefill_attention(q, k_cache, v_cache, meta, scale)
