"""Scatter new keys and values into the paged KV cache."""

from __future__ import annotations

import torch

from asyncllm.kernels.kv_cache import KVCache
from asyncllm.kernels.kv_quant import quantize_kv


def write_kv_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``k``/``v`` ``[T, Hk, D]`` into caches ``[num_blocks, block_size, Hk, D]`` at flat slots.

    ``slot_mapping[t] = block * block_size + offset``; entries ``< 0`` are padding and are skipped.
    """
    num_blocks, block_size = k_cache.shape[:2]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def write_kv_cache_reference(
    k: torch.Tensor, v: torch.Tensor, cache: KVCache, slot_mapping: torch.Tensor
) -> None:
    """``write_kv_reference`` into a ``KVCache``; a quantized cache stores each token's codes (keys at
    ``key_bits``, values at ``value_bits``) and ``(scale, zero)`` pairs (``kernels.kv_quant.quantize_kv``).
    Anchored keys (4-bit): the tokens at a block's first slot write their keys as the block's anchor first,
    then every token stores its residual against its block's anchor, grouped (``kv_quant.key_scheme``)."""
    bits = cache.bits
    scheme = cache.key_scheme
    if bits is None or scheme is None or cache.key_scales is None or cache.value_scales is None:
        write_kv_reference(k, v, cache.key, cache.value, slot_mapping)
        return
    scale_dtype = cache.key_scales.dtype
    keys = k
    if cache.key_anchors is not None:
        keys, slot_mapping, v = anchored_residuals(k, cache.key_anchors, slot_mapping, v, cache.block_size)
    k_codes, k_scales = quantize_kv(keys, bits.key, scale_dtype, scheme.pair_group)
    v_codes, v_scales = quantize_kv(v, bits.value, scale_dtype)
    write_kv_reference(k_codes, v_codes, cache.key, cache.value, slot_mapping)
    write_kv_reference(k_scales, v_scales, cache.key_scales, cache.value_scales, slot_mapping)


def anchored_residuals(k: torch.Tensor, anchors: torch.Tensor, slot_mapping: torch.Tensor, v: torch.Tensor,
                       block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Store the keys of tokens at a block's first slot as that block's anchor (``anchors`` ``[num_blocks,
    Hk, D]``), then return every valid token's ``key - anchor`` in float32 with the valid slots and values
    (padding slots, ``< 0``, dropped)."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    blocks = torch.div(slot_mapping, block_size, rounding_mode="floor")
    first = slot_mapping % block_size == 0
    anchors.index_copy_(0, blocks[first], k[first].to(anchors.dtype))
    return k.float() - anchors.index_select(0, blocks).float(), slot_mapping, v
