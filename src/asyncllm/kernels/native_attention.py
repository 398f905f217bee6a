"""Paged decode attention on CPU in C (``csrc/decode_attention.c``), called through ctypes.

The torch ops must copy every sequence's K/V out of the paged cache before their batched GEMMs can read
it (``index_select``), which at 32 sequences costs more than the attention itself. The C kernel reads
the cache in place through the block table, one OpenMP task per (sequence, KV head), so each cached
byte is read once per step.

Usage, per decode step: ``plan = kernel.plan(block_tables, seq_lens, cache_shape)`` validates the step's
tables once (the C code trusts every index it is given), then ``plan.run(q, cache, scale)``
per layer checks only the tensors that change. The cache may be plain float32 or quantized (int8 / int4 codes,
keys and values each at their own width, with float32 scales, ``kernels.kv_quant``; 4-bit keys anchored on
each block's first token and scaled in groups): the kernel reads the codes in place (``PagedKVArg``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

import torch

from asyncllm.kernels.kv_cache import KVCache
from asyncllm.kernels.kv_quant import KVBits
from asyncllm.kernels.metadata import AttentionOptions
from asyncllm.kernels.native_build import load_native_library

_SOURCE = "decode_attention.c"
_ARGTYPES = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 8 + [ctypes.c_float, ctypes.c_int64, ctypes.c_float,
                                                          ctypes.c_int32]
MAX_QUANTIZED_HEAD_DIM = 512  # the C quantizer's row buffer


class PagedKVArg(ctypes.Structure):
    """``paged_kv`` of ``csrc/paged_attention.h``: one layer's cache tensors, the key and value codes'
    widths (both 0: float32), anchored keys' block anchors (or ``None``), the key dimensions per ``(scale,
    zero)`` pair and the block size."""

    _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("k_scales", ctypes.c_void_p),
                ("v_scales", ctypes.c_void_p), ("k_bits", ctypes.c_int64), ("v_bits", ctypes.c_int64),
                ("k_anchors", ctypes.c_void_p), ("k_group", ctypes.c_int64), ("block_size", ctypes.c_int64)]


def paged_kv_arg(cache: KVCache) -> PagedKVArg:
    """The C view of ``cache`` (its tensors must outlive every call that receives it)."""
    scheme = cache.key_scheme
    return PagedKVArg(cache.key.data_ptr(), cache.value.data_ptr(),
                      None if cache.key_scales is None else cache.key_scales.data_ptr(),
                      None if cache.value_scales is None else cache.value_scales.data_ptr(),
                      cache.key_bits or 0, cache.value_bits or 0,
                      None if cache.key_anchors is None else cache.key_anchors.data_ptr(),
                      cache.head_dim if scheme is None else scheme.group_size, cache.block_size)


def native_cache_problem(cache: KVCache, shape: tuple[int, int, int, int], bits: KVBits | None) -> str | None:
    """Why the C kernels cannot read ``cache`` as a ``[num_blocks, block_size, kv_heads, head_dim]`` cache of
    ``bits`` (key and value widths; ``None``: float32), or ``None`` when they can."""
    tensors = [cache.key, cache.value] + [t for t in (cache.key_scales, cache.value_scales, cache.key_anchors)
                                          if t is not None]
    if cache.bits != bits or cache.compute_dtype != torch.float32:
        have = cache.bits
        return f"expected a {'float32' if bits is None else f'{bits.name} (float32 scales)'} cache, " \
               f"got {cache.compute_dtype} {'plain' if have is None else have.name}"
    if (cache.num_blocks, cache.block_size, cache.num_kv_heads, cache.head_dim) != shape:
        return f"expected a cache of shape {shape}, got {tuple(cache.shape)}"
    scheme = cache.key_scheme
    if scheme is not None and cache.key_scales is not None:
        pairs = (*shape[:3], scheme.groups(shape[3]), 2) if scheme.anchored else (*shape[:3], 2)
        if tuple(cache.key_scales.shape) != pairs or cache.key_scales.dtype != torch.float32:
            return f"expected float32 key scales {pairs}, got {cache.key_scales.dtype} " \
                   f"{tuple(cache.key_scales.shape)}"
        anchors = (shape[0], shape[2], shape[3]) if scheme.anchored else None
        have_anchors = None if cache.key_anchors is None else tuple(cache.key_anchors.shape)
        if have_anchors != anchors or (cache.key_anchors is not None and cache.key_anchors.dtype != torch.float32):
            return f"expected key anchors {'none' if anchors is None else f'float32 {anchors}'}, got " \
                   f"{'none' if cache.key_anchors is None else f'{cache.key_anchors.dtype} {have_anchors}'}"
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return "expected contiguous CPU tensors"
    return None


class NativeDecodeAttention:
    """The compiled kernel; ``load()`` returns ``None`` where it cannot be built (see ``native_build``)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        function = library.asyncllm_paged_decode_attention
        function.restype = None
        function.argtypes = _ARGTYPES
        self._function = function

    @classmethod
    def load(cls) -> NativeDecodeAttention | None:
        library = load_native_library(_SOURCE)
        return None if library is None else cls(library)

    def plan(
        self, block_tables: torch.Tensor, seq_lens: torch.Tensor, cache_shape: torch.Size | tuple[int, ...],
        *, num_heads: int, threads: int | None = None, bits: KVBits | None = None,
    ) -> DecodeAttentionPlan:
        """Check one decode step's layout and bind it: ``block_tables`` ``[B, W]`` int32, ``seq_lens``
        ``[B]`` int32 with ``1 <= len <= W * block_size``, every table entry a block of the cache
        ``[num_blocks, block_size, kv_heads, head_dim]`` (values per head, whatever ``bits``, the key and value
        codes' widths, store); raises
        ``ValueError`` naming what is wrong."""
        if len(cache_shape) != 4:
            raise ValueError(f"cache_shape: expected [num_blocks, block_size, kv_heads, head_dim], got {cache_shape}")
        num_blocks, block_size, kv_heads, head_dim = (int(n) for n in cache_shape)
        if num_heads <= 0 or num_heads % kv_heads:
            raise ValueError(f"num_heads: must be a positive multiple of kv_heads={kv_heads}, got {num_heads}")
        if bits is not None and (head_dim > MAX_QUANTIZED_HEAD_DIM or head_dim % 2):
            raise ValueError(f"bits: the C kernels read quantized caches with an even head_dim <= "
                             f"{MAX_QUANTIZED_HEAD_DIM}, got {head_dim}")
        for name, tensor, dims in (("block_tables", block_tables, 2), ("seq_lens", seq_lens, 1)):
            if tensor.dtype != torch.int32 or tensor.dim() != dims or tensor.device.type != "cpu":
                raise ValueError(f"{name}: expected a {dims}-D int32 CPU tensor, got {tensor.dtype} "
                                 f"{tuple(tensor.shape)} on {tensor.device}")
        batch, width = block_tables.shape
        if seq_lens.shape[0] != batch or batch == 0:
            raise ValueError(f"seq_lens: expected {batch} lengths (one per block table row), got {seq_lens.shape[0]}")
        lengths = seq_lens.tolist()
        if min(lengths) < 1 or max(lengths) > width * block_size:
            raise ValueError(f"seq_lens: each must be in [1, {width * block_size}], got {min(lengths)}..{max(lengths)}")
        if width and (int(block_tables.min()) < 0 or int(block_tables.max()) >= num_blocks):
            raise ValueError(f"block_tables: entries must be block ids in [0, {num_blocks})")
        max_len = max(lengths)
        groups = num_heads // kv_heads
        return DecodeAttentionPlan(
            function=self._function,
            block_tables=block_tables.contiguous(),
            seq_lens=seq_lens.contiguous(),
            cache_shape=(num_blocks, block_size, kv_heads, head_dim),
            num_heads=num_heads,
            max_len=max_len,
            scratch=torch.empty(batch * kv_heads * groups * max_len, dtype=torch.float32),
            threads=threads if threads is not None else torch.get_num_threads(),
            bits=bits,
        )


