"""``KVCache``: one decoder layer's slice of the paged KV pool, as every kernel bundle receives it.

A cache is a pair of paged tensors ``key`` / ``value`` of shape ``[num_blocks, block_size, Hk, D]``:
token ``j`` of a sequence lives at slot ``block_tables[j // block_size] * block_size + j % block_size``.
A plain cache stores the values in the compute dtype. A quantized cache (``key_bits`` / ``value_bits`` each 8
or 4, scheme in ``kernels.kv_quant``) stores ``uint8`` codes, ``[num_blocks, block_size, Hk, D]`` for int8
and ``[..., D // 2]`` for int4 (two per byte), keys and values each at their own width, plus
``key_scales`` / ``value_scales`` ``[num_blocks, block_size, Hk, 2]`` holding each token's and head's
``(scale, zero)`` in the compute dtype: the write kernel quantizes into the storage, attention dequantizes
in its inner loop. 4-bit keys are anchored and grouped (``kv_quant.key_scheme``): ``key_scales`` is then
``[num_blocks, block_size, Hk, groups, 2]`` and ``key_anchors`` ``[num_blocks, Hk, D]`` (compute dtype) holds
each block's first token's keys; a key reads back as ``code * scale + zero + anchor``.

Invariants: ``key`` and ``value`` have one dtype, live on one device and agree in
``[num_blocks, block_size, Hk]``; a plain cache's have the same shape, a quantized cache's last dims are
``code_width(D, key_bits)`` / ``code_width(D, value_bits)`` of one ``D``; a cache has scales exactly when it
has both widths; ``key_anchors`` exists exactly when keys are 4-bit; the tensors keep their storage for the
cache's lifetime (recorded CUDA graphs and native kernel plans hold addresses).
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass

import torch

from asyncllm.kernels.kv_quant import KeyScheme, KVBits, code_width, dequantize_kv, key_scheme


@dataclass(frozen=True, eq=False)
class KVCache:
    """One layer's paged keys and values (see the module docstring)."""

    key: torch.Tensor
    value: torch.Tensor
    key_scales: torch.Tensor | None = None
    value_scales: torch.Tensor | None = None
    key_bits: int | None = None
    value_bits: int | None = None
    key_anchors: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.key.dim() != 4:
            raise ValueError(
                f"key: expected [num_blocks, block_size, num_kv_heads, head_dim], got shape {tuple(self.key.shape)}"
            )
        if (self.key_bits is None) != (self.value_bits is None):
            raise ValueError("key_bits/value_bits: a quantized cache gives both, a plain one neither")
        bits = self.bits
        expected_value = tuple(self.key.shape) if bits is None else (
            *self.key.shape[:3], code_width(self.head_dim, bits.value))
        if tuple(self.value.shape) != tuple(expected_value) or self.value.dtype != self.key.dtype:
            raise ValueError(
                f"value: expected {self.key.dtype} {tuple(expected_value)} beside key {tuple(self.key.shape)}, "
                f"got {self.value.dtype} {tuple(self.value.shape)}"
            )
        if self.value.device != self.key.device:
            raise ValueError(f"value: on {self.value.device}, key on {self.key.device}")
        if (self.key_scales is None) != (self.value_scales is None):
            raise ValueError("key_scales/value_scales: give both or neither")
        if (bits is None) != (self.key_scales is None):
            raise ValueError("key_bits/value_bits: a quantized cache (8 or 4 bits each) has "
                             "key_scales/value_scales, a plain one neither")
        if bits is None and not self.key.is_floating_point():
            raise ValueError(f"key: a plain cache stores floating values, got {self.key.dtype} "
                             "(a quantized cache needs key_bits/value_bits and key_scales/value_scales)")
        if bits is not None:
            if self.key.dtype != torch.uint8:
                raise ValueError(f"key: a {bits.name} cache stores uint8 codes, got {self.key.dtype}")
            if self.key_scales is not None and self.value_scales is not None and (
                    self.key_scales.dtype != self.value_scales.dtype or not self.key_scales.is_floating_point()):
                raise ValueError("key_scales/value_scales: expected one floating dtype for both")
        expected = (*self.key.shape[:3], 2)
        scheme = self.key_scheme
        key_expected = expected if scheme is None or not scheme.anchored else (
            *self.key.shape[:3], scheme.groups(self.head_dim), 2)
        for name, scales, shape in (("key_scales", self.key_scales, key_expected),
                                    ("value_scales", self.value_scales, expected)):
            if scales is not None and tuple(scales.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(scales.shape)}")
        anchored = scheme is not None and scheme.anchored
        if anchored != (self.key_anchors is not None):
            raise ValueError("key_anchors: a cache with 4-bit keys has them (one row per block and KV head), "
                             "any other cache none")
        if self.key_anchors is not None:
            shape = (self.num_blocks, self.num_kv_heads, self.head_dim)
            if tuple(self.key_anchors.shape) != shape or (
                    self.key_scales is not None and self.key_anchors.dtype != self.key_scales.dtype):
                raise ValueError(f"key_anchors: expected {shape} in the scales' dtype, got "
                                 f"{self.key_anchors.dtype} {tuple(self.key_anchors.shape)}")

    @property
    def bits(self) -> KVBits | None:
        """The key and value codes' widths (checked: 8 or 4 each), or ``None`` for a plain cache."""
        if self.key_bits is None or self.value_bits is None:
            return None
        return KVBits.of((self.key_bits, self.value_bits))

    @property
    def key_scheme(self) -> KeyScheme | None:
        """How the key rows are quantized (``kv_quant.key_scheme``), or ``None`` for a plain cache."""
        return None if self.key_bits is None else key_scheme(self.head_dim, self.key_bits)

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
        bits: int | tuple[int, int] | None = None,
        zeros: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
    ) -> KVCache:
        """A zero-filled cache: plain in ``dtype``, or with ``bits`` codes and ``dtype`` scales (8 or 4 for
        keys and values, or a ``(key_bits, value_bits)`` pair: each tensor sized by its own width).
        Zeroed, not empty: batched decode reads padding slots (masked out, weight 0), and 0 * NaN from
        uninitialised memory would poison the output. ``zeros(shape, dtype)`` makes each tensor (default
        ``torch.zeros`` on ``device``; the CPU pool passes lazily committed memory)."""
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if value <= 0:
                raise ValueError(f"{name}: must be positive, got {value}")

        def make(shape: tuple[int, ...], of: torch.dtype) -> torch.Tensor:
            if zeros is not None:
                return zeros(shape, of)
            return torch.zeros(shape, dtype=of, device=device)

        if bits is None:
            shape = (num_blocks, block_size, num_kv_heads, head_dim)
            return cls(make(shape, dtype), make(shape, dtype))
        widths = KVBits.of(bits)
        scheme = key_scheme(head_dim, widths.key)
        key_codes = (num_blocks, block_size, num_kv_heads, code_width(head_dim, widths.key))
        value_codes = (num_blocks, block_size, num_kv_heads, code_width(head_dim, widths.value))
        pairs = (num_blocks, block_size, num_kv_heads, 2)
        key_pairs = (num_blocks, block_size, num_kv_heads, scheme.groups(head_dim), 2) if scheme.anchored else pairs
        anchors = make((num_blocks, num_kv_heads, head_dim), dtype) if scheme.anchored else None
        return cls(make(key_codes, torch.uint8), make(value_codes, torch.uint8), make(key_pairs, dtype),
                   make(pairs, dtype), key_bits=widths.key, value_bits=widths.value, key_anchors=anchors)

    @staticmethod
    def bytes_per_block(num_kv_heads: int, head_dim: int, block_size: int, *, dtype: torch.dtype,
                        bits: int | tuple[int, int] | None = None) -> int:
        """Bytes one block of ``block_size`` tokens takes in one layer's cache (keys and values, with their
        scales and anchors; ``bits`` as in ``allocate``): per token and KV head, each of keys and values
        takes its codes' width plus its ``(scale, zero)`` pairs in ``dtype`` (one per row, or one per key
        group), and anchored keys add one row of ``head_dim`` values in ``dtype`` per block and KV head."""
        elem = torch.empty((), dtype=dtype).element_size()
        if bits is None:
            return block_size * 2 * num_kv_heads * head_dim * elem
        widths = KVBits.of(bits)
        scheme = key_scheme(head_dim, widths.key)
        per_token = (code_width(head_dim, widths.key) + code_width(head_dim, widths.value)
                     + 2 * elem * (scheme.groups(head_dim) + 1))
        anchor = head_dim * elem if scheme.anchored else 0
        return num_kv_heads * (block_size * per_token + anchor)

    @staticmethod
    def bytes_per_token(num_kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                        bits: int | tuple[int, int] | None = None, block_size: int = 16) -> float:
        """``bytes_per_block`` shared over the block's ``block_size`` tokens (a fraction only where a block's
        anchors do not divide evenly)."""
        per_block = KVCache.bytes_per_block(num_kv_heads, head_dim, block_size, dtype=dtype, bits=bits)
        return per_block // block_size if per_block % block_size == 0 else per_block / block_size

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
    def num_kv_heads(self) -> int:
        return int(self.key.shape[2])

    @property
    def head_dim(self) -> int:
        """Values per head and token (int4 codes take half as many bytes)."""
        width = int(self.key.shape[3])
        return 2 * width if self.key_bits == 4 else width

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype (``uint8`` for a quantized cache)."""
        return self.key.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the values attention reads back: the storage's, or a quantized cache's scales'."""
        return self.key.dtype if self.key_scales is None else self.key_scales.dtype

    @property
    def device(self) -> torch.device:
        return self.key.device

    @property
    def is_quantized(self) -> bool:
        return self.key_scales is not None

    def read_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of cache blocks ``blocks`` (``[n]`` ids): ``[n, block_size, Hk, D]`` each, in the
        compute dtype; a quantized cache's gathered codes are dequantized (only these blocks are read)."""
        ids = blocks.long()
        keys, values = self.key.index_select(0, ids), self.value.index_select(0, ids)
        bits = self.bits
        if bits is None or self.key_scales is None or self.value_scales is None:
            return keys, values
        dtype = self.compute_dtype
        keys = dequantize_kv(keys, self.key_scales.index_select(0, ids), bits.key, torch.float32)
        if self.key_anchors is not None:
            keys = keys + self.key_anchors.index_select(0, ids).float()[:, None]
        return keys.to(dtype), dequantize_kv(values, self.value_scales.index_select(0, ids), bits.value, dtype)

    def require_plain(self, backend: str) -> None:
        """Raise ``ValueError`` if this cache is quantized: ``backend`` reads plain caches only."""
        if self.is_quantized:
            bits = self.bits
            raise ValueError(f"kv_cache: the {backend!r} kernels do not read a quantized "
                             f"{'' if bits is None else bits.name} cache")


def lazily_committed_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled CPU tensor over anonymous memory that the OS commits page by page, when first written:
    a KV pool sized for many long sequences costs resident memory only for the blocks a workload has
    used (reading a never-written page maps the shared zero page). The tensor keeps its mapping alive."""
    count = math.prod(shape)
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype, count=count).view(shape)
