"""The native C kernels as CPU-bundle capabilities: the decode attention plan and the fused decoder layer.

``NativeKernels`` compiles (or loads from the cache) each C library on first use, once per bundle: the
first decode step, not import time. Where a library cannot be built here, its capability answers as if
absent (no plan, nothing bound) and the torch ops run instead; ``native_build`` logs why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from asyncllm.kernels.bundle import FusedLayerWeights
from asyncllm.kernels.kv_cache import KVCache
from asyncllm.kernels.metadata import AttentionMetadata
from asyncllm.kernels.native_attention import MAX_QUANTIZED_HEAD_DIM, NativeDecodeAttention
from asyncllm.kernels.native_build import load_native_library
from asyncllm.kernels.native_layer import LayerFunctions, NativeDecodeLayers, bind_layer_functions

_LAYER_SOURCE = "decode_layer.c"


class NativeKernels:
    """Lazily loaded native kernels for one CPU bundle.

    ``max_layer_rows``: decode steps of up to this many rows run fusable layers as one C call each. Measured
    on x86 with 2 threads, forward + LM head against the module path (native attention in both), medians:
    23.1 vs 26.5 ms at 1 row, 32.8 vs 33.9 at 2, 35.7 vs 44.8 at 3, 34.4 vs 41.2 at 4; at 8 rows oneDNN's
    GEMM wins (55 vs 65 ms). Hence the default 4 (``EngineConfig.native_layer_max_rows``).
    """

    def __init__(self, max_layer_rows: int) -> None:
        if max_layer_rows < 0:
            raise ValueError(f"native_layer_max_rows: must be >= 0, got {max_layer_rows}")
        self.max_layer_rows = max_layer_rows
        self._attention: NativeDecodeAttention | None = None
        self._layer: LayerFunctions | None = None
        self._loaded: set[str] = set()

    def attention(self) -> NativeDecodeAttention | None:
        if "attention" not in self._loaded:
            self._loaded.add("attention")
            self._attention = NativeDecodeAttention.load()
        return self._attention

    def layer_functions(self) -> LayerFunctions | None:
        if "layer" not in self._loaded:
            self._loaded.add("layer")
            library = load_native_library(_LAYER_SOURCE)
            self._layer = None if library is None else bind_layer_functions(library)
        return self._layer

    def plan_attention(self, meta: AttentionMetadata, cache: KVCache, num_heads: int) -> AttentionMetadata:
        """Attach a validated ``DecodeAttentionPlan`` to a decode step over a float32 CPU cache (plain, or int8 /
        int4 codes with float32 scales, 4-bit keys anchored)."""
        if not meta.is_decode_only or cache.compute_dtype != torch.float32:
            return meta
        if cache.device.type != "cpu" or meta.block_tables.device.type != "cpu":
            return meta
        kernel = self.attention()
        if kernel is None:
            return meta
        if cache.is_quantized and cache.head_dim > MAX_QUANTIZED_HEAD_DIM:
            return meta
        shape = (cache.num_blocks, cache.block_size, cache.num_kv_heads, cache.head_dim)
        plan = kernel.plan(meta.block_tables, meta.seq_lens, shape, num_heads=num_heads, bits=cache.bits)
        return dataclasses.replace(meta, plan=plan)

    def bind(self, layers: Sequence[FusedLayerWeights | None]) -> NativeDecodeLayers | None:
        """The layers bound to the C layer; ``None`` when no layer can be bound or the libraries are
        unavailable."""
        if self.max_layer_rows == 0 or not any(layer is not None for layer in layers):
            return None
        if self.attention() is None:
            return None
        functions = self.layer_functions()
        if functions is None:
            return None
        binding = NativeDecodeLayers(functions, layers, self.max_layer_rows)
        return binding if binding.num_bound else None