@dataclass(frozen=True)
class DecodeAttentionPlan:
    """One decode step's validated layout; ``run`` attends one layer. ``scratch`` holds the softmax
    weights of every (sequence, query head) pair, reused by each layer of the step (one at a time)."""

    function: Callable[..., None]
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cache_shape: tuple[int, int, int, int]
    num_heads: int
    max_len: int
    scratch: torch.Tensor
    threads: int
    bits: KVBits | None = None

    def run(self, q: torch.Tensor, cache: KVCache, scale: float,
            options: AttentionOptions | None = None) -> torch.Tensor:
        """``q`` ``[B, num_heads, head_dim]`` float32 (each sequence's heads contiguous; the batch stride
        is free, so a slice of a fused QKV output needs no copy) over ``cache`` (of the plan's shape and
        bits) -> ``[B, num_heads * head_dim]``; ``options``: a sliding window and soft-capping (the kernel
        starts at the window's first token, so older blocks are not read)."""
        _num_blocks, block_size, kv_heads, head_dim = self.cache_shape
        batch = self.seq_lens.shape[0]
        if q.shape != (batch, self.num_heads, head_dim) or q.dtype != torch.float32 or q.device.type != "cpu":
            raise ValueError(f"q: expected float32 [{batch}, {self.num_heads}, {head_dim}] on CPU, "
                             f"got {q.dtype} {tuple(q.shape)} on {q.device}")
        if q.stride(2) != 1 or q.stride(1) != head_dim:
            raise ValueError(f"q: each sequence's heads must be contiguous, got strides {q.stride()}")
        problem = native_cache_problem(cache, self.cache_shape, self.bits)
        if problem is not None:
            raise ValueError(f"cache: {problem}")
        out = torch.empty(batch, self.num_heads * head_dim, dtype=torch.float32)
        kv = paged_kv_arg(cache)
        self.function(
            q.data_ptr(), ctypes.byref(kv), self.block_tables.data_ptr(),
            self.seq_lens.data_ptr(), out.data_ptr(), self.scratch.data_ptr(),
            batch, self.num_heads, kv_heads, head_dim, block_size, self.block_tables.shape[1], self.max_len,
            q.stride(0), scale, 0 if options is None else options.sliding_window,
            0.0 if options is None or options.softcap is None else options.softcap, self.threads,
        )
        return out
