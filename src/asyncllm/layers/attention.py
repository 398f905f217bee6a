"""Attention over the paged KV cache for a flat (varlen) batch of sequences."""

from __future__ import annotations

import torch
from torch import nn

from asyncllm.kernels import AttentionMetadata, AttentionOptions, KernelOps, KVCache


class PagedAttention(nn.Module):
    """Writes this step's keys/values into the paged cache, then attends over each sequence's context.

    ``q`` is ``[T, Hq, D]``, ``k``/``v`` ``[T, Hk, D]`` (already rotated); ``kv_cache`` is this layer's
    ``KVCache`` (``[num_blocks, block_size, Hk, D]`` keys and values), owned by the caller. Token ``t`` is
    written to slot ``meta.slot_mapping[t]`` before attention reads it, so a sequence's new tokens see
    each other causally and its whole cached prefix (the last ``options.window`` keys of it with a sliding
    window; scores soft-capped with ``options.softcap``). Returns ``[T, Hq, D]`` in ``q.dtype``.
    """

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, ops: KernelOps, *, scale: float | None = None,
        options: AttentionOptions | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: {num_kv_heads} does not divide num_heads={num_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.options = None if options is None or options.is_plain else options
        self.ops = ops

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        if (kv_cache.num_kv_heads, kv_cache.head_dim) != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"kv_cache: expected [num_blocks, block_size, {self.num_kv_heads}, {self.head_dim}], "
                f"got {tuple(kv_cache.shape)}" + ("" if kv_cache.bits is None else f" {kv_cache.bits.name} codes")
            )
        self.ops.write_kv(k, v, kv_cache, meta.slot_mapping)
        if self.options is None:
            return self.ops.paged_attention(q, kv_cache, meta, self.scale)
        return self.ops.paged_attention(q, kv_cache, meta, self.scale, self.options)

    def extra_repr(self) -> str:
        extra = "" if self.options is None else f", window={self.options.window}, softcap={self.options.softcap}"
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}{extra}"
