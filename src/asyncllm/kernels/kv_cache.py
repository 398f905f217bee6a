"""``KVCache``: one decoder layer's slice of the paged KV pool, as every kernel bundle receives it.

A cache is a pair of paged tensors ``key`` / ``value`` of shape ``[num_blocks, block_size, Hk, D]``:
token ``j`` of a sequence lives at slot ``block_tables[j // block_size] * block_size + j % block_size``.
The storage dtype is the cache's dtype. A quantized cache (int8 / int4) is a new storage dtype plus the
optional ``key_scales`` / ``value_scales`` tensors, ``[num_blocks, block_size, Hk, 2]`` holding each
token's and head's ``(scale, zero point)`` in the compute dtype: the write kernel quantizes into the
storage, attention dequantizes in its inner loop. No bundle implements a quantized cache yet; each
one refuses, by name, a cache it cannot read (``require_plain``).

Invariants: ``key`` and ``value`` have the same shape and dtype and live on one device; the tensors keep
their storage for the cache's lifetime (recorded CUDA graphs and native kernel plans hold addresses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class KVCache:
    """One layer's paged keys and values (see the module docstring)."""

    key: torch.Tensor
    value: torch.Tensor
    key_scales: torch.Tensor | None = None
    value_scales: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.key.dim() != 4:
            raise ValueError(
                f"key: expected [num_blocks, block_size, num_kv_heads, head_dim], got shape {tuple(self.key.shape)}"
            )
        if self.value.shape != self.key.shape or self.value.dtype != self.key.dtype:
            raise ValueError(
                f"value: expected {self.key.dtype} {tuple(self.key.shape)} like key, "
                f"got {self.value.dtype} {tuple(self.value.shape)}"
            )
        if self.value.device != self.key.device:
            raise ValueError(f"value: on {self.value.device}, key on {self.key.device}")
        if (self.key_scales is None) != (self.value_scales is None):
            raise ValueError("key_scales/value_scales: give both or neither")
        expected = (*self.key.shape[:3], 2)
        for name, scales in (("key_scales", self.key_scales), ("value_scales", self.value_scales)):
            if scales is not None and tuple(scales.shape) != expected:
                raise ValueError(f"{name}: expected shape {expected}, got {tuple(scales.shape)}")

    @classmethod
    def allocate(
        cls,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        """A zero-filled cache. Zeroed, not empty: batched decode reads padding slots (masked out, weight 0),
        and 0 * NaN from uninitialised memory would poison the output."""
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if value <= 0:
                raise ValueError(f"{name}: must be positive, got {value}")
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def shape(self) -> torch.Size:
        return self.key.shape

    @property
    def num_blocks(self) -> int:
        return int(self.key.shape[0])

    @property
    def block_size(self) -> int:
        return int(self.key.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype."""
        return self.key.dtype

    @property
    def device(self) -> torch.device:
        return self.key.device

    @property
    def is_quantized(self) -> bool:
        return self.key_scales is not None

    def require_plain(self, backend: str) -> None:
        """Raise ``ValueError`` if this cache is quantized: ``backend`` reads plain caches only."""
        if self.is_quantized:
            raise ValueError(f"kv_cache: the {backend!r} kernels do not read a quantized {self.dtype} cache")
